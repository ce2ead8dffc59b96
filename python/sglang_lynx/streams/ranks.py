"""Decisions the tensor-parallel ranks of a worker take together.

Each rank of a ``--tp-size`` worker runs its own scheduler and its own Lynx KV manager, with rows
holding its own KV heads, and hears of its own transfers: its first token or its Residual can come a
moment before or after its peers'. Where what a rank sees changes what its scheduler runs (a request
let through for rows, landed, verified, released), the ranks agree first, as SGLang's transfer
queues agree on their polls: one small all-reduce over the worker's CPU group, of a list every rank
builds in the same order. With one rank each function returns what it is given, with no collective.
"""

from __future__ import annotations

import torch.distributed as dist
from sglang.srt.disaggregation.utils import all_reduce_flags


def on_every_rank(group, flags: list[bool]) -> list[bool]:
    """Per entry: true on every rank (e.g. a Residual that has landed on all of them)."""
    return [bool(f) for f in all_reduce_flags([int(f) for f in flags], group, dist.ReduceOp.MIN)]


def on_any_rank(group, flags: list[bool]) -> list[bool]:
    """Per entry: true on some rank (e.g. a landing that failed on one of them)."""
    return [bool(f) for f in all_reduce_flags([int(f) for f in flags], group, dist.ReduceOp.MAX)]


def fewest(group, count: int) -> int:
    """The smallest of the ranks' counts (e.g. free rows: what every rank can give)."""
    return all_reduce_flags([count], group, dist.ReduceOp.MIN)[0]
