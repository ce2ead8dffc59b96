"""Lynx flags in SGLang's own argument parsing: implied settings, bad input refused before anything starts,
the same through the project's launcher and SGLang's."""

import argparse
import subprocess
import sys

import pytest

from sglang_lynx import plugin
from sglang_lynx.config import LynxConfig

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


def run_launcher(launcher: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", launcher, *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_bad_lynx_flag_exits_with_a_clear_error_before_starting_anything(launcher):
    result = run_launcher(launcher, "--model-path", "m", "--lynx-anchor-bits", "9")
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


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_help_lists_lynx_and_sglang_options(launcher):
    result = run_launcher(launcher, "--help")
    assert result.returncode == 0
    assert "--lynx-mode" in result.stdout and "--lynx " in result.stdout
    assert "--disaggregation-mode" in result.stdout
