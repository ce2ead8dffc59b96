"""The CPU compatibility layer: defaults that never override the user, placeholders that fail loudly."""

import pytest

from sglang_lynx.compat import cpu

pytestmark = pytest.mark.skipif(not cpu.active(), reason="compat layer is active only without CUDA")


def test_cpu_defaults_fill_in_only_flags_the_user_did_not_give():
    argv = cpu.default_server_args(["--model-path", "m", "--dtype=bfloat16", "--max-total-tokens", "1024"])
    assert argv[:4] == ["--model-path", "m", "--dtype=bfloat16", "--max-total-tokens"]
    assert argv.count("--dtype") == 0 and argv.count("--max-total-tokens") == 1
    assert argv[argv.index("--device") + 1] == "cpu"
    assert argv[argv.index("--attention-backend") + 1] == "torch_native"
    assert "--sleep-on-idle" in argv  # idle servers must not keep a core busy


def test_cuda_only_packages_import_but_raise_a_clear_error_when_used():
    cpu.activate()
    import sgl_kernel
    from torchvision import transforms

    with pytest.raises(RuntimeError, match="sgl_kernel.rotary_embedding is CUDA-only"):
        sgl_kernel.rotary_embedding(1, 2)
    with pytest.raises(RuntimeError, match="CUDA-only"):
        transforms.Resize(224)


def test_transformers_still_sees_torchvision_as_absent():
    cpu.activate()
    from transformers.utils import import_utils

    assert not import_utils.is_torchvision_available()
