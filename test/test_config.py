"""The Lynx options: defaults, validation with clear errors, transport to child processes."""

import argparse
import re

import pytest

from sglang_lynx.config import ENV_VAR, LynxConfig, LynxConfigError


def parse(*argv: str) -> LynxConfig:
    parser = argparse.ArgumentParser()
    LynxConfig.add_cli_args(parser)
    return LynxConfig.from_cli_args(parser.parse_args(list(argv)))


def test_defaults_are_off_4_bit_anchor_64_speculative_tokens_unpaced_first_token_at_prefill():
    config = parse()
    assert config == LynxConfig(mode="off", anchor_bits=4, group_size=64, max_speculative_tokens=64,
                                bandwidth_mbps=None, verify_checksums=True, first_token_at_prefill=True)
    assert not config.enabled and config.residual_bits == 4


def test_every_option_parses():
    config = parse("--lynx-mode", "lynx", "--lynx-anchor-bits", "5", "--lynx-group-size", "32",
                   "--lynx-max-speculative-tokens", "16", "--lynx-bandwidth-mbps", "200",
                   "--lynx-staging-mb", "256", "--no-lynx-verify-checksums", "--no-lynx-first-token-at-prefill")
    assert config == LynxConfig("lynx", 5, 32, 16, 200.0, staging_mb=256.0, verify_checksums=False,
                                first_token_at_prefill=False)
    assert config.enabled and config.residual_bits == 3


def test_stages_give_the_anchor_then_the_residual_in_one_or_two_stages():
    assert parse("--lynx-stages", "4,2,2") == LynxConfig(anchor_bits=4, residual_stages=(2, 2))
    assert parse("--lynx-stages", "5,3") == parse("--lynx-anchor-bits", "5") == LynxConfig(anchor_bits=5)
    assert parse("--lynx-stages", "4,2,2", "--lynx-anchor-bits", "4").stages == "4,2,2"
    assert LynxConfig().stages == "4,4" and LynxConfig().residual_plan == (4,)
    assert LynxConfig(anchor_bits=5, residual_stages=[2, 1]).residual_plan == (2, 1)  # as read from JSON


@pytest.mark.parametrize("stages, message", [
    ("4,2,1", "--lynx-stages must give the bits of each stage, .* add up to 8 .* got 4,2,1"),
    ("4,2,1,1", "in at most 3 stages"),
    ("4,4,0", "stages of at least one bit"),
    ("8", "needs the Anchor and at least one more stage"),
    ("7,1", "the Anchor \\(the first stage\\) carries 2 to 6 bits"),
    ("4,two,2", "expected comma-separated bits per stage"),
])
def test_stage_plans_that_cannot_work_are_refused_by_the_parser_saying_why(stages, message, capsys):
    with pytest.raises(SystemExit):
        parse("--lynx-stages", stages)
    assert re.search(message, capsys.readouterr().err)


def test_an_anchor_width_the_stages_contradict_is_refused():
    with pytest.raises(LynxConfigError, match="--lynx-anchor-bits 5 contradicts --lynx-stages 4,2,2"):
        parse("--lynx-stages", "4,2,2", "--lynx-anchor-bits", "5")


def test_lynx_alone_is_short_for_lynx_mode_lynx():
    assert parse("--lynx") == parse("--lynx-mode", "lynx") == LynxConfig(mode="lynx")


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="fast"), "--lynx-mode must be one of off, raw, int8, int4, lynx"),
    (dict(anchor_bits=8), "--lynx-anchor-bits must be between 2 and 6"),
    (dict(anchor_bits=1), "--lynx-anchor-bits must be between 2 and 6"),
    (dict(group_size=48), "--lynx-group-size must be a power of two"),
    (dict(group_size=4), "--lynx-group-size must be a power of two >= 8"),
    (dict(max_speculative_tokens=-1), "--lynx-max-speculative-tokens must be between 0 and 1024"),
    (dict(bandwidth_mbps=0.0), "--lynx-bandwidth-mbps must be a positive number"),
    (dict(bandwidth_mbps=float("inf")), "--lynx-bandwidth-mbps must be a positive number"),
    (dict(staging_mb=0.0), "--lynx-staging-mb must be a positive number of MiB"),
])
def test_invalid_values_are_rejected_naming_the_flag(kwargs, message):
    with pytest.raises(LynxConfigError, match=message):
        LynxConfig(**kwargs)


def test_cli_rejects_unknown_mode_and_non_numeric_bandwidth(capsys):
    for argv in (["--lynx-mode", "fast"], ["--lynx-bandwidth-mbps", "lots"], ["--lynx-bandwidth-mbps", "-5"]):
        with pytest.raises(SystemExit):
            parse(*argv)
    assert "--lynx-bandwidth-mbps" in capsys.readouterr().err


def test_a_launcher_command_line_gives_its_lynx_flags_among_sglang_s_and_defaults_when_they_are_malformed():
    argv = ["--model-path", "m", "--lynx", "--lynx-bandwidth-mbps", "40", "--page-size", "64", "--lynx-group-size=16"]
    assert LynxConfig.from_argv(argv) == LynxConfig(mode="lynx", bandwidth_mbps=40.0, group_size=16)
    for malformed in (["--lynx-mode", "fast"], ["--lynx-anchor-bits", "9"], ["--lynx-bandwidth-mbps", "lots"]):
        assert LynxConfig.from_argv(["--lynx", *malformed]) == LynxConfig()
    assert LynxConfig.from_argv(["--lynx-m", "lynx"]) == LynxConfig()  # abbreviations are SGLang's parser's to read


def test_round_trips_through_the_environment(monkeypatch):
    config = LynxConfig("int4", 3, 128, 8, 1000.0, residual_stages=(3, 2))
    env = {}
    config.to_env(env)
    monkeypatch.setenv(ENV_VAR, env[ENV_VAR])
    assert LynxConfig.from_env() == config


def test_no_environment_means_defaults(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert LynxConfig.from_env() == LynxConfig()


@pytest.mark.parametrize("raw, message", [
    ("{not json", "not valid JSON"),
    ('{"mode": "lynx", "colour": "red"}', "unknown fields: colour"),
    ('{"mode": "turbo"}', "--lynx-mode must be one of"),
])
def test_a_malformed_environment_is_an_error(monkeypatch, raw, message):
    monkeypatch.setenv(ENV_VAR, raw)
    with pytest.raises(LynxConfigError, match=message):
        LynxConfig.from_env()
