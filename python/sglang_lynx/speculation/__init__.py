"""Decoding on the Anchor while the Residual streams in, then verifying and rolling back.

* ``acceptance``: which speculated tokens survive (greedy and speculative-sampling rules);
* ``verify``: the verify forward pass and KV rollback, on SGLang's batch machinery;
* ``speculator``: each speculating request's record, from admission to verification;
* ``hooks``: the SGLang hooks, registered in ``sglang_lynx.plugin``;
* ``metrics``: Prometheus counters.
"""
