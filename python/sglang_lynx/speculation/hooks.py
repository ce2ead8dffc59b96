"""The SGLang hooks of speculation (registered in ``sglang_lynx.plugin``), each a thin adapter
onto the decode scheduler's :class:`Speculator`."""

from __future__ import annotations

from typing import Optional

from sglang_lynx.config import LynxConfig
from sglang_lynx.speculation import verify
from sglang_lynx.speculation.speculator import Speculator, truncate_logprobs

RESIDUAL_POLL_S = 0.005  # an idle decode worker waiting for Residuals wakes at least this often

_speculator: Optional[Speculator] = None


def speculator() -> Speculator:
    """This process's speculator (a decode scheduler has one)."""
    global _speculator
    if _speculator is None:
        _speculator = Speculator(LynxConfig.from_env().max_speculative_tokens)
    return _speculator


def _speculating() -> bool:
    return _speculator is not None and bool(_speculator.records)


def admit(original, queue, *args, **kwargs):
    """AROUND ``DecodeTransferQueue.pop_transferred``: ``lynx`` requests start speculating."""
    ready = original(queue, *args, **kwargs)
    if ready:
        speculator().admit(queue.scheduler, ready)
    return ready


def verify_landed(result, scheduler, *args, **kwargs):
    """AFTER ``process_decode_queue`` (between two steps): verify requests whose Residual landed."""
    if _speculating():
        decode_on = _speculator.verify_landed(scheduler)  # may rebuild the waiting queue
        scheduler.waiting_queue.extend(decode_on)
    return result


def guard_finish(original, req, new_accepted_len: int = 1):
    """AROUND ``Req.update_finish_state``: a stop on a speculated token only ends speculation."""
    if not _speculating():
        return original(req, new_accepted_len)
    return _speculator.guard_finish(original, req, new_accepted_len)


def log_kept_tokens_only(result, processor, *args, req, **kwargs):
    """AFTER ``SchedulerBatchResultProcessor._apply_decode_logprobs``, which SGLang runs after
    ``Req.update_finish_state``: where an abort there cut a speculating request back to its verified
    tokens, the logprobs just logged are those of a token it no longer has. Every request passes:
    the aborted one's record is gone by now, and any other has no more logprobs than output tokens."""
    truncate_logprobs(req, len(req.output_ids))
    return result


def stream_verified(original, streamer, reqs, *args, **kwargs):
    """AROUND ``OutputStreamer.stream_output``: requests holding unverified tokens are not streamed."""
    if _speculating():
        reqs = [req for req in reqs if not _speculator.holds_back(req)]
    return original(streamer, reqs, *args, **kwargs)


def pause_at_cap(original, scheduler, batch):
    """AROUND ``Scheduler.update_running_batch``: requests at their cap or stopped leave the batch."""
    if _speculating():
        _speculator.pause(batch)
    return original(scheduler, batch)


def keep_from_retraction(original, batch):
    """AROUND ``ScheduleBatch.retract_decode``: a retracted request would be re-admitted with all its
    tokens shown; speculating requests pause instead, keeping their KV."""
    if _speculating():
        _speculator.pause(batch, everyone=True)
        if batch.is_empty():
            return [], 1.0, []
    return original(batch)


def capture_drafts(original, runner, logits_output, forward_batch):
    """AROUND ``ModelRunner.sample``: keep the logits sampled speculated tokens are drawn from
    (sampling overwrites them)."""
    if _speculating() and forward_batch.forward_mode.is_decode():
        _speculator.capture_drafts(logits_output.next_token_logits, forward_batch.rids)
    return original(runner, logits_output, forward_batch)


def verify_attention(original, backend, *args, **kwargs):
    """AROUND ``TorchNativeAttnBackend._run_sdpa_forward_extend``: the verify pass attends from its
    new tokens only; every other extend (prefill) keeps SGLang's own attention and numerics."""
    output = verify.attend_new_tokens(*args, **kwargs)
    return original(backend, *args, **kwargs) if output is None else output


def abort_paused(result, scheduler, abort_req, *args, **kwargs):
    """AFTER ``Scheduler.abort_request``: paused requests are in none of SGLang's queues."""
    if _speculating():
        _speculator.abort(scheduler, abort_req)
    return result


def has_work() -> bool:
    """Speculating requests hold KV and wait for Residuals: the scheduler is not idle."""
    return _speculating()


def speculation_state() -> dict:
    """For ``/server_info``: requests speculating now, and totals since start."""
    if _speculator is None:
        return {"speculating": 0}
    return _speculator.state()


def wait_for_residual(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.on_idle``: with nothing to run but requests waiting for their Residual,
    sleep until one lands (briefly) instead of spinning."""
    if _speculating():
        scheduler.disagg_decode_prealloc_queue.kv_manager.wait_for_residual(RESIDUAL_POLL_S)
    return result
