"""Which speculated tokens verification keeps: the greedy rule, the speculative-sampling rule, and the
distributions they are computed from (pure functions on logits); what a verified request keeps, on
SGLang's own request object. The end-to-end behaviour on real servers is in test_e2e_lynx.py."""

from array import array
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from scipy.stats import chisquare

from sglang_lynx.speculation.acceptance import (SamplingParams, Verdict, greedy_verdict, sampled_verdict,
                                                sampling_distribution)
from sglang_lynx.speculation.speculator import Speculation, Speculator

GREEDY = SamplingParams(top_k=1)


def logits_predicting(tokens, vocab=10):
    """Logits whose argmax at row j is tokens[j]."""
    rows = torch.zeros(len(tokens), vocab)
    rows[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return rows


def test_greedy_keeps_the_longest_agreeing_prefix_and_corrects_the_first_divergence():
    exact = logits_predicting([3, 4, 9, 1])  # the exact model would say 3, 4, 9, then 1
    assert greedy_verdict(torch.tensor([3, 4, 5]), exact) == Verdict(2, 9)


def test_greedy_adds_the_exact_token_after_a_fully_accepted_run():
    assert greedy_verdict(torch.tensor([3, 4, 9]), logits_predicting([3, 4, 9, 1])) == Verdict(3, 1)


def test_greedy_with_nothing_speculated_gives_the_exact_next_token():
    assert greedy_verdict(torch.tensor([], dtype=torch.long), logits_predicting([7])) == Verdict(0, 7)


def test_greedy_rejects_at_the_first_token_even_if_later_ones_agree():
    assert greedy_verdict(torch.tensor([2, 4, 9]), logits_predicting([3, 4, 9, 1])) == Verdict(0, 3)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
])
def test_distributions_are_the_ones_sglang_s_sampler_draws_from(params):
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    probs = torch.softmax(logits / params.temperature, dim=-1)
    n = len(logits)
    _, weights, order, _ = top_k_top_p_min_p_sampling_from_probs_torch(
        probs.clone(), torch.full((n,), params.top_k), torch.full((n,), params.top_p),
        torch.full((n,), params.min_p), params.min_p > 0, None, None, return_filtered_probs=True)
    sglang = torch.zeros_like(probs).scatter_(-1, order.long(), weights)
    torch.testing.assert_close(sampling_distribution(logits, params), sglang / sglang.sum(-1, keepdim=True))


def test_greedy_distribution_is_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])
    assert sampling_distribution(logits, GREEDY).tolist() == [[0, 1, 0], [1, 0, 0]]


VOCAB, STEPS, SAMPLES = 6, 3, 20000


def outputs_of(rule, p, q, seed):
    """Run ``rule`` on drafts drawn from q; return the first two output tokens of every run (where
    verification stopped before the second, the exact model draws it from p[1], as decoding would)."""
    g = torch.Generator().manual_seed(seed)
    firsts, seconds = [], []
    for _ in range(SAMPLES):
        draft = torch.multinomial(q, 1, generator=g).view(-1)
        verdict = rule(draft, q, p, g)
        tokens = [*draft[:verdict.accepted].tolist(), verdict.next_token]
        if len(tokens) < 2:
            tokens.append(int(torch.multinomial(p[1], 1, generator=g)))
        firsts.append(tokens[0])
        seconds.append(tokens[1])
    return torch.tensor(firsts), torch.tensor(seconds)


def chi_square_p_value(samples, expected_probs):
    observed = torch.bincount(samples, minlength=len(expected_probs)).double()
    expected = expected_probs.double() * len(samples)
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a token with probability 0 was produced"
    return chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue


def accept_every_draft(draft, q, p, g):
    """Wrong on purpose: decoding on the Anchor alone, without verification."""
    return Verdict(len(draft), int(torch.multinomial(p[len(draft)], 1, generator=g)))


def target_and_draft(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(STEPS + 1, VOCAB, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(STEPS, VOCAB, generator=g) * 1.5, dim=-1)  # far from p on purpose
    p[0, 5] = 0.0  # a token the exact model never says at step 0 ...
    p[0] /= p[0].sum()
    return p, q  # ... that the draft proposes


def test_speculative_sampling_outputs_the_exact_model_s_distribution():
    """Chi-square goodness of fit at significance 0.001 (fixed seeds: the verdict is reproducible)."""
    p, q = target_and_draft()
    firsts, seconds = outputs_of(lambda d, q_, p_, g: sampled_verdict(d, q_, p_, g), p, q, seed=1)
    assert chi_square_p_value(firsts, p[0]) > 1e-3
    assert chi_square_p_value(seconds, p[1]) > 1e-3


def test_the_same_check_rejects_unverified_speculation():
    p, q = target_and_draft()
    firsts, _ = outputs_of(accept_every_draft, p, q, seed=1)
    with pytest.raises(AssertionError, match="probability 0"):
        chi_square_p_value(firsts, p[0])
    p[0, 5], q[0, 5] = 0.01, 0.01  # without the impossible token, the distribution itself is wrong
    firsts, _ = outputs_of(accept_every_draft, p, q, seed=2)
    assert chi_square_p_value(firsts, p[0] / p[0].sum()) < 1e-6


def test_a_draft_the_exact_model_agrees_with_is_always_kept():
    p = torch.softmax(torch.randn(4, VOCAB), dim=-1)
    draft = torch.multinomial(p[:3], 1).view(-1)
    for seed in range(50):
        assert sampled_verdict(draft, p[:3], p, torch.Generator().manual_seed(seed)).accepted == 3


# q is rebuilt from the draft logits; at a top-k/top-p tie it can leave out the token SGLang's sampler drew.
OUTSIDE_Q = torch.tensor([[0.0, 0.5, 0.5]])  # token 0 drafted, yet q gives it nothing


def test_a_drafted_token_the_exact_model_rules_out_is_never_kept_even_where_q_gives_it_nothing():
    p = torch.tensor([[0.0, 0.3, 0.7], [0.2, 0.3, 0.5]])
    for seed in range(50):
        verdict = sampled_verdict(torch.tensor([0]), OUTSIDE_Q, p, torch.Generator().manual_seed(seed))
        assert verdict.accepted == 0 and verdict.next_token != 0


def test_a_drafted_token_q_gives_nothing_is_kept_when_the_exact_model_can_say_it():
    p = torch.tensor([[0.1, 0.2, 0.7], [0.2, 0.3, 0.5]])
    for seed in range(50):
        assert sampled_verdict(torch.tensor([0]), OUTSIDE_Q, p, torch.Generator().manual_seed(seed)).accepted == 1


def test_drafted_tokens_q_gives_nothing_are_counted_whatever_the_verdict():
    q = torch.tensor([[0.0, 0.5, 0.5], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    p = torch.full((4, 3), 1 / 3)
    assert sampled_verdict(torch.tensor([0, 2, 1]), q, p).draft_mismatches == 2


def extend_case(prefixes, news, heads=4, kv_heads=2, dim=16, seed=0):
    """A KV pool and queries for sequences with cached prefixes, in SGLang's extend layout."""
    g = torch.Generator().manual_seed(seed)
    totals = [p + n for p, n in zip(prefixes, news)]
    slots = torch.randperm(sum(totals) + 8, generator=g)
    req_to_token = torch.zeros(len(totals), max(totals), dtype=torch.long)
    start = 0
    for i, total in enumerate(totals):
        req_to_token[i, :total] = slots[start:start + total]
        start += total
    k_cache, v_cache = (torch.randn(len(slots), kv_heads, dim, generator=g) for _ in range(2))
    query = torch.randn(sum(news), heads, dim, generator=g)
    lens = lambda xs: torch.tensor(xs, dtype=torch.long)
    return (query, k_cache, v_cache, req_to_token, torch.arange(len(totals)), lens(totals), lens(prefixes),
            lens(news))


@pytest.mark.parametrize("prefixes, news", [([40, 3], [3, 9]), ([100, 64, 7], [33, 1, 5])])
def test_verify_attention_attends_from_the_new_tokens_only_and_agrees_with_sglang(prefixes, news):
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from sglang_lynx.speculation.verify import attend_new_tokens, verify_pass

    query, k, v, req_to_token, pool_idx, seq_lens, prefix_lens, new_lens = extend_case(prefixes, news)
    run = lambda fn, *head: fn(*head, query, torch.empty_like(query), k, v, req_to_token, pool_idx, seq_lens,
                               prefix_lens, new_lens, None, scaling=0.25, enable_gqa=True, causal=True)
    sglang = run(TorchNativeAttnBackend._run_sdpa_forward_extend, None)
    assert run(attend_new_tokens) is None, "outside the verify pass SGLang's attention runs"
    with verify_pass():
        ours = run(attend_new_tokens)
    torch.testing.assert_close(ours, sglang, rtol=1e-5, atol=1e-6)


def speculating_req(tokens, **sampling):
    """An SGLang request asking for logprobs (its 2 top ones, and those of tokens 0 and 1), whose output
    is ``tokens``: its first token and those it speculated, each logged as SGLang's decode step logs it."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams as RequestParams

    params = RequestParams(**sampling)
    params.normalize(None)
    req = Req("speculating", "", array("q", [1, 2, 3]), params, return_logprob=True, top_logprobs_num=2,
              token_ids_logprob=[0, 1], vocab_size=10)
    req.output_ids.extend(tokens)
    lp = req.logprob
    for token in tokens:
        lp.output_token_logprobs_val.append(-1.0)
        lp.output_token_logprobs_idx.append(token)
        lp.output_top_logprobs_val.append([-1.0, -2.0])
        lp.output_top_logprobs_idx.append([token, 0])
        lp.output_token_ids_logprobs_val.append([-3.0, -3.0])
        lp.output_token_ids_logprobs_idx.append([0, 1])
    return req


def logprob_lists(req) -> dict:
    return {name: getattr(req.logprob, f"output_{name}") for name in (
        "token_logprobs_val", "token_logprobs_idx", "top_logprobs_val", "top_logprobs_idx",
        "token_ids_logprobs_val", "token_ids_logprobs_idx")}


class Landed:
    """Stands in for a request's Anchor-only KV whose Residual has landed."""

    manager = SimpleNamespace(waiting_timeout=30)

    def residual_came(self):
        return True

    def take_residual(self):
        return SimpleNamespace(failure=None)

    def refine(self):
        return None

    def record(self, **fields):
        pass

    def close(self, failure=None, **fields):
        pass


class MiddleLanded(Landed):
    """Stands in for a request's Anchor-only KV whose Residual's middle stage has landed, not its last."""

    has_middle = True

    def residual_came(self):
        return False

    def middle_came(self):
        return True

    def refine_middle(self):
        return None


def speculating(req, params=GREEDY, drafts=()) -> Speculator:
    speculator = Speculator(max_speculative_tokens=8)
    speculator.records[req.rid] = Speculation(req, Landed(), 8, params, drafts=list(drafts))
    return speculator


def verify(monkeypatch, speculator, exact_rows, free_pages=100, page_size=4):
    """The speculator's verification, ``exact_rows`` the exact model's logits at the output positions
    after the first, on a scheduler without KV whose pool has ``free_pages`` free pages."""
    from sglang_lynx.speculation import speculator as module

    passes = []
    monkeypatch.setattr(module, "output_logits", lambda scheduler, reqs: passes.append(reqs) or [exact_rows])
    monkeypatch.setattr(module, "truncate_kv", lambda *args: None)
    monkeypatch.setattr(module, "release_kv_cache", lambda *args, **kwargs: None)
    allocator = SimpleNamespace(page_size=page_size, available_size=lambda: free_pages * page_size)
    scheduler = SimpleNamespace(running_batch=SimpleNamespace(reqs=[], filter_batch=lambda **kwargs: None),
                                attn_tp_cpu_group=dist.ProcessGroupGloo(dist.HashStore(), 0, 1),  # one rank
                                waiting_queue=[], tree_cache=None, token_to_kv_pool_allocator=allocator,
                                output_streamer=SimpleNamespace(stream_output=lambda reqs, return_logprob: None))
    decode_on = speculator.verify_landed(scheduler)
    return decode_on, passes


class OnDevice(torch.Tensor):
    """A tensor standing for one in GPU memory: reading its values on the host (a device sync) fails."""

    HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.numpy,
                  torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__float__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.HOST_READS:
            raise AssertionError(f"{func.__name__} reads a device tensor on the host")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_each_decode_step_keeps_the_logits_sampled_speculating_requests_draw_from_without_a_device_sync(
        monkeypatch):
    """Around ``ModelRunner.sample``: the rows of the batch's logits belonging to sampled speculating
    requests are kept (not those of greedy, paused or other requests), and nothing is read back from
    the device to find them."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from sglang_lynx.speculation import hooks

    speculator = Speculator(max_speculative_tokens=8)
    sampled = SamplingParams(temperature=1.0, top_k=5)
    for pool_idx, (rid, params, paused) in enumerate([("sampled", sampled, False), ("greedy", GREEDY, False),
                                                      ("paused", sampled, True)]):
        req = speculating_req([5])
        req.rid, req.kv.req_pool_idx = rid, pool_idx
        speculator.records[rid] = Speculation(req, Landed(), 8, params, paused=paused)
    monkeypatch.setattr(hooks, "_speculator", speculator)
    logits = torch.randn(4, 10).as_subclass(OnDevice)
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, rids=["other", "paused", "sampled", "greedy"],
                            req_pool_indices=torch.tensor([7, 2, 0, 1]).as_subclass(OnDevice))
    sample = lambda runner, logits_output, forward_batch: "next tokens"  # SGLang's sampler
    for step in range(2):
        output = SimpleNamespace(next_token_logits=logits * step)
        assert hooks.capture_drafts(sample, None, output, batch) == "next tokens"
    drafts = {rid: rec.drafts for rid, rec in speculator.records.items()}
    assert [len(d) for d in drafts.values()] == [2, 0, 0]
    assert all(torch.equal(draft, logits[2] * step) for step, draft in enumerate(drafts["sampled"]))


def test_the_server_counts_sampled_tokens_outside_their_rebuilt_draft_distribution(monkeypatch):
    params = SamplingParams(temperature=1.0, top_k=2)
    draft_logits = torch.tensor([1.0, 3.0, 3.0, 0, 0, 0, 0, 0, 0, 0])  # q: tokens 1 and 2 only ...
    speculator = speculating(speculating_req([5, 0]), params, drafts=[draft_logits])  # ... 0 was drawn
    verify(monkeypatch, speculator, logits_predicting([0, 4]))
    assert speculator.state()["draft_mismatches"] == 1


def holding_kv(req, tokens: int):
    req.kv.kv_allocated_len = tokens
    return req


def test_a_verify_pass_the_kv_pool_has_no_room_for_waits_out_of_the_batch_and_runs_once_pages_are_free(monkeypatch):
    # 3 prompt tokens and 2 output tokens, KV for 4 of them: one full 4-token page; the pass needs a second
    req = holding_kv(speculating_req([5, 6]), 4)
    speculator = speculating(req)
    decode_on, passes = verify(monkeypatch, speculator, logits_predicting([6, 8]), free_pages=0)
    assert decode_on == [] and passes == [] and not req.finished()
    assert speculator.state()["paused"] == 1
    decode_on, passes = verify(monkeypatch, speculator, logits_predicting([6, 8]), free_pages=1)
    assert decode_on == [req] and passes == [[req]] and list(req.output_ids) == [5, 6, 8]
    assert speculator.state()["speculating"] == 0


def test_a_verify_pass_within_the_pages_a_request_holds_runs_with_the_pool_full(monkeypatch):
    req = holding_kv(speculating_req([5, 6, 7, 8, 9]), 7)  # 8 tokens: the two pages it holds
    decode_on, passes = verify(monkeypatch, speculating(req), logits_predicting([6, 7, 8, 9, 1]), free_pages=0)
    assert decode_on == [req] and passes == [[req]]


def test_requests_the_pool_has_room_for_verify_oldest_first_and_the_others_wait(monkeypatch):
    older, newer = (holding_kv(speculating_req([5, 6]), 4) for _ in range(2))
    newer.rid = "newer"
    speculator = speculating(older)
    speculator.records[newer.rid] = Speculation(newer, Landed(), 8, GREEDY)
    decode_on, passes = verify(monkeypatch, speculator, logits_predicting([6, 8]), free_pages=1)
    assert decode_on == [older] and passes == [[older]]
    assert list(speculator.records) == ["newer"] and speculator.records["newer"].paused


def test_a_request_left_without_room_to_verify_past_the_kv_waiting_timeout_ends_with_its_first_token(monkeypatch):
    req = holding_kv(speculating_req([5, 6]), 4)
    speculator = speculating(req)
    verify(monkeypatch, speculator, logits_predicting([6, 8]), free_pages=0)
    speculator.records[req.rid].refined -= Landed.manager.waiting_timeout + 1
    decode_on, passes = verify(monkeypatch, speculator, logits_predicting([6, 8]), free_pages=0)
    assert decode_on == [] and passes == [] and list(req.output_ids) == [5]
    assert req.finished() and "no room to verify" in req.finished_reason.message


@pytest.mark.parametrize("stop", [{"max_new_tokens": 3}, {"stop_token_ids": [7]}])
def test_a_verified_run_that_stops_before_its_bonus_token_has_logprobs_for_its_output_tokens_only(
        monkeypatch, stop):
    req = speculating_req([5, 6, 7], **stop)  # 6 and 7 speculated; 7 is the third token, or a stop token
    exact = logits_predicting([6, 7, 8])  # both kept; the bonus token 8 comes after the stop
    verify(monkeypatch, speculating(req), exact)
    assert req.finished() and list(req.output_ids_through_stop) == [5, 6, 7]
    assert {name: len(values) for name, values in logprob_lists(req).items()} == dict.fromkeys(logprob_lists(req), 3)
    assert req.logprob.output_token_logprobs_idx == [5, 6, 7]
    exact_logprobs = torch.log_softmax(exact, dim=-1)
    assert req.logprob.output_token_logprobs_val[1:] == pytest.approx([exact_logprobs[0, 6].item(),
                                                                        exact_logprobs[1, 7].item()])


def with_lynx_hooks(target: str):
    """SGLang's function at ``target``, wrapped as SGLang's hook registry wraps it in the hooks that
    ``lynx`` mode registers there."""
    import pkgutil

    from sglang.srt.plugins.hook_registry import _wrap_fn

    from sglang_lynx.plugin import lynx_hooks

    function = pkgutil.resolve_name(target)
    for hooked, hook, kind in lynx_hooks("lynx"):
        if hooked == target:
            function = _wrap_fn(function, hook, kind)
    return function


def test_an_abort_mid_speculation_leaves_no_logprob_past_the_verified_first_token(monkeypatch):
    """One request's share of SGLang's decode step (``process_batch_result_decode``), in SGLang's order,
    when an abort comes while it speculates: the decoded token is appended, ``update_finish_state`` ends
    the request (Lynx cuts it back to its first token), then the decoded token's logprobs are logged."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sglang_lynx.speculation import hooks

    req = speculating_req([5, 6, 7])
    monkeypatch.setattr(hooks, "_speculator", speculating(req))
    req.to_finish = FINISH_ABORT()
    req.output_ids.append(8)
    with_lynx_hooks("sglang.srt.managers.schedule_batch.Req.update_finish_state")(req, 1)
    decoded = SimpleNamespace(next_token_top_logprobs_val=[[-0.5, -2.0]], next_token_top_logprobs_idx=[[8, 0]],
                              next_token_token_ids_logprobs_val=[[-3.0, -3.0]],
                              next_token_token_ids_logprobs_idx=[[0, 1]])
    with_lynx_hooks("sglang.srt.managers.scheduler_components.batch_result_processor."
                    "SchedulerBatchResultProcessor._apply_decode_logprobs")(
        None, req=req, i=0, batch=SimpleNamespace(spec_algorithm=SpeculativeAlgorithm.NONE), next_token_id=[8],
        next_token_logprobs=[-0.5], logits_output=decoded)
    assert req.finished() and list(req.output_ids) == [5]
    assert {name: len(values) for name, values in logprob_lists(req).items()} == dict.fromkeys(logprob_lists(req), 1)
    assert req.logprob.output_token_logprobs_idx == [5]


def at_middle_stage(req, params=GREEDY, drafts=(), cap=8, paused=False) -> Speculator:
    speculator = Speculator(max_speculative_tokens=cap)
    speculator.records[req.rid] = Speculation(req, MiddleLanded(), cap, params, drafts=list(drafts), paused=paused)
    return speculator


def test_at_the_middle_stage_drafts_are_kept_up_to_the_first_the_refined_kv_disagrees_with_and_replaced_there(
        monkeypatch):
    req = speculating_req([5, 6, 7, 8])  # 5 from prefill; 6, 7, 8 drafted on the Anchor
    speculator = at_middle_stage(req)
    decode_on, passes = verify(monkeypatch, speculator, logits_predicting([6, 9, 1, 2]))  # on 6 bits: 6, then 9
    assert passes == [[req]] and decode_on == [req]  # back in the batch, drafting on
    assert list(req.output_ids) == [5, 6, 9] and speculator.holds_back(req)  # nothing shown: 6 and 9 are drafts
    assert logprob_lists(req)["token_logprobs_idx"] == [5, 6]  # the final pass logs every token's
    assert speculator.state()["redrafted_tokens"] == 2 and speculator.state()["redraft_passes"] == 1
    decode_on, passes = verify(monkeypatch, speculator, logits_predicting([6, 9, 1]))
    assert passes == [] and decode_on == []  # once per request


def test_at_the_middle_stage_drafts_the_refined_kv_agrees_with_all_stay(monkeypatch):
    req = speculating_req([5, 6, 7])
    speculator = at_middle_stage(req)
    decode_on, _ = verify(monkeypatch, speculator, logits_predicting([6, 7, 3]))
    assert decode_on == [req] and list(req.output_ids) == [5, 6, 7]
    assert speculator.state()["redrafted_tokens"] == 0 and speculator.state()["redrafted_requests"] == 0


def test_a_request_at_its_cap_whose_drafts_all_stay_waits_out_of_the_batch_and_one_cut_back_drafts_on(monkeypatch):
    whole = speculating_req([5, 6, 7])
    speculator = at_middle_stage(whole, cap=2, paused=True)
    assert verify(monkeypatch, speculator, logits_predicting([6, 7, 3]))[0] == []
    assert speculator.records[whole.rid].paused
    cut = speculating_req([5, 6, 7])
    speculator = at_middle_stage(cut, cap=2, paused=True)
    assert verify(monkeypatch, speculator, logits_predicting([4, 7, 3]))[0] == [cut]
    assert list(cut.output_ids) == [5, 4] and not speculator.records[cut.rid].paused


def test_sampled_drafts_kept_at_the_middle_stage_are_then_checked_against_the_refined_kv_s_distributions(monkeypatch):
    """Accepted by the speculative-sampling rule against the middle stage's distributions, the tokens are
    as if drawn from those: they become the drafts the final pass checks against."""
    params = SamplingParams(temperature=1.0, top_k=3)
    anchor = logits_predicting([6, 7])  # the drafts' own distributions, on the Anchor
    middle = logits_predicting([6, 7, 2]) * 2  # more sure of the same tokens: every draft is accepted
    req = speculating_req([5, 6, 7])
    speculator = at_middle_stage(req, params, drafts=list(anchor))
    verify(monkeypatch, speculator, middle)
    drafts = speculator.records[req.rid].drafts
    assert list(req.output_ids) == [5, 6, 7] and len(drafts) == 2
    assert all(torch.equal(draft, row) for draft, row in zip(drafts, middle))
