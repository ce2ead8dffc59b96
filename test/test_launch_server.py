"""Lynx flags in SGLang's own argument parsing: implied settings, bad input refused before anything starts,
the same through the project's launcher and SGLang's."""

import argparse
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_lynx import plugin
from sglang_lynx.config import ENV_VAR, MODES, LynxConfig, LynxConfigError

LAUNCHERS = ["sglang_lynx.launch_server", "sglang.launch_server"]


def sglang_args(*argv: str, model_path: str = "m", plugin_defaults: bool = False) -> argparse.Namespace:
    """argv parsed as SGLang's parser does once the plugin has added the Lynx flags to it (and, with
    ``plugin_defaults``, a CPU's defaults, as a launcher's parser has them)."""
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    if plugin_defaults:
        plugin._add_lynx_flags(None, parser)
    else:
        LynxConfig.add_cli_args(parser)
    return parser.parse_args(["--model-path", model_path, *argv])


def implied(*argv: str) -> tuple[argparse.Namespace, list[str]]:
    args = sglang_args(*argv)
    return args, LynxConfig.from_cli_args(args).imply(args)


def test_quantized_modes_make_a_page_hold_whole_codec_blocks_unless_told_otherwise():
    assert implied("--lynx", "--lynx-group-size", "32")[0].page_size == 32
    assert implied("--lynx-mode", "int8", "--page-size=128")[0].page_size == 128
    assert implied("--lynx-mode", "raw")[0].page_size is None  # raw sends the pool's own pages


def test_a_lynx_decode_worker_schedules_without_overlap_and_says_so():
    args, notices = implied("--lynx", "--disaggregation-mode", "decode")
    assert args.disable_overlap_schedule and any("overlap scheduling is off" in n for n in notices)
    for argv in (("--lynx-mode", "int8", "--disaggregation-mode", "decode"),
                 ("--lynx", "--disaggregation-mode=prefill")):
        args, notices = implied(*argv)
        assert not args.disable_overlap_schedule and not notices


def checked(mode: str, *argv: str) -> None:
    """A worker's argv in ``mode`` checked against SGLang's arguments, once the mode's implied settings are set."""
    from sglang.srt.server_args import ServerArgs

    args = sglang_args("--lynx-mode", mode, *argv)
    config = LynxConfig.from_cli_args(args)
    config.imply(args)
    config.check_server_args(ServerArgs.from_cli_args(args))


UNSUPPORTED = [
    (["--pp-size", "2"], "--pp-size 2 is not supported by Lynx yet"),
    (["--dp-size", "2"], "--dp-size 2 is not supported by Lynx yet"),
    (["--attn-dp-size", "2"], "--attn-dp-size 2 is not supported by Lynx yet"),
    (["--enable-dp-attention"], "--enable-dp-attention is not supported by Lynx yet"),
    (["--kv-cache-dtype", "fp8_e4m3"], "cannot be combined with --kv-cache-dtype fp8_e4m3"),
    (["--kv-cache-dtype", "bf16", "--dtype", "float32"], "cannot be combined with --kv-cache-dtype bf16"),
    (["--disaggregation-decode-enable-offload-kvcache"],
     "cannot be combined with --disaggregation-decode-enable-offload-kvcache: decode could offload Anchor-precision"),
    (["--enable-unified-memory"], "cannot be combined with --enable-unified-memory: Lynx reads and writes a plain"),
    (["--enable-page-major-kv-layout"], "cannot be combined with --enable-page-major-kv-layout"),
    (["--enable-hisparse"], "cannot be combined with --enable-hisparse"),
]


@pytest.mark.parametrize("argv, message", UNSUPPORTED, ids=[" ".join(argv) for argv, _ in UNSUPPORTED])
@pytest.mark.parametrize("mode", [m for m in MODES if m != "off"])
def test_every_lynx_mode_refuses_several_ranks_a_kv_pool_not_of_the_model_dtype_and_other_pools(mode, argv, message):
    for role in ("prefill", "decode"):
        with pytest.raises(LynxConfigError, match=re.escape(message)):
            checked(mode, "--disaggregation-mode", role, *argv)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "off"])
def test_every_lynx_mode_runs_a_worker_over_several_tensor_parallel_ranks(mode):
    for role in ("prefill", "decode"):
        checked(mode, "--disaggregation-mode", role, "--tp-size", "2")


def test_mode_off_leaves_every_sglang_setting_to_sglang():
    checked("off", *(flag for argv, _ in UNSUPPORTED for flag in argv))


def test_a_kv_cache_dtype_that_is_the_model_dtype_is_taken():
    for argv in (["--kv-cache-dtype", "auto"], ["--kv-cache-dtype", "bfloat16", "--dtype", "bfloat16"]):
        checked("lynx", "--disaggregation-mode", "decode", *argv)


def launcher_server_args(*argv: str):
    """SGLang's ServerArgs.from_cli_args on argv, through the plugin's hook, as in a launcher."""
    from sglang.srt.server_args import ServerArgs

    from sglang_lynx.plugin import _read_lynx_flags

    return _read_lynx_flags(ServerArgs.from_cli_args.__func__, ServerArgs, sglang_args(*argv))


def test_a_lynx_mode_refuses_to_start_on_an_sglang_it_is_not_tested_with_and_mode_off_starts(monkeypatch, capsys):
    from sglang_lynx import plugin

    monkeypatch.setattr(plugin, "SGLANG_VERSIONS", ">=0.6,<0.7")
    monkeypatch.setenv(ENV_VAR, "")  # where the launcher leaves its config for the processes it starts
    with pytest.raises(SystemExit) as refusal:
        launcher_server_args("--lynx", "--disaggregation-mode", "decode")
    assert refusal.value.code == 2
    assert "error: --lynx-mode lynx runs on sglang>=0.6,<0.7" in capsys.readouterr().err
    assert launcher_server_args("--lynx-mode", "off").model_path == "m"


@pytest.fixture(scope="module")
def launched(model_path) -> dict:
    """The launchers run as a user runs them, all at once (each imports SGLang for seconds): by
    (launcher, run name), the finished process."""
    runs = {(launcher, name): argv for launcher in LAUNCHERS for name, argv in (
        ("bad flag", ["--model-path", "m", "--lynx-anchor-bits", "9"]),
        ("help", ["--help"]),
    )}
    runs[(LAUNCHERS[0], "fp8 decode")] = ["--model-path", model_path, "--lynx-mode", "lynx",
                                          "--disaggregation-mode", "decode", "--kv-cache-dtype", "fp8_e5m2"]

    def run(key):
        launcher, _ = key
        return subprocess.run([sys.executable, "-m", launcher, *runs[key]], capture_output=True, text=True,
                              timeout=300)

    with ThreadPoolExecutor(len(runs)) as pool:
        return dict(zip(runs, pool.map(run, runs)))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_bad_lynx_flag_exits_with_a_clear_error_before_starting_anything(launched, launcher):
    result = launched[(launcher, "bad flag")]
    assert result.returncode == 2
    assert "--lynx-anchor-bits must be between 2 and 6" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--lynx"], "add --disaggregation-mode prefill or --disaggregation-mode decode"),
    (["--lynx-mode", "lynx", "--disaggregation-mode", "decode", "--disaggregation-decode-enable-radix-cache"],
     "cannot be combined with --disaggregation-decode-enable-radix-cache"),
    (["--lynx-mode", "int4", "--disaggregation-mode", "prefill", "--page-size", "48"],
     "needs --page-size to be a multiple of --lynx-group-size (64)"),
    (["--lynx-mode", "raw", "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "nixl"],
     "runs on the Mooncake transfer engine"),
])
def test_lynx_modes_refuse_sglang_settings_they_cannot_work_with(model_path, argv, message, capsys):
    """What a launcher's ServerArgs.from_cli_args does with these flags, hooked by the plugin (the
    launchers themselves exit on a bad flag, above)."""
    from sglang.srt.server_args import ServerArgs

    with pytest.raises(SystemExit) as exited:
        plugin._read_lynx_flags(lambda cls, args: cls.from_cli_args(args), ServerArgs,
                                sglang_args(*argv, model_path=model_path, plugin_defaults=True))
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_a_decode_worker_with_an_fp8_kv_cache_exits_at_once_naming_the_flag(launched):
    # Lynx refuses it before SGLang's own "not supported on CPU", which comes only once the model loads.
    result = launched[(LAUNCHERS[0], "fp8 decode")]
    assert result.returncode == 2
    assert "cannot be combined with --kv-cache-dtype fp8_e5m2" in result.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_help_lists_lynx_and_sglang_options(launched, launcher):
    result = launched[(launcher, "help")]
    assert result.returncode == 0
    assert "--lynx-mode" in result.stdout and "--lynx " in result.stdout
    assert "--disaggregation-mode" in result.stdout
