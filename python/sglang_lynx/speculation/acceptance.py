"""Which speculated tokens survive verification: pure functions on token ids and logits.

Greedy decoding keeps the longest prefix of speculated tokens equal to the exact model's argmax and
adds the exact model's token after it. Sampling uses the speculative-sampling rule (Leviathan et
al., Chen et al.): accept a drafted token x with probability min(1, p(x) / q(x)); at the first
rejection draw from normalise(max(0, p - q)). Either way the output has the distribution of
decoding with the exact model alone.

Distributions are the ones SGLang's sampler draws from (``layers/sampler.py``): softmax(logits / T),
then top-k (by rank), top-p (on the sorted cumulative mass) and min-p, renormalised. ``top_k == 1``
is SGLang's encoding of greedy decoding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class SamplingParams(NamedTuple):
    temperature: float = 1.0
    top_k: int = 1 << 30
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


class Verdict(NamedTuple):
    accepted: int  # leading speculated tokens kept
    next_token: int  # the exact model's token after them (correction or bonus)
    draft_mismatches: int = 0  # speculated tokens to which the rebuilt draft distribution gives no mass


def sampling_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[n, V] logits -> [n, V] float32 probabilities that SGLang's sampler would draw from."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k >= probs.shape[-1] and params.top_p >= 1.0 and params.min_p <= 0.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cumulative = sorted_probs.cumsum(dim=-1)
    sorted_probs[:, params.top_k:] = 0.0
    sorted_probs[(cumulative - sorted_probs) > params.top_p] = 0.0
    if params.min_p > 0.0:
        sorted_probs[sorted_probs < sorted_probs[:, :1] * params.min_p] = 0.0
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def greedy_verdict(draft: torch.Tensor, exact_logits: torch.Tensor) -> Verdict:
    """draft [s] speculated tokens; exact_logits [s + 1, V]: row j predicts the token after draft[j - 1]
    (row 0 the first speculated one)."""
    target = exact_logits.argmax(-1)
    matches = (draft == target[: len(draft)]).long()
    accepted = int(matches.cumprod(0).sum()) if len(draft) else 0
    return Verdict(accepted, int(target[accepted]))


def sampled_verdict(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> Verdict:
    """draft [s] tokens drafted from q [s, V]; p [s + 1, V] the exact model's distributions at the same
    positions (and one more, for the bonus token when every draft is kept)."""
    s = len(draft)
    rows = torch.arange(s)
    p_x, q_x = p[rows, draft], q[rows, draft]
    # q is rebuilt from the draft logits and can miss a token SGLang's sampler drew (top-k/top-p ties):
    # such a token is kept only if the exact model can say it.
    ratio = torch.where(q_x > 0, p_x / q_x.clamp_min(torch.finfo(q_x.dtype).tiny), (p_x > 0).to(p_x.dtype))
    mismatches = int((q_x == 0).sum())
    uniform = torch.rand(s, generator=generator, dtype=ratio.dtype, device=ratio.device)
    rejected = (uniform >= ratio).nonzero()
    if len(rejected) == 0:
        return Verdict(s, _draw(p[s], generator), mismatches)
    j = int(rejected[0])
    residual = (p[j] - q[j]).clamp_min(0.0)
    # p == q leaves nothing, but then no token is ever rejected; guard the rounding.
    return Verdict(j, _draw(residual if residual.sum() > 0 else p[j], generator), mismatches)


def _draw(weights: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    return int(torch.multinomial(weights, 1, generator=generator))
