"""Everything Lynx changes in SGLang, registered from one place.

SGLang calls :func:`load` (entry point ``sglang.srt.plugins``) early in every process it
starts: the HTTP server, each scheduler, the detokenizer. In every process, whatever the mode,
the CPU compatibility layer and the Lynx flags:

=================================================================  ======  ============================
target                                                             hook    what for
=================================================================  ======  ============================
``server_args.ServerArgs.add_cli_args``                            AFTER   the ``--lynx*`` flags (and a
                                                                           CPU's defaults) in SGLang's
                                                                           parser
``server_args.ServerArgs.from_cli_args``                           AROUND  read them into a checked
                                                                           LynxConfig for every process
``TokenizerManager.generate_request``                              BEFORE  a Lynx worker refuses with a
                                                                           400 what SGLang's PD path
                                                                           cannot serve (``admission``)
=================================================================  ======  ============================

With ``--lynx-mode off`` nothing else is registered. In every other mode, the streams:

=================================================================  ======  ============================
target                                                             hook    what for
=================================================================  ======  ============================
``disaggregation.utils.get_kv_class``                              AROUND  the Lynx KV manager for the
                                                                           Mooncake backend
``KVCacheConfigurator._profile_available_bytes``                   AFTER   set the staging area aside
                                                                           before the KV pool is sized
``PrefillBootstrapQueue._init_kv_manager`` and                     AROUND  give the manager the KV pool
``DecodePreallocQueue._init_kv_manager``                                   (staging rows beside it)
``disaggregation.prefill.release_kv_cache``                        AROUND  keep a request's pages and
                                                                           rows until its Residual has
                                                                           gone
``...PrefillMixin.process_disagg_prefill_inflight_queue``          AFTER   release them then; encode
                                                                           chunks that waited for rows
``DecodePreallocQueue.pop_preallocated``                           AROUND  hold requests until their
                                                                           rows are free
``...PrefillMixin.process_disagg_prefill_inflight_queue``          AFTER   answer the requests whose
                                                                           first token went ahead of
                                                                           their KV
``DecodeTransferQueue.pop_transferred``                            BEFORE  stream first tokens that
                                                                           came ahead of their KV
``DecodeTransferQueue._commit_transfer_to_req``                    AROUND  land the first stream
``DecodeTransferQueue._release_request``                           AFTER   free a failed request's rows
``Scheduler.is_fully_idle``                                        AFTER   pending Lynx work is work
``SchedulerInternalStateController.get_internal_state``            AFTER   a ``lynx`` section in
                                                                           ``/server_info``
``SchedulerInternalStateController._update_handlers``              AFTER   ``/set_internal_state``
                                                                           sets the link's rate
                                                                           (``lynx_bandwidth_mbps``)
=================================================================  ======  ============================

and in ``lynx`` mode, speculation (``sglang_lynx.speculation.hooks``):

=================================================================  ======  ============================
``DecodeTransferQueue.pop_transferred``                            AROUND  admit: start speculating
``...DecodeMixin.process_decode_queue``                            AFTER   verify requests whose
                                                                           Residual landed, re-admit
``Req.update_finish_state``                                        AROUND  a stop on a speculated
                                                                           token only pauses
``SchedulerBatchResultProcessor._apply_decode_logprobs``           AFTER   no logprob for the token an
                                                                           abort just dropped
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

A Lynx mode refuses to start on an SGLang outside the tested releases or without one of these
targets (:func:`check_sglang`), and turns off two prefill options it has never run with
(:func:`use_tested_transfer_settings`).
"""

import contextlib
import dataclasses
import functools
import importlib.metadata
import logging
import os
import pkgutil
import sys

from sglang_lynx import admission
from sglang_lynx.compat import cpu
from sglang_lynx.config import ENV_VAR, LynxConfig, LynxConfigError

DISAGG = "sglang.srt.disaggregation"
MANAGERS = "sglang.srt.managers"
# The SGLang releases the hooks were written for and tested with (pyproject.toml states the same range).
SGLANG_VERSIONS = ">=0.5.23,<0.5.24"

logger = logging.getLogger(__name__)


def load() -> None:
    cpu.activate()
    with _refusal_exits():
        # The processes a launcher starts find its parsed flags in the environment (fails early, in
        # every process, on a malformed config). A launcher parses them after this: it hooks for the
        # flags on its command line, which are the parsed ones unless SGLang reads them from elsewhere
        # (a --config file); compat.cpu forks its workers, hooks included, only when they are.
        config = LynxConfig.from_env() if os.environ.get(ENV_VAR) else LynxConfig.from_argv(sys.argv[1:])
        if config.enabled:
            check_sglang(config.mode)  # a scheduler refuses rather than run half-hooked
    cpu.patch_sglang(config)
    if config.enabled:
        use_tested_transfer_settings(config.mode)
    from sglang.srt.plugins.hook_registry import HookRegistry

    for target, hook, kind in flag_hooks() + (lynx_hooks(config.mode) if config.enabled else []):
        HookRegistry.register(target, hook, kind)


def check_sglang(mode: str) -> None:
    """Refuse to run ``mode`` on an SGLang outside the tested releases or without a target Lynx hooks:
    SGLang only logs a target it cannot find, and would serve with part of Lynx missing."""
    from packaging.specifiers import SpecifierSet

    version = importlib.metadata.version("sglang")
    if version not in SpecifierSet(SGLANG_VERSIONS):
        raise LynxConfigError(f"--lynx-mode {mode} runs on sglang{SGLANG_VERSIONS} (the releases it is tested "
                              f"with); found sglang {version}. --lynx-mode off serves without Lynx")
    missing = [target for target in hook_targets(mode) if not _resolves(target)]
    if missing:
        raise LynxConfigError(f"--lynx-mode {mode} hooks what sglang {version} does not have: "
                              f"{', '.join(missing)}. --lynx-mode off serves without Lynx")


def hook_targets(mode: str) -> list[str]:
    """The SGLang target of every hook a process of this mode registers."""
    hooks = flag_hooks() + (lynx_hooks(mode) if mode != "off" else []) + (cpu.hooks() if cpu.active() else [])
    return [target for target, _, _ in hooks]


def _resolves(target: str) -> bool:
    owner, attribute = target.rsplit(".", 1)  # found as SGLang's HookRegistry finds it
    try:
        return hasattr(pkgutil.resolve_name(owner), attribute)
    except (ImportError, AttributeError):
        return False


@contextlib.contextmanager
def _refusal_exits():
    """A refusal ends the process with its message and exit code 2, before anything starts. (SGLang logs any
    other exception a plugin's load raises, and goes on without the plugin.)"""
    try:
        yield
    except LynxConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def use_tested_transfer_settings(mode: str) -> list[str]:
    """Turn off, in this process and the processes it starts, the SGLang prefill options Lynx has only run
    without (a CPU cannot take them): sending a request's cached prefix ahead of its forward, and transfer
    indices copied to host memory behind a CUDA event, which ``add_transfer_request`` would read (np.asarray)
    without waiting for it. Returns the notice to print where SGLang would have used them."""
    from sglang.srt.disaggregation.mooncake import conn
    from sglang.srt.environ import envs

    early_send = envs.SGLANG_DISAGG_PREFILL_EARLY_SEND_CACHED_PREFIX
    changed = early_send.get() or conn.MooncakeKVSender.supports_host_tensor_indices
    os.environ[early_send.name] = "0"
    conn.MooncakeKVSender.supports_host_tensor_indices = False
    if not changed:
        return []
    return [f"--lynx-mode {mode}: prefill sends no cached prefix early ({early_send.name}=0) and computes "
            f"transfer indices on the spot (no host tensor indices): Lynx is tested without them"]


def flag_hooks() -> list:
    """(SGLang target, hook, hook type) that give SGLang's argument parsing the Lynx flags."""
    from sglang.srt.plugins.hook_registry import HookType

    return [
        ("sglang.srt.server_args.ServerArgs.add_cli_args", _add_lynx_flags, HookType.AFTER),
        ("sglang.srt.server_args.ServerArgs.from_cli_args", _read_lynx_flags, HookType.AROUND),
        # The HTTP process registers its hooks before it parses the flags: this one looks at them per call.
        (f"{MANAGERS}.tokenizer_manager.TokenizerManager.generate_request", _refuse_unservable, HookType.BEFORE),
    ]


def lynx_hooks(mode: str) -> list:
    """(SGLang target, hook, hook type) for every hook a Lynx mode registers."""
    from sglang.srt.plugins.hook_registry import HookType

    from sglang_lynx.streams import first_token, landing

    hooks = [
        (f"{DISAGG}.utils.get_kv_class", _lynx_kv_class, HookType.AROUND),
        ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes",
         _set_aside_staging, HookType.AFTER),
        (f"{DISAGG}.prefill.PrefillBootstrapQueue._init_kv_manager", _attach_pool, HookType.AROUND),
        (f"{DISAGG}.decode.DecodePreallocQueue._init_kv_manager", _attach_pool, HookType.AROUND),
        (f"{DISAGG}.prefill.release_kv_cache", _release_after_residual, HookType.AROUND),
        (f"{DISAGG}.prefill.SchedulerDisaggregationPrefillMixin.process_disagg_prefill_inflight_queue",
         _prefill_step, HookType.AFTER),
        (f"{DISAGG}.decode.DecodePreallocQueue.pop_preallocated", landing.hold_for_staging, HookType.AROUND),
        (f"{DISAGG}.prefill.SchedulerDisaggregationPrefillMixin.process_disagg_prefill_inflight_queue",
         first_token.answer_prefill_requests, HookType.AFTER),
        (f"{DISAGG}.decode.DecodeTransferQueue.pop_transferred", first_token.stream_first_tokens, HookType.BEFORE),
        (f"{DISAGG}.decode.DecodeTransferQueue._commit_transfer_to_req", landing.commit_transfer,
         HookType.AROUND),
        (f"{DISAGG}.decode.DecodeTransferQueue._release_request", landing.release_failed, HookType.AFTER),
        (f"{MANAGERS}.scheduler.Scheduler.is_fully_idle", _idle_unless_lynx_work, HookType.AFTER),
        (f"{MANAGERS}.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
         _report_lynx_state, HookType.AFTER),
        (f"{MANAGERS}.scheduler_components.internal_state.SchedulerInternalStateController._update_handlers",
         _lynx_updates, HookType.AFTER),
    ]
    if mode == "lynx":
        from sglang_lynx.speculation import hooks as spec

        hooks += [
            (f"{DISAGG}.decode.DecodeTransferQueue.pop_transferred", spec.admit, HookType.AROUND),
            (f"{DISAGG}.decode.SchedulerDisaggregationDecodeMixin.process_decode_queue", spec.verify_landed,
             HookType.AFTER),
            (f"{MANAGERS}.schedule_batch.Req.update_finish_state", spec.guard_finish, HookType.AROUND),
            ((f"{MANAGERS}.scheduler_components.batch_result_processor.SchedulerBatchResultProcessor"
              "._apply_decode_logprobs"), spec.log_kept_tokens_only, HookType.AFTER),
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


def _add_lynx_flags(result, parser):
    LynxConfig.add_cli_args(parser)
    parser.set_defaults(**cpu.server_arg_defaults())
    return result


def _read_lynx_flags(original, cls, args):
    """SGLang's parsed arguments -> its ServerArgs, with the Lynx flags checked against them and
    handed on (through the environment) to every process the launcher starts."""
    if not hasattr(args, "lynx_mode"):  # a parser SGLang built without add_cli_args
        return original(cls, args)
    with _refusal_exits():
        config = LynxConfig.from_cli_args(args)
        if config.enabled:
            check_sglang(config.mode)
        notices = config.imply(args)
        server_args = original(cls, args)
        config.check_server_args(server_args)
    if config.enabled:
        notices += use_tested_transfer_settings(config.mode)
    for notice in notices:
        print(f"lynx: {notice}", file=sys.stderr)
    config.to_env()
    return server_args


def _refuse_unservable(manager, obj, *args, **kwargs):
    from sglang.srt.managers.io_struct import GenerateReqInput

    if isinstance(obj, GenerateReqInput) and _lynx_worker(manager.server_args):
        reason = admission.refusal(obj, manager.model_config.vocab_size)
        if reason is not None:
            raise ValueError(reason)  # SGLang answers it with HTTP 400


def _lynx_worker(server_args) -> bool:
    return server_args.disaggregation_mode in ("prefill", "decode") and _parsed_config().enabled


@functools.cache
def _parsed_config() -> LynxConfig:
    return LynxConfig.from_env()  # set by _read_lynx_flags, before the first request


def _lynx_kv_class(original, transfer_backend, class_type):
    from sglang.srt.disaggregation.utils import KVClassType, TransferBackend

    from sglang_lynx.streams.mooncake import LynxKVManager

    if transfer_backend == TransferBackend.MOONCAKE and class_type == KVClassType.MANAGER:
        return LynxKVManager
    return original(transfer_backend, class_type)


def _set_aside_staging(available_bytes, configurator, *args, **kwargs):
    """What SGLang may size its KV pool with, less the staging area, so that
    --mem-fraction-static keeps its meaning with Lynx rows on the same device."""
    reserve = LynxConfig.from_env().staging_reserve(available_bytes)
    logger.info("Lynx: %.1f MiB of the KV cache budget set aside for staging rows", reserve / 2**20)
    return available_bytes - reserve


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


def _prefill_step(result, scheduler, *args, **kwargs):
    manager = _lynx_manager(_prefill_manager(scheduler))
    if manager is not None:
        manager.step(scheduler.attn_tp_cpu_group)
    return result


def _idle_unless_lynx_work(idle, scheduler, *args, **kwargs):
    from sglang_lynx.speculation.hooks import has_work

    prefill = _lynx_manager(_prefill_manager(scheduler))
    return idle and not (prefill is not None and prefill.has_work()) and not has_work()


def _report_lynx_state(result, controller, *args, **kwargs):
    from sglang_lynx.speculation.hooks import speculation_state

    scheduler = controller.scheduler
    prefill = _lynx_manager(_prefill_manager(scheduler))
    decode = _lynx_manager(_decode_manager(scheduler))
    if prefill is None and decode is None:
        return result
    # Pages the radix cache keeps only for reuse count as free: it gives them up on demand.
    free_kv = scheduler.token_to_kv_pool_allocator.available_size() + scheduler.tree_cache.evictable_size()
    state = {"mode": (prefill or decode).lynx.mode, "free_kv_tokens": free_kv,
             "total_kv_tokens": scheduler.max_total_num_tokens,
             "requests_holding_rows": len((prefill or decode).staged)}
    if prefill is not None:
        state.update(bandwidth_mbps=prefill.lynx.bandwidth_mbps, residuals_in_flight=len(prefill.residual_plans),
                     deferred_releases=len(prefill.deferred_releases), rows_in_use=prefill.rows.rows_in_use,
                     rows_total=prefill.rows.num_rows, chunks_waiting_for_rows=len(prefill.waiting_chunks))
    if decode is not None:
        queued_rooms = {entry.req.bootstrap_room for entry in scheduler.disagg_decode_prealloc_queue.queue}
        state.update(rows_in_use=decode.rows.rows_in_use, rows_total=decode.rows.num_rows,
                     requests_waiting_for_rows=len(decode.waiting_since.keys() & queued_rooms),
                     **speculation_state())
    result.internal_state["lynx"] = state
    return result


def _lynx_updates(handlers, controller, *args, **kwargs):
    """On a Lynx prefill worker, ``/set_internal_state`` takes ``lynx_bandwidth_mbps``."""
    from sglang.srt.managers.scheduler_components.internal_state import UpdateRejected, _UpdateHandler

    prefill = _lynx_manager(_prefill_manager(controller.scheduler))
    if prefill is None:
        return handlers

    def check(key, mbps):
        try:
            dataclasses.replace(prefill.lynx, bandwidth_mbps=mbps)
        except LynxConfigError as e:
            raise UpdateRejected(str(e)) from None

    def apply(key, mbps):
        prefill.set_bandwidth(mbps)
        logger.info("Lynx: the link now runs at %g Mbit/s", mbps)

    return {**handlers, "lynx_bandwidth_mbps": _UpdateHandler(check, apply)}


def _prefill_manager(scheduler):
    return getattr(getattr(scheduler, "disagg_prefill_bootstrap_queue", None), "kv_manager", None)


def _decode_manager(scheduler):
    return getattr(getattr(scheduler, "disagg_decode_prealloc_queue", None), "kv_manager", None)


def _lynx_manager(manager):
    from sglang_lynx.streams.mooncake import LynxKVManager

    return manager if isinstance(manager, LynxKVManager) else None
