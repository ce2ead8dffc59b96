"""The hooks Lynx registers exist in the installed SGLang (SGLang only logs a target it cannot find)."""

import pkgutil

import pytest

from sglang_lynx.compat import cpu
from sglang_lynx.config import MODES
from sglang_lynx.plugin import flag_hooks, lynx_hooks


@pytest.mark.parametrize("mode", [m for m in MODES if m != "off"])
def test_every_hook_target_exists_in_the_installed_sglang(mode):
    targets = [target for target, _, _ in lynx_hooks(mode) + flag_hooks() + cpu.hooks()]
    for target in targets:
        module, attribute = target.rsplit(".", 1)
        assert hasattr(pkgutil.resolve_name(module), attribute), target


def test_speculation_hooks_are_registered_in_lynx_mode_only():
    names = lambda mode: {hook.__module__ for _, hook, _ in lynx_hooks(mode)}
    assert "sglang_lynx.speculation.hooks" in names("lynx")
    assert "sglang_lynx.speculation.hooks" not in names("int8")
