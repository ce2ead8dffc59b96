"""What the plugin hooks exists in the installed SGLang, a release Lynx is tested with; SGLang only logs a
target it cannot find, so a Lynx mode refuses to start without one."""

import importlib.metadata
import re

import pytest

from sglang_lynx import plugin
from sglang_lynx.config import ENV_VAR, MODES, LynxConfig, LynxConfigError
from sglang_lynx.plugin import lynx_hooks

LYNX_MODES = [m for m in MODES if m != "off"]


@pytest.mark.parametrize("mode", LYNX_MODES)
def test_every_hook_target_exists_in_the_installed_sglang(mode):
    plugin.check_sglang(mode)


def test_a_lynx_mode_refuses_an_sglang_without_a_target_it_hooks_naming_each(monkeypatch):
    missing = [f"{plugin.MANAGERS}.scheduler.Scheduler.no_such_step", "sglang.srt.no_such_module.run"]
    hooks = lynx_hooks("int8") + [(target, None, None) for target in missing]
    monkeypatch.setattr(plugin, "lynx_hooks", lambda mode: hooks)
    with pytest.raises(LynxConfigError, match=re.escape(f"does not have: {', '.join(missing)}. --lynx-mode off")):
        plugin.check_sglang("int8")


def test_a_lynx_mode_refuses_an_sglang_release_it_is_not_tested_with_naming_the_one_found(monkeypatch):
    monkeypatch.setattr(plugin, "SGLANG_VERSIONS", ">=0.6,<0.7")
    found = importlib.metadata.version("sglang")
    with pytest.raises(LynxConfigError, match=re.escape(f"runs on sglang>=0.6,<0.7 (the releases it is tested "
                                                        f"with); found sglang {found}")):
        plugin.check_sglang("lynx")


def test_a_scheduler_of_a_lynx_mode_refuses_to_start_rather_than_run_half_hooked(monkeypatch, capsys):
    monkeypatch.setattr(plugin, "SGLANG_VERSIONS", ">=0.6,<0.7")
    env = {}
    LynxConfig(mode="int8").to_env(env)  # what a scheduler process finds in its environment
    monkeypatch.setenv(ENV_VAR, env[ENV_VAR])
    # SystemExit, not an Exception: SGLang's plugin loader would log an Exception and start without Lynx.
    with pytest.raises(SystemExit) as refusal:
        plugin.load()
    assert refusal.value.code == 2
    assert "error: --lynx-mode int8 runs on sglang>=0.6,<0.7" in capsys.readouterr().err


def test_a_launcher_hooks_for_the_flags_on_its_command_line_and_the_processes_it_starts_for_their_environment(
        monkeypatch):
    """A launcher's plugin loads before SGLang parses its flags; the processes it starts find the parsed
    ones in the environment. The hooks a process has are the config it tells compat.cpu it hooked for."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from sglang_lynx.compat import cpu

    registered = []
    monkeypatch.setattr(HookRegistry, "register", lambda target, hook, kind: registered.append(hook))
    monkeypatch.setattr(cpu, "_hooked_for", None)

    def speculates(argv: list[str], env: dict) -> bool:
        registered.clear()
        monkeypatch.setattr("sys.argv", ["launch_server", *argv])
        monkeypatch.setenv(ENV_VAR, env.get(ENV_VAR, ""))
        plugin.load()
        return "sglang_lynx.speculation.hooks" in {hook.__module__ for hook in registered}

    assert speculates(["--model-path", "m", "--lynx"], env={})
    assert cpu._hooked_for == LynxConfig(mode="lynx")
    started = {}
    LynxConfig(mode="int8").to_env(started)
    assert not speculates(["--model-path", "m", "--lynx"], env=started)
    assert cpu._hooked_for == LynxConfig(mode="int8")


def test_lynx_modes_turn_off_early_cached_prefix_sending_and_host_tensor_indices_and_say_so_once(monkeypatch):
    from sglang.srt.disaggregation.mooncake import conn
    from sglang.srt.environ import envs

    early_send = envs.SGLANG_DISAGG_PREFILL_EARLY_SEND_CACHED_PREFIX
    monkeypatch.setenv(early_send.name, "1")  # SGLang's defaults on a GPU
    monkeypatch.setattr(conn.MooncakeKVSender, "supports_host_tensor_indices", True)
    notices = plugin.use_tested_transfer_settings("lynx")
    assert not early_send.get() and not conn.MooncakeKVSender.supports_host_tensor_indices
    assert len(notices) == 1 and "no cached prefix early" in notices[0] and "no host tensor indices" in notices[0]
    assert plugin.use_tested_transfer_settings("lynx") == []  # already off, as on a CPU: nothing to say


def test_speculation_hooks_are_registered_in_lynx_mode_only():
    names = lambda mode: {hook.__module__ for _, hook, _ in lynx_hooks(mode)}
    assert "sglang_lynx.speculation.hooks" in names("lynx")
    assert "sglang_lynx.speculation.hooks" not in names("int8")
