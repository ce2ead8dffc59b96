"""What SGLang 0.5.23 needs to serve on a CPU without AMX (and without a GPU).

Everything here is inactive when CUDA is available. Nothing edits an installed file:

* import placeholders for two CUDA-only packages SGLang imports at module level
  (``sgl_kernel``, and ``torchvision``, whose PyPI build is CUDA-only); they raise only when
  something is actually used, which a Llama-family text model never does on CPU;
* environment defaults (SGLang's CPU engine switch, no early cached-prefix send, whose
  path records a ``torch.cuda.Event``);
* two narrow patches of CUDA-only calls on the PD path (host-memory registration for the
  decode host pool, pinned transfer indices with a CUDA event on prefill);
* server-argument defaults for a CPU (fp32, the torch-native attention backend, sleep when
  idle so two cores are not burnt busy-polling), set as defaults of SGLang's argument parser by
  the plugin, and a short nap between polls while requests wait on KV transfers (SGLang spins then);
* a KV pool sized for the model and a machine that hosts prefill and decode side by side
  (:func:`kv_pool_budget`), unless ``--max-total-tokens`` says otherwise.

Launchers call :func:`activate` before importing SGLang; in the project's environment a ``.pth``
file makes every process call it the moment it imports SGLang (:func:`activate_on_sglang_import`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import signal
import sys
import time
import types

from sglang_lynx.config import LynxConfig

logger = logging.getLogger(__name__)

PLACEHOLDER_PACKAGES = ("sgl_kernel", "torchvision")

ENV_DEFAULTS = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "SGLANG_DISAGG_PREFILL_EARLY_SEND_CACHED_PREFIX": "0",
    # Mooncake over loopback TCP; RDMA needs real NICs.
    "MOONCAKE_PROTOCOL": "tcp",
    "MC_FORCE_TCP": "1",
    # /health waits this long for the scheduler to answer; a CPU prefilling a long prompt of a 1.5B
    # model (400 tokens: 20 s, 2,000: 100 s) answers nothing meanwhile, and SGLang's 20 s would call it dead.
    "SGLANG_HEALTH_CHECK_TIMEOUT": "300",
}

# SGLang server settings for a CPU, as parser defaults: a flag the user gives still wins.
SERVER_ARG_DEFAULTS = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "dtype": "float32",  # bf16 matmuls are ~5x slower than fp32 on AVX2
    "sleep_on_idle": True,
    "disable_overlap_schedule": True,
    # The default ("host_pool") sizes a HiCache host pool beside a pool that already is in host memory,
    # and refuses to start a decode worker when less than 10 GiB of RAM is free (a second decode worker).
    "disaggregation_decode_retraction_backup": "cpu_tensor",
}


# A scheduler with no batch to run but requests waiting on KV transfers polls again after this long,
# or at once when a new request comes: SGLang polls at once, which keeps a core busy per worker.
TRANSFER_POLL_MS = 5

# SGLang's CPU path: which cores each rank of a worker binds its threads to.
CORES_PER_RANK = "SGLANG_CPU_OMP_THREADS_BIND"

# The Lynx config this process's plugin hooks were registered for (patch_sglang).
_hooked_for: LynxConfig | None = None

# What a worker's processes import before they differ: the fork server imports it once for all of them.
FORK_SERVER_PRELOAD = ("sglang_lynx.compat.fork_server", "sglang.srt.managers.scheduler",
                       "sglang.srt.managers.detokenizer_manager")

# The KV pool of a CPU worker (kv_pool_budget): one machine runs prefill and decode, so each worker's
# pool gets a quarter of what the machine leaves once both workers' weights and runtimes are counted
# (two pools take half of it; the rest is for activations, the page cache, the router and clients),
# and room for this many requests of the model's full context at most.
RUNTIME_BYTES = 5 << 29  # one worker's processes (HTTP server, scheduler, detokenizer) besides weights and KV
KV_SHARE = 0.25
FULL_CONTEXT_REQUESTS = 8
# Never more than what is free now, less this: a machine busier than the rule assumes gets a smaller pool.
FREE_RESERVE_BYTES = 1 << 30


def active() -> bool:
    import torch

    return not torch.cuda.is_available()


def activate() -> None:
    """Prepare this process; call before SGLang is imported. Idempotent."""
    if not active():
        return
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    _install_placeholders()


def activate_on_sglang_import() -> None:
    """Run :func:`activate` the moment this process first imports SGLang, whatever the entry point
    (``sglang serve``, ``python -m sglang.bench_serving``, ...). The project's setup calls this from
    a ``.pth`` file in its virtual environment; it costs nothing in a process that never imports SGLang."""
    if "sglang" not in sys.modules and not any(isinstance(f, _ActivateOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _ActivateOnImport())


def server_arg_defaults() -> dict:
    """Defaults for SGLang's argument parser on this machine (none where CUDA is available)."""
    return dict(SERVER_ARG_DEFAULTS) if active() else {}


def patch_sglang(hooked_for: LynxConfig) -> None:
    """Neutralise CUDA-only calls on SGLang's PD path. Runs from the plugin, in every process, which
    has registered its own hooks for ``hooked_for``."""
    global _hooked_for
    if not active():
        return
    _hooked_for = hooked_for
    from sglang.srt.plugins.hook_registry import HookRegistry

    for target, hook, kind in hooks():
        HookRegistry.register(target, hook, kind)
    # With this flag prefill copies transfer indices into pinned memory and records a CUDA
    # event; without it the indices are computed on the spot, which is right on a CPU.
    from sglang.srt.disaggregation.mooncake import conn

    conn.MooncakeKVSender.supports_host_tensor_indices = False


def hooks() -> list:
    """(SGLang target, hook, hook type) for the CPU patches."""
    from sglang.srt.plugins.hook_registry import HookType

    return [
        # The decode worker's host KV pool registers its memory with CUDA; a CPU has nothing to pin.
        ("sglang.srt.mem_cache.pool_host.common._cuda_host_register", _nothing_to_pin, HookType.REPLACE),
        ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes",
         _size_kv_pool, HookType.AROUND),
        ("sglang.srt.entrypoints.engine._set_envs_and_config", _fork_workers, HookType.AFTER),
        ("sglang.srt.entrypoints.engine._set_envs_and_config", _cores_per_rank, HookType.AFTER),
        ("sglang.srt.managers.scheduler.Scheduler.on_idle", _nap_while_transfers_wait, HookType.AFTER),
    ]


def kv_pool_budget(total_bytes: int, weight_bytes: int) -> int:
    """Bytes for one worker's KV pool on a machine of ``total_bytes`` running two workers whose
    weights take ``weight_bytes`` each (before the cap of FULL_CONTEXT_REQUESTS)."""
    return max(0, int(KV_SHARE * (total_bytes - 2 * (weight_bytes + RUNTIME_BYTES))))


def _size_kv_pool(profile, configurator, *args, **kwargs) -> int:
    """AROUND ``KVCacheConfigurator._profile_available_bytes``: without ``--max-total-tokens``, SGLang
    gives the KV pool a share of the RAM free when the worker starts, as on a GPU it does of the card's
    memory (and refuses to start when too little is free); with prefill and decode starting side by side
    on one machine, what is free then depends on how far the other worker has got. The pool is sized
    from the machine and the model instead."""
    if configurator.server_args.max_total_tokens is not None or configurator.is_draft_worker:
        return profile(configurator, *args, **kwargs)
    import psutil

    memory = psutil.virtual_memory()
    # A worker of several ranks (--tp-size) holds a share of the weights and of the KV pool in each.
    ranks = configurator.server_args.tp_size * configurator.server_args.pp_size
    weights = ranks * sum(t.numel() * t.element_size() for t in (*configurator.model.parameters(),
                                                                   *configurator.model.buffers()))
    budget = kv_pool_budget(memory.total, weights) // ranks
    context = configurator.model_config.context_len
    tokens = configurator.config_from_budget(budget).max_total_num_tokens
    if tokens > FULL_CONTEXT_REQUESTS * context:
        budget = int(budget * FULL_CONTEXT_REQUESTS * context / tokens)
    chosen = min(budget, max(0, memory.available - FREE_RESERVE_BYTES))
    gib = lambda n: f"{n / 2**30:.1f} GiB"
    logger.info("Lynx CPU default KV pool: %s, %d tokens%s: %g of what this %s machine leaves once two workers' "
                "weights (2 x %s) and runtimes (2 x %s) are counted, for at most %d requests of %d tokens%s; "
                "--max-total-tokens sets it", gib(chosen), configurator.config_from_budget(chosen).max_total_num_tokens,
                f" (this rank's share, of {ranks})" if ranks > 1 else "", KV_SHARE, gib(memory.total), gib(weights),
                gib(RUNTIME_BYTES), FULL_CONTEXT_REQUESTS, context,
                f" (less: only {gib(memory.available)} is free now)" if chosen < budget else "")
    return chosen


def _fork_workers(result, *args, **kwargs) -> None:
    """AFTER ``_set_envs_and_config``, which makes "spawn" the start method (for CUDA, which a forked
    process cannot use). A spawned scheduler and detokenizer each import SGLang anew: 8 CPU-seconds
    apiece here, and a worker's start is CPU-bound on a small machine. A launcher whose plugin hooks
    are the ones its flags ask for (``plugin.load``) forks them: they inherit its imports and hooks,
    and their parent is the launcher, as a spawned one's is. Otherwise a fork server imports SGLang
    once and forks each of them, which then load the plugins as spawned ones do
    (``compat.fork_server``: their failures still reach the launcher)."""
    import multiprocessing

    if _hooked_for == LynxConfig.from_env():
        multiprocessing.set_start_method("fork", force=True)
        os.register_at_fork(after_in_child=_as_if_spawned)
    else:
        multiprocessing.set_start_method("forkserver", force=True)
        multiprocessing.set_forkserver_preload(list(FORK_SERVER_PRELOAD))


def _cores_per_rank(result, server_args, *args, **kwargs) -> None:
    """AFTER ``_set_envs_and_config``: with several ranks per worker (``--tp-size``), SGLang's CPU path
    wants one NUMA node per rank, or each rank's cores in SGLANG_CPU_OMP_THREADS_BIND. Unless that is
    set, give each rank its share of this process's cores (a core shared when there are fewer)."""
    ranks = server_args.tp_size * server_args.pp_size
    if ranks > 1 and not os.environ.get(CORES_PER_RANK):
        os.environ[CORES_PER_RANK] = cores_per_rank(sorted(os.sched_getaffinity(0)), ranks)
        logger.info("%s=%s (one group of cores per rank)", CORES_PER_RANK, os.environ[CORES_PER_RANK])


def cores_per_rank(cores: list[int], ranks: int) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for ``ranks`` ranks sharing ``cores``: contiguous groups, "|"-separated
    (``0-7|8-15``)."""
    share = max(1, len(cores) // ranks)
    groups = [cores[(i * share) % len(cores):][:share] for i in range(ranks)]
    return "|".join(_cpu_list(group) for group in groups)


def _cpu_list(cores: list[int]) -> str:
    """``0-7`` for a run of consecutive cores, else ``0,2``."""
    consecutive = len(cores) > 1 and cores[-1] - cores[0] == len(cores) - 1
    return f"{cores[0]}-{cores[-1]}" if consecutive else ",".join(map(str, cores))


def _as_if_spawned() -> None:
    """In a process the launcher forks: what a spawned one gets by starting afresh."""
    # SGLang's SIGQUIT handler takes the launcher's process tree down when a child signals it.
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    # prometheus_client chooses its value class when imported: a spawned process imports it once
    # SGLang has set PROMETHEUS_MULTIPROC_DIR (--enable-metrics), the launcher did before.
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        values.ValueClass = values.get_value_class()


def _nap_while_transfers_wait(result, scheduler, *args, **kwargs) -> None:
    """AFTER ``Scheduler.on_idle``. Fully idle, SGLang has slept already (``--sleep-on-idle``); with
    requests waiting on transfers (bootstrap, KV in flight) it returns at once and the event loop polls
    again: a core per worker, which prefill, decode, router and clients share on a small CPU machine.
    Wait for a new request up to TRANSFER_POLL_MS instead; a transfer is then seen that much later."""
    if scheduler.is_fully_idle():
        return
    if scheduler.idle_sleeper is not None:
        scheduler.idle_sleeper.poller.poll(TRANSFER_POLL_MS)
    else:
        time.sleep(TRANSFER_POLL_MS / 1000)


def _nothing_to_pin(*args, **kwargs) -> None:
    return None


class _Placeholder(types.ModuleType):
    """A module whose every attribute is another placeholder that raises when called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self.__name__} is CUDA-only and is not available on this CPU machine "
            f"(sglang_lynx.compat.cpu placeholder)"
        )

    def __mro_entries__(self, bases):
        # `class X(torchvision.Something)` at import time must not fail.
        return (object,)


class _ActivateOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "sglang":
            sys.meta_path.remove(self)
            activate()
        return None  # the import itself goes on as usual


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages: tuple[str, ...]):
        self.packages = packages

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in self.packages:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Placeholder(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _install_placeholders() -> None:
    if any(isinstance(f, _PlaceholderFinder) for f in sys.meta_path):
        return
    missing = tuple(p for p in PLACEHOLDER_PACKAGES if importlib.util.find_spec(p) is None)
    if not missing:
        return
    if "torchvision" in missing:
        # transformers probes for torchvision with find_spec and caches the answer: let it
        # see the truth (absent) before the placeholder starts answering that probe.
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
    sys.meta_path.append(_PlaceholderFinder(missing))
