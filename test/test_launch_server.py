"""`python -m sglang_lynx.launch_server`: Lynx flags split from SGLang's, bad input refused early."""

import subprocess
import sys

import pytest

from sglang_lynx.config import LynxConfig
from sglang_lynx.launch_server import lynx_server_args, parse_args


def test_lynx_flags_are_taken_and_the_rest_is_left_for_sglang():
    config, rest = parse_args(["--model-path", "m", "--lynx-mode", "int8", "--port", "1",
                               "--lynx-group-size=32", "--disaggregation-mode", "prefill"])
    assert config == LynxConfig(mode="int8", group_size=32)
    assert rest == ["--model-path", "m", "--port", "1", "--disaggregation-mode", "prefill"]


def test_quantized_modes_make_a_page_hold_whole_codec_blocks_unless_told_otherwise():
    assert lynx_server_args(LynxConfig(mode="lynx", group_size=32), ["--port", "1"]) == \
        ["--port", "1", "--page-size", "32"]
    assert lynx_server_args(LynxConfig(mode="int8"), ["--page-size=128"]) == ["--page-size=128"]
    assert lynx_server_args(LynxConfig(mode="raw"), []) == []  # raw sends the pool's own pages


def test_a_lynx_decode_worker_schedules_without_overlap_and_says_so(capsys):
    argv = ["--disaggregation-mode", "decode"]
    assert lynx_server_args(LynxConfig(mode="lynx"), argv)[-1] == "--disable-overlap-schedule"
    assert "overlap scheduling is off" in capsys.readouterr().err
    assert "--disable-overlap-schedule" not in lynx_server_args(LynxConfig(mode="int8"), argv)
    assert "--disable-overlap-schedule" not in lynx_server_args(LynxConfig(mode="lynx"),
                                                                  ["--disaggregation-mode=prefill"])


def run_launcher(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang_lynx.launch_server", *argv],
                          capture_output=True, text=True, timeout=300)


def test_bad_lynx_flag_exits_with_a_clear_error_before_starting_anything():
    result = run_launcher("--model-path", "m", "--lynx-anchor-bits", "9")
    assert result.returncode == 2
    assert "--lynx-anchor-bits must be between 2 and 6" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--lynx-mode", "lynx"], "add --disaggregation-mode prefill or --disaggregation-mode decode"),
    (["--lynx-mode", "lynx", "--disaggregation-mode", "decode", "--disaggregation-decode-enable-radix-cache"],
     "cannot be combined with --disaggregation-decode-enable-radix-cache"),
    (["--lynx-mode", "int4", "--disaggregation-mode", "prefill", "--page-size", "48"],
     "needs --page-size to be a multiple of --lynx-group-size (64)"),
    (["--lynx-mode", "raw", "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "nixl"],
     "runs on the Mooncake transfer engine"),
])
def test_lynx_modes_refuse_sglang_settings_they_cannot_work_with(model_path, argv, message):
    result = run_launcher("--model-path", model_path, *argv)
    assert result.returncode != 0
    assert message in result.stderr


def test_help_lists_lynx_and_sglang_options():
    result = run_launcher("--help")
    assert result.returncode == 0
    assert "--lynx-mode" in result.stdout and "--disaggregation-mode" in result.stdout
