"""Everything Lynx changes in SGLang, registered from one place.

SGLang calls :func:`load` (entry point ``sglang.srt.plugins``) early in every process it
starts: the HTTP server, each scheduler, the detokenizer. With ``--lynx-mode off`` nothing but
the CPU compatibility layer is registered. In every other mode, the streams:

=================================================================  ======  ============================
target                                                             hook    what for
=================================================================  ======  ============================
``disaggregation.utils.get_kv_class``                              AROUND  the Lynx KV manager for the
                                                                           Mooncake backend
``PrefillBootstrapQueue._init_kv_manager`` and                     AROUND  give the manager the KV pool
``DecodePreallocQueue._init_kv_manager``                                   (to encode / land pages)
``disaggregation.prefill.release_kv_cache``                        AROUND  keep a request's pages until
                                                                           its Residual has gone
``...PrefillMixin.process_disagg_prefill_inflight_queue``          AFTER   release them then
``DecodeTransferQueue._commit_transfer_to_req``                    AROUND  land the first stream
``Scheduler.is_fully_idle``                                        AFTER   pending Lynx work is work
``SchedulerInternalStateController.get_internal_state``            AFTER   a ``lynx`` section in
                                                                           ``/server_info``
=================================================================  ======  ============================

and in ``lynx`` mode, speculation (``sglang_lynx.speculation.hooks``):

=================================================================  ======  ============================
``DecodeTransferQueue.pop_transferred``                            AROUND  admit: start speculating
``...DecodeMixin.process_decode_queue``                            AFTER   verify requests whose
                                                                           Residual landed, re-admit
``Req.update_finish_state``                                        AROUND  a stop on a speculated
                                                                           token only pauses
``SchedulerOutputStreamer.stream_output``                          AROUND  stream verified tokens only
``Scheduler.update_running_batch``                                 AROUND  pause at the cap
``ScheduleBatch.retract_decode``                                   AROUND  pause, never retract,
                                                                           speculating requests
``ModelRunner.sample``                                             AROUND  keep draft logits (sampling)
``TorchNativeAttnBackend._run_sdpa_forward_extend``                AROUND  verify pass: attend from the
                                                                           new tokens only (CPU)
``Scheduler.abort_request``                                        AFTER   abort paused requests
``Scheduler.on_idle``                                              AFTER   sleep until a Residual lands
=================================================================  ======  ============================
"""

from sglang_lynx.compat import cpu
from sglang_lynx.config import LynxConfig

DISAGG = "sglang.srt.disaggregation"
MANAGERS = "sglang.srt.managers"


def load() -> None:
    cpu.activate()
    cpu.patch_sglang()
    config = LynxConfig.from_env()  # fails early, in every process, on a malformed config
    if config.enabled:
        from sglang.srt.plugins.hook_registry import HookRegistry

        for target, hook, kind in lynx_hooks(config.mode):
            HookRegistry.register(target, hook, kind)


def lynx_hooks(mode: str) -> list:
    """(SGLang target, hook, hook type) for every hook a Lynx mode registers."""
    from sglang.srt.plugins.hook_registry import HookType

    from sglang_lynx.streams import landing

    hooks = [
        (f"{DISAGG}.utils.get_kv_class", _lynx_kv_class, HookType.AROUND),
        (f"{DISAGG}.prefill.PrefillBootstrapQueue._init_kv_manager", _attach_pool, HookType.AROUND),
        (f"{DISAGG}.decode.DecodePreallocQueue._init_kv_manager", _attach_pool, HookType.AROUND),
        (f"{DISAGG}.prefill.release_kv_cache", _release_after_residual, HookType.AROUND),
        (f"{DISAGG}.prefill.SchedulerDisaggregationPrefillMixin.process_disagg_prefill_inflight_queue",
         _run_deferred_releases, HookType.AFTER),
        (f"{DISAGG}.decode.DecodeTransferQueue._commit_transfer_to_req", landing.commit_transfer,
         HookType.AROUND),
        (f"{MANAGERS}.scheduler.Scheduler.is_fully_idle", _idle_unless_lynx_work, HookType.AFTER),
        (f"{MANAGERS}.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
         _report_lynx_state, HookType.AFTER),
    ]
    if mode == "lynx":
        from sglang_lynx.speculation import hooks as spec

        hooks += [
            (f"{DISAGG}.decode.DecodeTransferQueue.pop_transferred", spec.admit, HookType.AROUND),
            (f"{DISAGG}.decode.SchedulerDisaggregationDecodeMixin.process_decode_queue", spec.verify_landed,
             HookType.AFTER),
            (f"{MANAGERS}.schedule_batch.Req.update_finish_state", spec.guard_finish, HookType.AROUND),
            (f"{MANAGERS}.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output",
             spec.stream_verified, HookType.AROUND),
            (f"{MANAGERS}.scheduler.Scheduler.update_running_batch", spec.pause_at_cap, HookType.AROUND),
            (f"{MANAGERS}.schedule_batch.ScheduleBatch.retract_decode", spec.keep_from_retraction,
             HookType.AROUND),
            ("sglang.srt.model_executor.model_runner.ModelRunner.sample", spec.capture_drafts, HookType.AROUND),
            ("sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend._run_sdpa_forward_extend",
             spec.verify_attention, HookType.AROUND),
            (f"{MANAGERS}.scheduler.Scheduler.abort_request", spec.abort_paused, HookType.AFTER),
            (f"{MANAGERS}.scheduler.Scheduler.on_idle", spec.wait_for_residual, HookType.AFTER),
        ]
    return hooks


def _lynx_kv_class(original, transfer_backend, class_type):
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend

    from sglang_lynx.streams.mooncake import LynxKVManager

    if transfer_backend == TransferBackend.MOONCAKE and class_type == KVClassType.MANAGER:
        return LynxKVManager
    return original(transfer_backend, class_type)


def _attach_pool(original, queue):
    manager = original(queue)
    if _lynx_manager(manager) is not None:
        manager.attach_pool(queue.token_to_kv_pool)
    return manager


def _release_after_residual(original, req, *args, **kwargs):
    manager = _lynx_manager(getattr(getattr(req, "disagg_kv_sender", None), "kv_mgr", None))
    if manager is None:
        return original(req, *args, **kwargs)
    manager.release_after_residual(req.bootstrap_room, lambda: original(req, *args, **kwargs))


def _run_deferred_releases(result, scheduler, *args, **kwargs):
    manager = _lynx_manager(_prefill_manager(scheduler))
    if manager is not None:
        manager.run_deferred_releases()
    return result


def _idle_unless_lynx_work(idle, scheduler, *args, **kwargs):
    from sglang_lynx.speculation.hooks import has_work

    prefill = _lynx_manager(_prefill_manager(scheduler))
    return idle and not (prefill is not None and prefill.deferred_releases) and not has_work()


def _report_lynx_state(result, controller, *args, **kwargs):
    from sglang_lynx.speculation.hooks import speculation_state

    scheduler = controller.scheduler
    prefill = _lynx_manager(_prefill_manager(scheduler))
    decode = _lynx_manager(_decode_manager(scheduler))
    state = {"mode": (prefill or decode).lynx.mode} if (prefill or decode) else {}
    if prefill is not None:
        state.update(residuals_in_flight=len(prefill.residual_plans),
                     deferred_releases=len(prefill.deferred_releases))
    if decode is not None:
        allocator = scheduler.token_to_kv_pool_allocator
        state.update(rows_in_use=decode.rows.in_use(), free_kv_tokens=allocator.available_size(),
                     total_kv_tokens=scheduler.max_total_num_tokens, **speculation_state())
    result.internal_state["lynx"] = state
    return result


def _prefill_manager(scheduler):
    return getattr(getattr(scheduler, "disagg_prefill_bootstrap_queue", None), "kv_manager", None)


def _decode_manager(scheduler):
    return getattr(getattr(scheduler, "disagg_decode_prealloc_queue", None), "kv_manager", None)


def _lynx_manager(manager):
    from sglang_lynx.streams.mooncake import LynxKVManager

    return manager if isinstance(manager, LynxKVManager) else None
