"""Transfer scheduling and the page-row format of the two Lynx streams."""

import threading
import time
import types

import pytest
import torch

from sglang_lynx.config import LynxConfig
from sglang_lynx.streams.rows import LynxTransferError, PageRows, page_runs, split_blocks
from sglang_lynx.streams.scheduler import ANCHOR, RESIDUAL, Pacer, StreamScheduler


def test_pacer_holds_writes_to_the_link_rate():
    pacer = Pacer(mbps=8)  # 1 MB/s
    start = time.monotonic()
    for _ in range(4):
        pacer.pace(50_000)
    assert 0.19 <= time.monotonic() - start < 0.4


def test_unpaced_link_does_not_wait():
    start = time.monotonic()
    Pacer(mbps=None).pace(10**9)
    assert time.monotonic() - start < 0.01


def test_a_later_request_anchor_overtakes_an_earlier_request_residual_on_a_slow_link():
    """Request A's Residual is queued in bounded jobs; B's Anchor, arriving later, lands before A's
    Residual finishes: it waits for at most the one Residual job in flight."""
    pacer, log, done = Pacer(mbps=8), [], threading.Event()  # 1 MB/s: 100 kB jobs take 0.1 s
    streams = StreamScheduler()

    def write(label, nbytes):
        def job():
            pacer.pace(nbytes)
            log.append((label, time.monotonic()))
        return job

    streams.submit(ANCHOR, write("A anchor", 100_000))
    for i in range(5):
        streams.submit(RESIDUAL, write(f"A residual {i}", 100_000))
    streams.submit(RESIDUAL, done.set)
    time.sleep(0.15)  # A's anchor is done and its first residual job is on the wire
    streams.submit(ANCHOR, write("B anchor", 100_000))
    assert done.wait(5)
    streams.close()
    order = [label for label, _ in log]
    assert order.index("B anchor") < order.index("A residual 4")
    assert order.index("B anchor") <= order.index("A residual 1") + 1  # waited for one job at most


def fake_pool(num_pages=6, page_size=64, layers=3, heads=2, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = num_pages * page_size
    return types.SimpleNamespace(
        page_size=page_size,
        k_buffer=[torch.randn(size, heads, dim, generator=g) for _ in range(layers)],
        v_buffer=[torch.randn(size, heads, dim, generator=g) for _ in range(layers)],
    )


def send(src: PageRows, dst: PageRows, src_pages, dst_pages, residual: bool):
    """What Mooncake's writes do: copy byte ranges of rows between the two workers."""
    for s, d in zip(src_pages, dst_pages):
        dst.rows[d, : src.first_stream_nbytes] = src.rows[s, : src.first_stream_nbytes]
        if residual:
            dst.rows[d, src.residual_at:] = src.rows[s, src.residual_at:]


def tokens(pages, n, page_size=64):
    return (torch.tensor(pages)[:, None] * page_size + torch.arange(page_size)).flatten()[:n]


@pytest.mark.parametrize("mode", ["int8", "int4", "lynx"])
def test_pages_land_in_the_decode_pool_at_their_new_places(mode):
    config = LynxConfig(mode=mode)
    prefill_pool, decode_pool = fake_pool(seed=1), fake_pool(seed=2)
    prefill = PageRows(config, prefill_pool, 64, 6)
    decode = PageRows(config, decode_pool, 64, 6)
    src_pages, dst_pages, n = [1, 4, 2], [5, 0, 3], 150  # last page partly filled
    prefill.encode(src_pages, n)
    prefill.stamp(src_pages, n, room=77)
    send(prefill, decode, src_pages, dst_pages, residual=False)
    decode.land(dst_pages, n, room=77, merged=mode == "int8")

    kv = prefill._gather(tokens(src_pages, n))
    got = torch.stack([torch.stack([b[tokens(dst_pages, n)] for b in bufs])
                       for bufs in (decode_pool.k_buffer, decode_pool.v_buffer)])
    err = ((got - kv).norm() / kv.norm()).item()
    assert err < (0.01 if mode == "int8" else 0.12)
    if mode == "lynx":  # the Residual refines the same pages to exact INT8
        send(prefill, decode, src_pages, dst_pages, residual=True)
        decode.land(dst_pages, n, room=77, merged=True)
        exact = torch.stack([torch.stack([b[tokens(dst_pages, n)] for b in bufs])
                             for bufs in (decode_pool.k_buffer, decode_pool.v_buffer)])
        whole = PageRows(config, fake_pool(seed=3), 64, 6)  # every byte at once: plain INT8
        whole.rows.copy_(prefill.rows)
        whole.land(src_pages, n, room=77, merged=True)
        assert torch.equal(exact, torch.stack([torch.stack([b[tokens(src_pages, n)] for b in bufs])
                                               for bufs in (whole.k_buffers, whole.v_buffers)]))
        assert ((exact - kv).norm() / kv.norm()).item() < err


def test_a_page_of_several_codec_blocks_lands_partly_filled():
    config = LynxConfig(mode="int8", group_size=32)  # a 64-token page holds two blocks
    prefill_pool, decode_pool = fake_pool(seed=4), fake_pool(seed=5)
    prefill, decode = PageRows(config, prefill_pool, 64, 6), PageRows(config, decode_pool, 64, 6)
    prefill.encode([2, 3], 64 + 20)  # the second page holds 20 tokens: one block
    prefill.stamp([2, 3], 64 + 20, room=9)
    send(prefill, decode, [2, 3], [4, 1], residual=True)
    decode.land([4, 1], 64 + 20, room=9, merged=True)
    kv = prefill._gather(tokens([2, 3], 84))
    got = torch.stack([torch.stack([b[tokens([4, 1], 84)] for b in bufs])
                       for bufs in (decode_pool.k_buffer, decode_pool.v_buffer)])
    assert ((got - kv).norm() / kv.norm()).item() < 0.01


def test_only_the_first_stream_travels_first_and_int4_never_sends_a_residual():
    pool = fake_pool()
    lynx, int8, int4 = (PageRows(LynxConfig(mode=m), pool, 64, 6) for m in ("lynx", "int8", "int4"))
    assert lynx.first_stream_nbytes == int4.first_stream_nbytes < int8.first_stream_nbytes == int8.row_nbytes
    assert lynx.residual_nbytes > 0 and int4.residual_nbytes == int8.residual_nbytes == 0
    raw = PageRows(LynxConfig(mode="raw"), pool, 64, 6)
    assert raw.row_nbytes == raw.first_stream_nbytes == 32  # raw rows carry only the header


def test_decode_refuses_stale_rows_and_rows_of_other_settings():
    pool = fake_pool()
    prefill = PageRows(LynxConfig(mode="lynx", anchor_bits=3), pool, 64, 6)
    decode = PageRows(LynxConfig(mode="lynx"), fake_pool(), 64, 6)
    with pytest.raises(LynxTransferError, match="is the prefill worker running with --lynx-mode lynx"):
        decode.land([0], 64, room=5, merged=False)
    prefill.encode([0], 64)
    prefill.stamp([0], 64, room=5)
    decode.rows[0, :32] = prefill.rows[0, :32]
    with pytest.raises(LynxTransferError, match="prefill sent mode=lynx anchor_bits=3 .* decode expects mode=lynx anchor_bits=4"):
        decode.land([0], 64, room=5, merged=False)
    with pytest.raises(LynxTransferError, match="no Lynx data arrived"):
        decode.land([0], 64, room=6, merged=False)  # another request's bytes
    decode.forget([0])
    with pytest.raises(LynxTransferError, match="no Lynx data arrived"):
        decode.land([0], 64, room=5, merged=False)


def test_page_runs_address_each_page_row_range():
    assert page_runs([2, 0], [1, 3], 1000, 5000, 100, 32, 10) == [(1232, 5132, 10), (1032, 5332, 10)]


def test_residual_jobs_are_bounded_and_cover_every_byte_once():
    blocks = [(1000, 9000, 250), (5000, 7000, 100)]
    jobs = split_blocks(blocks, 120)
    assert [sum(n for _, _, n in job) for job in jobs] == [120, 120, 110]
    assert jobs[2] == [(1240, 9240, 10), (5000, 7000, 100)]
    covered = sorted((s, d, n) for job in jobs for s, d, n in job)
    assert sum(n for _, _, n in covered) == 350 and covered[0] == (1000, 9000, 120)


def test_a_prefill_page_shared_by_two_requests_reaches_each_with_its_own_header():
    """A radix-cached prefix page is encoded for each request using it; each send names its request."""
    config = LynxConfig(mode="lynx")
    prefill = PageRows(config, fake_pool(seed=6), 64, 6)
    decode_a, decode_b = (PageRows(config, fake_pool(seed=s), 64, 6) for s in (7, 8))
    prefill.encode([1, 2], 128)  # request A: shared page 1, own page 2
    prefill.encode([1, 3], 100)  # request B: shared page 1, own page 3, encoded before A's send
    for room, decode, src in ((11, decode_a, [1, 2]), (12, decode_b, [1, 3])):
        prefill.stamp(src, 128 if room == 11 else 100, room)
        send(prefill, decode, src, [4, 5], residual=False)
    decode_a.land([4, 5], 128, room=11, merged=False)
    decode_b.land([4, 5], 100, room=12, merged=False)


class FakeDecodeManager:
    """What an Anchored request uses of the decode worker's Lynx KV manager."""

    def __init__(self, waiting_timeout):
        from sglang_lynx.streams.timings import Timings

        self.waiting_timeout, self.arrivals, self.abandoned, self.forgotten = waiting_timeout, {}, [], []
        self.timings = Timings(None, role="decode")
        self.rows = types.SimpleNamespace(forget=self.forgotten.append)

    def take_residual_arrival(self, room):
        return self.arrivals.pop(room, None)

    def abandon_residual(self, room):
        self.abandoned.append(room)


def test_an_anchored_request_learns_of_its_residual_once_or_gives_up_after_the_timeout():
    from sglang_lynx.streams.landing import Anchored
    from sglang_lynx.streams.mooncake import ResidualArrival

    manager = FakeDecodeManager(waiting_timeout=60)
    waiting = Anchored(manager, [3, 4], 100, room=7, since=time.time())
    assert waiting.take_residual() is None
    manager.arrivals[7] = ResidualArrival(None, 123.0)
    assert waiting.take_residual() == (None, 123.0) and waiting.take_residual() is None
    waiting.close()
    assert manager.forgotten == [[3, 4]] and manager.abandoned == []  # nothing more is coming

    late = Anchored(manager, [5], 10, room=8, since=time.time() - 61)
    failure, _ = late.take_residual()
    assert failure.startswith("the Residual did not arrive within 61 s")
    late.close(failure=failure)
    assert manager.abandoned == [8]  # dropped if it still comes


def test_a_residual_for_a_request_that_already_ended_is_dropped_when_it_lands():
    from sglang_lynx.streams.mooncake import RESIDUAL_MESSAGE, LynxKVManager

    decode = types.SimpleNamespace(residual_arrivals={}, abandoned_rooms=set(), _arrivals_lock=threading.Lock(),
                                   residual_landed=threading.Event())
    message = lambda room: [RESIDUAL_MESSAGE, str(room).encode(), b"1", b""]
    LynxKVManager.abandon_residual(decode, 5)  # ended before its Residual came
    LynxKVManager._on_residual_message(decode, message(5))
    LynxKVManager._on_residual_message(decode, message(6))
    assert set(decode.residual_arrivals) == {6} and not decode.abandoned_rooms
    assert decode.residual_landed.is_set()  # an idle scheduler wakes up for it
    LynxKVManager.abandon_residual(decode, 6)  # ended after it came
    assert not decode.residual_arrivals and not decode.abandoned_rooms
