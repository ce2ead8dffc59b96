"""The CPU compatibility layer: defaults that never override the user, placeholders that fail loudly."""

import pytest

from sglang_lynx.compat import cpu

pytestmark = pytest.mark.skipif(not cpu.active(), reason="compat layer is active only without CUDA")


def test_cpu_defaults_fill_in_only_flags_the_user_did_not_give():
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    parser.set_defaults(**cpu.server_arg_defaults())  # what the plugin does to SGLang's parser
    args = parser.parse_args(["--model-path", "m", "--dtype=bfloat16", "--max-total-tokens", "1024"])
    assert (args.dtype, args.max_total_tokens) == ("bfloat16", 1024)
    assert (args.device, args.attention_backend) == ("cpu", "torch_native")
    assert args.sleep_on_idle  # idle servers must not keep a core busy


def test_a_process_that_imports_sglang_first_gets_the_layer_before_sglang_loads():
    """What the project's .venv does for `sglang serve` and `python -m sglang.bench_serving`."""
    import subprocess
    import sys

    code = ("import os; from sglang_lynx.compat import cpu; cpu.activate_on_sglang_import(); "
            "import sglang.bench_serving; print(os.environ['SGLANG_USE_CPU_ENGINE'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1"]


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


GiB = 1 << 30


def test_the_kv_pool_of_a_cpu_worker_leaves_room_for_a_second_worker_and_both_runtimes():
    # 24 GB machine, Qwen2.5-Coder-1.5B in fp32 (6.6 GiB of weights): two workers fit beside their pools.
    total, weights = int(23.5 * GiB), int(6.6 * GiB)
    budget = cpu.kv_pool_budget(total, weights)
    assert 1.0 * GiB < budget < 1.6 * GiB
    assert 2 * (weights + cpu.RUNTIME_BYTES + budget) < 0.9 * total
    # a smaller model gets more, a machine too small for two workers none
    assert cpu.kv_pool_budget(total, GiB // 2) > 4 * GiB
    assert cpu.kv_pool_budget(16 * GiB, 6 * GiB) == 0


FAILING_WORKER = '''
import multiprocessing, signal, sys, time
import psutil

def fail():  # what a failing SGLang scheduler or detokenizer does
    psutil.Process().parent().send_signal(signal.SIGQUIT)

if __name__ == "__main__":
    got = []
    signal.signal(signal.SIGQUIT, lambda *_: got.append("SIGQUIT"))
    multiprocessing.set_start_method("forkserver")
    multiprocessing.set_forkserver_preload(sys.argv[1:])  # as compat.cpu sets it for a CPU worker
    worker = multiprocessing.Process(target=fail)
    worker.start()
    worker.join()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    print(got)
'''


def test_a_worker_process_that_fails_reaches_the_launcher_through_the_fork_server(tmp_path):
    """CPU workers fork their scheduler and detokenizer from a fork server; SGLang's launcher must
    still hear (SIGQUIT) from one that fails, as it does from a spawned one, and take the worker down."""
    import subprocess
    import sys

    script = tmp_path / "launcher.py"
    script.write_text(FAILING_WORKER)
    preload = [m for m in cpu.FORK_SERVER_PRELOAD if m.startswith("sglang_lynx")]
    assert preload, "the fork server must pass failures on"
    result = subprocess.run([sys.executable, str(script), *preload], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["['SIGQUIT']"]


def test_the_ranks_of_a_tensor_parallel_cpu_worker_get_a_share_of_the_cores_each():
    assert cpu.cores_per_rank([0, 1], 2) == "0|1"
    assert cpu.cores_per_rank(list(range(16)), 2) == "0-7|8-15"
    assert cpu.cores_per_rank([0, 2, 4, 6], 2) == "0,2|4,6"  # the cores this process may use
    assert cpu.cores_per_rank([0], 2) == "0|0"  # fewer cores than ranks: they share
