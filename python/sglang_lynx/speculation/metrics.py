"""Server-wide speculation counters, exported with SGLang's Prometheus metrics (``--enable-metrics``).

Created in the decode scheduler process; SGLang's multi-process Prometheus registry collects them
into the worker's ``/metrics`` next to its own ``sglang:`` series, with the same labels.
"""

from __future__ import annotations


class SpeculationMetrics:
    def __init__(self, labels: dict[str, str]):
        from prometheus_client import Counter  # after SGLang has set PROMETHEUS_MULTIPROC_DIR

        names = list(labels)
        self.speculated = Counter("sglang:lynx_speculated_tokens", "Tokens decoded on the Anchor.",
                                  names).labels(**labels)
        self.accepted = Counter("sglang:lynx_accepted_tokens", "Speculated tokens kept by verification.",
                                names).labels(**labels)
        self.rollbacks = Counter("sglang:lynx_rollbacks", "Verified requests that rolled back a token.",
                                 names).labels(**labels)
        self.draft_mismatches = Counter(
            "sglang:lynx_draft_mismatches",
            "Sampled speculated tokens outside the draft distribution rebuilt from their logits.",
            names).labels(**labels)
        self.passes = {
            "verify": Counter("sglang:lynx_verify_passes", "Verify forward passes.", names).labels(**labels),
            "redraft": Counter("sglang:lynx_redraft_passes",
                               "Passes over speculated tokens when a Residual's middle stage landed.",
                               names).labels(**labels),
        }
        self.redrafted = Counter("sglang:lynx_redrafted_tokens",
                                 "Speculated tokens dropped when the KV refined to the middle stage disagreed.",
                                 names).labels(**labels)

    def verified(self, speculated: int, accepted: int, draft_mismatches: int) -> None:
        self.speculated.inc(speculated)
        self.accepted.inc(accepted)
        self.draft_mismatches.inc(draft_mismatches)
        if accepted < speculated:
            self.rollbacks.inc()
