"""Everything Lynx changes in SGLang, registered from one place.

SGLang calls :func:`load` (entry point ``sglang.srt.plugins``) early in every process it
starts: the HTTP server, each scheduler, the detokenizer. With ``--lynx-mode off`` nothing but
the CPU compatibility layer is registered. Otherwise:

==============================================================  =======  ==========================
target                                                          hook     what for
==============================================================  =======  ==========================
``disaggregation.utils.get_kv_class``                           AROUND   Lynx manager and sender
                                                                         for the Mooncake backend
``PrefillBootstrapQueue._init_kv_manager`` (and decode's         AROUND   give the manager the KV
``DecodePreallocQueue._init_kv_manager``)                                 pool to encode/land pages
``DecodeTransferQueue._commit_transfer_to_req``                  AROUND   land the first stream
``DecodeTransferQueue.pop_transferred``                          AROUND   hold until the Residual
``Scheduler.is_fully_idle``                                      AFTER    held requests are work
==============================================================  =======  ==========================
"""

from sglang_lynx.compat import cpu
from sglang_lynx.config import LynxConfig

DISAGG = "sglang.srt.disaggregation"


def load() -> None:
    cpu.activate()
    cpu.patch_sglang()
    config = LynxConfig.from_env()  # fails early, in every process, on a malformed config
    if config.enabled:
        _register_lynx_hooks()


def _register_lynx_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_lynx.streams import landing

    hooks = [
        (f"{DISAGG}.utils.get_kv_class", _lynx_kv_class, HookType.AROUND),
        (f"{DISAGG}.prefill.PrefillBootstrapQueue._init_kv_manager", _attach_pool, HookType.AROUND),
        (f"{DISAGG}.decode.DecodePreallocQueue._init_kv_manager", _attach_pool, HookType.AROUND),
        (f"{DISAGG}.decode.DecodeTransferQueue._commit_transfer_to_req", landing.commit_transfer,
         HookType.AROUND),
        (f"{DISAGG}.decode.DecodeTransferQueue.pop_transferred", landing.pop_transferred, HookType.AROUND),
        ("sglang.srt.managers.scheduler.Scheduler.is_fully_idle", _idle_unless_waiting, HookType.AFTER),
    ]
    for target, hook, kind in hooks:
        HookRegistry.register(target, hook, kind)


def _lynx_kv_class(original, transfer_backend, class_type):
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend

    from sglang_lynx.streams.mooncake import LynxKVManager, LynxKVSender

    if transfer_backend == TransferBackend.MOONCAKE:
        lynx = {KVClassType.MANAGER: LynxKVManager, KVClassType.SENDER: LynxKVSender}.get(class_type)
        if lynx is not None:
            return lynx
    return original(transfer_backend, class_type)


def _attach_pool(original, queue):
    from sglang_lynx.streams.mooncake import LynxKVManager

    manager = original(queue)
    if isinstance(manager, LynxKVManager):
        manager.attach_pool(queue.token_to_kv_pool)
    return manager


def _idle_unless_waiting(idle, scheduler, *args, **kwargs):
    from sglang_lynx.streams.landing import has_waiting

    queue = getattr(scheduler, "disagg_decode_transfer_queue", None)
    return idle and not (queue is not None and has_waiting(queue))
