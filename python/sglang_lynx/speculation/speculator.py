"""Speculating on the Anchor: one record per ``lynx`` request, from admission to verification.

On the decode worker a ``lynx`` request goes through:

1. **admitted**: its first stream has landed (Anchor-only prompt KV) and SGLang puts it in the
   running batch, streaming its first token, which prefill computed at full precision;
2. **speculating**: it decodes on the Anchor, batched with every other request, but nothing past
   its first token is streamed, and a stop (EOS, stop string, ``max_tokens``) met on a speculated
   token only ends its speculation. At the cap, or at such a stop, it leaves the batch and waits,
   keeping its KV;
3. **re-drafted**, with a Residual in stages (``--lynx-stages 4,2,2``), when its middle stage lands:
   its prompt pages are rewritten at the bits landed (6 of 8), one pass over its speculated tokens
   gives that KV's predictions, it keeps its tokens up to the first that KV disagrees with, takes
   that KV's token there and speculates on. Nothing is shown: this only makes the drafts likelier
   to survive;
4. **verified**, when its Residual lands (between two decode steps): its prompt pages are rewritten
   with INT8-exact KV, one forward pass over its tokens gives the exact model's predictions, the
   longest agreeing prefix is kept with the exact token after it, the rest is rolled back. The kept
   tokens are streamed at once and the request decodes on as an ordinary one.

A Residual that fails or does not come in time, and an abort, end the request with its verified
tokens only. Requests whose sampling depends on state that SGLang updates token by token (penalties,
grammars, logit bias, seeds, ...) do not speculate: they wait for their Residual after the first
token.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from http import HTTPStatus
from typing import Optional

import torch

from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.mem_cache.common import release_kv_cache

from sglang_lynx.speculation.acceptance import (SamplingParams, Verdict, greedy_verdict, sampled_verdict,
                                                sampling_distribution)
from sglang_lynx.speculation.metrics import SpeculationMetrics
from sglang_lynx.speculation.verify import output_logits, pages_to_verify, truncate_kv
from sglang_lynx.streams import ranks
from sglang_lynx.streams.landing import Anchored, anchored_requests

logger = logging.getLogger(__name__)

VERIFIED = 1  # output tokens that are exact from the start: the first, computed by prefill


class VerificationError(RuntimeError):
    """A speculation that cannot be verified; its request ends with its verified tokens."""


@dataclasses.dataclass
class Speculation:
    req: object
    anchored: Anchored
    cap: int  # speculated tokens allowed before the Residual has landed
    params: SamplingParams
    drafts: list = dataclasses.field(default_factory=list)  # logits each token was sampled from
    stopped: bool = False  # a stop condition was met on a speculated token
    paused: bool = False  # out of the running batch, waiting for the Residual
    refined: Optional[float] = None  # when its prompt KV became INT8-exact; it waits to be verified
    middle: Optional[float] = None  # when its prompt KV was refined to the Residual's middle stage

    @property
    def speculated(self) -> int:
        return len(self.req.output_ids) - VERIFIED


def speculation_blocker(req) -> Optional[str]:
    """Why ``req`` cannot decode on the Anchor, or None. Verification rebuilds the distribution
    each token was drawn from out of the logits alone; these make it depend on more."""
    sp = req.sampling_params
    reasons = {
        "penalties": sp.frequency_penalty or sp.presence_penalty or sp.repetition_penalty != 1.0,
        "min_new_tokens": sp.min_new_tokens > 0,
        "logit_bias": sp.logit_bias,
        "a grammar": req.grammar is not None or sp.json_schema or sp.regex or sp.ebnf or sp.structural_tag,
        "a sampling seed": sp.sampling_seed is not None and sp.top_k != 1,
        "a custom logit processor": req.custom_logit_processor,
        "a watermark": sp.watermark,
        "hidden states": req.return_hidden_states,
        "a sampling mask": req.return_sampling_mask,
    }
    return next((name for name, present in reasons.items() if present), None)


class Speculator:
    """Every speculating request of one decode scheduler, keyed by request id."""

    def __init__(self, max_speculative_tokens: int):
        self.max_speculative_tokens = max_speculative_tokens
        self.records: dict[str, Speculation] = {}
        self.metrics: Optional[SpeculationMetrics] = None
        self.totals = dict.fromkeys(("verified_requests", "verify_passes", "speculated_tokens",
                                     "accepted_tokens", "rolled_back_requests", "draft_mismatches",
                                     "redraft_passes", "redrafted_requests", "redrafted_tokens"), 0)

    def state(self) -> dict:
        return {"speculating": len(self.records), "paused": sum(rec.paused for rec in self.records.values()),
                **self.totals}

    # --- admission ----------------------------------------------------------------------------

    def admit(self, scheduler, reqs: list) -> None:
        """``reqs`` join the waiting queue; the ``lynx`` ones among them start speculating."""
        anchored = anchored_requests(scheduler.disagg_decode_transfer_queue)
        if not anchored:
            return
        if self.metrics is None and scheduler.metrics_reporter.enable_metrics:
            self.metrics = SpeculationMetrics(scheduler.metrics_collector.labels)
        for req in reqs:
            entry = anchored.pop(req.rid, None)
            if entry is None:
                continue
            blocker = speculation_blocker(req)
            cap = 0 if blocker else self.max_speculative_tokens
            sp = req.sampling_params
            self.records[req.rid] = Speculation(req, entry, cap,
                                                SamplingParams(sp.temperature, sp.top_k, sp.top_p, sp.min_p))
            entry.record(speculating_from=time.time(), speculation_cap=cap,
                         **({"not_speculating": blocker} if blocker else {}))

    # --- while decoding -----------------------------------------------------------------------

    def holds_back(self, req) -> bool:
        """Whether ``req`` has tokens no client may see yet."""
        return req.rid in self.records and len(req.output_ids) > VERIFIED

    def guard_finish(self, update_finish_state, req, new_accepted_len: int) -> None:
        """Around ``Req.update_finish_state``: a stop on a speculated token is not final."""
        rec = self.records.get(req.rid)
        if rec is None:
            return update_finish_state(req, new_accepted_len)
        if req.to_finish is not None:  # aborted mid-speculation: it ends with its verified tokens
            self._end(rec, failure=getattr(req.to_finish, "message", "aborted"))
            return update_finish_state(req, 1)
        update_finish_state(req, new_accepted_len)
        if not req.finished():
            return None
        if len(req.output_ids) <= VERIFIED:  # finished on its first token: no Residual needed
            self._end(rec, finished_on_first_token=True)
        else:
            req.finished_reason = req.finished_len = None
            rec.stopped = True
        return None

    def pause(self, batch, everyone: bool = False) -> None:
        """Take out of ``batch`` the requests at their cap or stopped (``everyone``: all speculating)."""
        leaving = []
        for req in batch.reqs:
            rec = self.records.get(req.rid)
            if rec is not None and not rec.paused and (everyone or rec.stopped or rec.speculated >= rec.cap):
                rec.paused = True
                rec.anchored.record(paused=time.time())
                leaving.append(req)
        if leaving:
            batch.filter_batch(reqs_to_exclude=leaving)

    def capture_drafts(self, logits: torch.Tensor, rids: list[str]) -> None:
        """Keep the logits each sampled (not greedy) speculating request draws its next token from.
        ``rids``: the batch's request ids, row by row; a host list, so that finding the rows reads
        nothing back from the device (on a GPU, a sync every decode step)."""
        for i, rid in enumerate(rids):
            rec = self.records.get(rid)
            if rec is not None and not rec.paused and not rec.params.greedy:
                rec.drafts.append(logits[i].float().clone())

    # --- landings ---------------------------------------------------------------------------

    def verify_landed(self, scheduler) -> list:
        """Verify every request whose Residual has landed, re-draft those whose middle stage has;
        return those that decode on."""
        group = scheduler.attn_tp_cpu_group
        waiting = [rec for rec in self.records.values() if rec.refined is None]
        # Every rank takes a Residual up in the same step, once it has come to all of them, and all of
        # them fail the request if its refinement failed on one.
        everywhere = ranks.on_every_rank(group, [rec.anchored.residual_came() for rec in waiting])
        came = [rec for rec, landed in zip(waiting, everywhere) if landed]
        redrafted = self._redraft_landed(scheduler, [rec for rec, landed in zip(waiting, everywhere) if not landed])
        failures = [rec.anchored.take_residual().failure or rec.anchored.refine() for rec in came]
        failed = [(rec, failure or "the Residual did not land on another tensor-parallel rank")
                  for rec, failure, anywhere in zip(came, failures, ranks.on_any_rank(
                      group, [failure is not None for failure in failures])) if anywhere]
        failed_here = {id(rec) for rec, _ in failed}
        for rec in came:
            if id(rec) not in failed_here:
                rec.refined = time.time()
        landed = [rec for rec in self.records.values() if rec.refined is not None]
        _leave_batch(scheduler, [rec.req for rec in landed + [rec for rec, _ in failed]])
        for rec, failure in failed:
            self._finish(scheduler, rec, FINISH_ABORT(f"Lynx KV transfer: {failure}",
                                                      HTTPStatus.INTERNAL_SERVER_ERROR))
        ready = self._with_room(scheduler, landed)
        return redrafted + (self._verify(scheduler, ready) if ready else [])

    def _room_for(self, scheduler, recs: list[Speculation]) -> tuple[list, list]:
        """``recs`` (oldest first) split into those whose pass over their tokens the KV pool has room
        for now, and the others: a failed allocation would stop the scheduler."""
        allocator = scheduler.token_to_kv_pool_allocator
        free = allocator.available_size() // allocator.page_size
        ready, no_room = [], []
        for rec in recs:
            need = pages_to_verify(rec.req, allocator.page_size)
            if need <= free:
                free -= need
                ready.append(rec)
            else:
                no_room.append(rec)
        return ready, no_room

    # --- the middle stage ---------------------------------------------------------------------

    def _redraft_landed(self, scheduler, waiting: list[Speculation]) -> list:
        """Of ``waiting`` (Residual not landed), those whose middle stage has landed on every rank: refine
        their prompt KV to its bits and re-draft their speculated tokens on it. Returns those to put back
        in the batch."""
        group = scheduler.attn_tp_cpu_group
        waiting = [rec for rec in waiting if rec.middle is None and rec.anchored.has_middle]
        came = [rec for rec, everywhere in zip(waiting, ranks.on_every_rank(
            group, [rec.anchored.middle_came() for rec in waiting])) if everywhere]
        failures = [rec.anchored.refine_middle() for rec in came]
        redraft = []
        for rec, failure, anywhere in zip(came, failures, ranks.on_any_rank(
                group, [failure is not None for failure in failures])):
            rec.middle = time.time()
            if anywhere:  # it speculates on as it was: the Residual's own checks decide its fate
                failure = failure or "it did not land on another tensor-parallel rank"
                logger.warning("Lynx: request %s: the Residual's middle stage: %s", rec.req.rid, failure)
                rec.anchored.record(middle_failure=failure)
            elif rec.speculated > 0:
                redraft.append(rec)
        ready, _ = self._room_for(scheduler, redraft)  # without room it keeps its drafts, on the new KV
        return self._redraft(scheduler, ready) if ready else []

    def _redraft(self, scheduler, recs: list[Speculation]) -> list:
        """One pass over the speculated tokens of ``recs`` on their prompt KV at the middle stage's bits.
        Each keeps its tokens up to the first this KV disagrees with and takes this KV's token there
        (greedy: its argmax; sampled: by the speculative-sampling rule, so that every token is then as
        if drawn on this KV, and its distribution is the draft the final pass checks against)."""
        _leave_batch(scheduler, [rec.req for rec in recs])
        _, redraft_s, decided = self._pass(scheduler, recs, "redraft")
        decode_on = []
        for rec, rows, verdict in decided:
            req, speculated = rec.req, rec.speculated
            kept = verdict.accepted
            if kept < speculated:  # past a disagreement the drafts go; this KV's token replaces them
                req.output_ids = req.output_ids[: VERIFIED + kept]  # a copy: SGLang may still hold the old one
                req.output_ids.append(verdict.next_token)
                if req.return_logprob:
                    truncate_logprobs(req, VERIFIED + kept)  # the final pass logs every token's
                rec.stopped = False
                req.update_finish_state(1)  # a stop on the new token ends speculation (guard_finish)
            truncate_kv(req, len(req.origin_input_ids) + len(req.output_ids) - 1, scheduler.tree_cache)
            if not rec.params.greedy:
                rec.drafts = list(rows[: rec.speculated].float().clone())
            rec.anchored.record(redraft_s=redraft_s, redraft_speculated=speculated,
                                redrafted=speculated - kept, redraft_batch=len(recs))
            self.totals["redrafted_requests"] += kept < speculated
            self.totals["redrafted_tokens"] += speculated - kept
            if self.metrics is not None:
                self.metrics.redrafted.inc(speculated - kept)
            rec.paused = rec.stopped or rec.speculated >= rec.cap
            if not rec.paused:
                decode_on.append(req)  # back in the batch: it speculates on, on this KV
        return decode_on

    # --- verification -------------------------------------------------------------------------

    def _with_room(self, scheduler, recs: list[Speculation]) -> list[Speculation]:
        """Those of ``recs`` whose verify pass the KV pool has room for now. The others wait out of the
        batch, KV kept, until requests that finish give pages back; past the KV waiting timeout they end
        with their verified tokens."""
        ready, no_room = self._room_for(scheduler, recs)
        timed_out = ranks.on_any_rank(scheduler.attn_tp_cpu_group, [
            time.time() - rec.refined > rec.anchored.manager.waiting_timeout for rec in no_room])
        for rec, waited_too_long in zip(no_room, timed_out):
            waited = time.time() - rec.refined
            if waited_too_long:
                self._finish(scheduler, rec, FINISH_ABORT(
                    f"Lynx: the decode KV pool had no room to verify this request for {waited:.0f} s",
                    HTTPStatus.SERVICE_UNAVAILABLE))
            elif not rec.paused:
                rec.paused = True
                logger.info("Lynx: request %s waits for room in the KV pool to verify", rec.req.rid)
        return ready

    def _pass(self, scheduler, recs: list[Speculation], kind: str) -> tuple[float, float, list]:
        """One forward pass over the output tokens of ``recs`` on the KV they hold (``kind``: ``verify`` or
        ``redraft``, as counted) -> when it started, its seconds, and (record, its logits, its verdict) of
        each request; one whose drafts cannot be checked ends there with its verified tokens."""
        started = time.time()
        logits = output_logits(scheduler, [rec.req for rec in recs])
        seconds = time.time() - started
        self.totals[f"{kind}_passes"] += 1
        if self.metrics is not None:
            self.metrics.passes[kind].inc()
        decided = []
        for rec, rows in zip(recs, logits):
            try:
                decided.append((rec, rows, self._decide(rec, rows)))
            except VerificationError as e:
                self._finish(scheduler, rec, FINISH_ABORT(f"Lynx verification: {e}", HTTPStatus.INTERNAL_SERVER_ERROR))
        return started, seconds, decided

    def _verify(self, scheduler, recs: list[Speculation]) -> list:
        started, verify_s, decided = self._pass(scheduler, recs, "verify")
        decode_on = []
        for rec, rows, verdict in decided:
            req = rec.req
            del self.records[req.rid]
            speculated = rec.speculated
            kept = [*req.output_ids[VERIFIED: VERIFIED + verdict.accepted], verdict.next_token]
            req.output_ids = req.output_ids[:VERIFIED]
            req.output_ids.extend(kept)
            # KV stays for the tokens before the new last one (its own is written by the next step).
            truncate_kv(req, len(req.origin_input_ids) + len(req.output_ids) - 1, scheduler.tree_cache)
            rec.anchored.close(residual_applied=started, verify_s=verify_s, speculated=speculated,
                               accepted=verdict.accepted, rolled_back=speculated - verdict.accepted,
                               verify_batch=len(recs))
            self._count(speculated, verdict)
            req.update_finish_state(len(kept))
            if req.return_logprob:
                _replace_logprobs(req, rows, rec.params)
            if req.finished():
                release_kv_cache(req, scheduler.tree_cache, checkpoint=True)
                req.time_stats.set_completion_time()
                scheduler.output_streamer.stream_output([req], req.return_logprob)
            else:
                decode_on.append(req)  # SGLang re-admits it: it streams the kept tokens, then decodes
        return decode_on

    def _count(self, speculated: int, verdict: Verdict) -> None:
        self.totals["verified_requests"] += 1
        self.totals["speculated_tokens"] += speculated
        self.totals["accepted_tokens"] += verdict.accepted
        self.totals["rolled_back_requests"] += verdict.accepted < speculated
        self.totals["draft_mismatches"] += verdict.draft_mismatches
        if self.metrics is not None:
            self.metrics.verified(speculated, verdict.accepted, verdict.draft_mismatches)

    def _decide(self, rec: Speculation, rows: torch.Tensor) -> Verdict:
        draft = torch.tensor(rec.req.output_ids[VERIFIED:], dtype=torch.long, device=rows.device)
        if rec.params.greedy:
            return greedy_verdict(draft, rows)
        if len(rec.drafts) != len(draft):
            raise VerificationError(f"{len(draft)} speculated tokens but {len(rec.drafts)} draft distributions")
        q = sampling_distribution(torch.stack(rec.drafts), rec.params) if rec.drafts else rows[:0].float()
        return sampled_verdict(draft, q, sampling_distribution(rows, rec.params))

    # --- ends ---------------------------------------------------------------------------------

    def abort(self, scheduler, abort_req) -> None:
        """After SGLang's ``abort_request``: end the matching speculating requests it cannot see."""
        for rec in list(self.records.values()):
            req = rec.req
            if not (abort_req.abort_all or req.rid.startswith(abort_req.rid)):
                continue
            if req.finished():  # SGLang aborted it in its waiting queue and freed it
                self._end(rec, failure="aborted")
            elif rec.paused:  # out of every SGLang queue: end it here
                self._finish(scheduler, rec, FINISH_ABORT(abort_req.abort_message, HTTPStatus.SERVICE_UNAVAILABLE)
                             if abort_req.abort_message else FINISH_ABORT())
            # else it is in the running batch: SGLang finishes it after one more step (guard_finish)

    def _finish(self, scheduler, rec: Speculation, reason) -> None:
        """End a request that is out of the running batch, with its verified tokens only."""
        req = rec.req
        self._end(rec, failure=reason.message)
        logger.warning("Lynx: request %s ends after its first token: %s", req.rid, reason.message)
        req.finished_reason = reason
        release_kv_cache(req, scheduler.tree_cache, checkpoint=False)
        scheduler.output_streamer.stream_output([req], req.return_logprob)

    def _end(self, rec: Speculation, **fields) -> None:
        """Forget a speculation that will not be verified: drop its unverified tokens."""
        req = rec.req
        del self.records[req.rid]
        req.output_ids = req.output_ids[:VERIFIED]
        if req.return_logprob:
            truncate_logprobs(req, VERIFIED)
        rec.anchored.close(speculated=rec.speculated, **fields)


def _leave_batch(scheduler, reqs: list) -> None:
    """Take ``reqs`` out of the scheduler's queues for a pass of their own. Between two steps a request
    is in the running batch, or (admitted beyond the batch size) still in the waiting queue, or paused."""
    leaving = {id(req) for req in reqs}
    in_batch = [req for req in scheduler.running_batch.reqs if id(req) in leaving]
    if in_batch:
        scheduler.running_batch.filter_batch(reqs_to_exclude=in_batch)
    scheduler.waiting_queue = [req for req in scheduler.waiting_queue if id(req) not in leaving]


_LOGPROB_LISTS = ("output_token_logprobs_val", "output_token_logprobs_idx", "output_top_logprobs_val",
                  "output_top_logprobs_idx", "output_token_ids_logprobs_val", "output_token_ids_logprobs_idx")


def truncate_logprobs(req, n: int) -> None:
    """Keep the logprobs of ``req``'s first ``n`` output tokens."""
    for name in _LOGPROB_LISTS:
        values = getattr(req.logprob, name)
        if values is not None:
            del values[n:]


def _replace_logprobs(req, rows: torch.Tensor, params: SamplingParams) -> None:
    """The exact model's logprobs for the output tokens after the first ``VERIFIED`` (``rows[j]``
    predicts output token ``VERIFIED + j``), as SGLang's sampler reports them: log softmax(logits / T),
    before top-k/top-p/min-p (T = 1 when greedy). Called after ``update_finish_state``: the kept tokens
    can go on past a stop (EOS, stop string, ``max_tokens``), and those are no output."""
    lp = req.logprob
    tokens = req.output_ids_through_stop[VERIFIED:]
    truncate_logprobs(req, VERIFIED)
    temperature = 1.0 if params.greedy else params.temperature
    logprobs = torch.log_softmax(rows[: len(tokens)].float() / temperature, dim=-1)
    logprobs.clamp_(min=torch.finfo(logprobs.dtype).min)
    for row, token in zip(logprobs, tokens):
        lp.output_token_logprobs_val.append(row[token].item())
        lp.output_token_logprobs_idx.append(token)
        if lp.top_logprobs_num > 0:
            values, indices = row.topk(lp.top_logprobs_num)
            lp.output_top_logprobs_val.append(values.tolist())
            lp.output_top_logprobs_idx.append(indices.tolist())
        if lp.token_ids_logprob is not None:
            lp.output_token_ids_logprobs_val.append(row[list(lp.token_ids_logprob)].tolist())
            lp.output_token_ids_logprobs_idx.append(list(lp.token_ids_logprob))
