"""Transfer scheduling, the staging area and the row format of the two Lynx streams."""

import collections
import json
import re
import threading
import time
import types

import numpy as np
import pytest
import torch
import xxhash
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lynx_kernels
from sglang_lynx.config import STAGING_SHARE, LynxConfig, LynxConfigError
from sglang_lynx.streams.rows import CHUNK_TOKENS, HEADER, LynxTransferError, StagingRows, row_runs, split_blocks
from sglang_lynx.streams.scheduler import ANCHOR, RESIDUAL, Pacer, StreamScheduler


def test_pacer_holds_writes_to_the_link_rate():
    pacer = Pacer(mbps=8)  # 1 MB/s
    start = time.monotonic()
    for _ in range(4):
        pacer.pace(50_000)
    assert 0.19 <= time.monotonic() - start < 0.4


def test_a_new_rate_paces_the_writes_after_it():
    pacer = Pacer(mbps=8)  # 1 MB/s
    pacer.pace(50_000)
    pacer.set_rate(80)  # 10 MB/s
    start = time.monotonic()
    for _ in range(4):
        pacer.pace(50_000)
    assert 0.02 <= time.monotonic() - start < 0.12  # 20 ms at the new rate (200 ms at the old)


def test_a_write_on_the_wire_crosses_at_the_new_rate_once_the_link_speeds_up():
    pacer = Pacer(mbps=8)  # 1 MB/s: 1 s for the write alone
    threading.Timer(0.1, pacer.set_rate, args=(80,)).start()  # 10 MB/s after 100 kB
    start = time.monotonic()
    pacer.pace(1_000_000)
    assert 0.15 <= time.monotonic() - start < 0.5  # 0.1 s + 900 kB at 10 MB/s


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


def staging(config, pool, nbytes=1 << 30) -> StagingRows:
    """A staging area beside ``pool``; by default as many rows as the pool has pages (6)."""
    return StagingRows(config, pool, 64, nbytes)


def send(src: StagingRows, dst: StagingRows, src_rows, dst_rows, residual: bool):
    """What Mooncake's writes do: copy byte ranges of rows between the two workers."""
    for s, d in zip(src_rows, dst_rows):
        dst.buffer[d, : src.first_stream_nbytes] = src.buffer[s, : src.first_stream_nbytes]
        if residual:
            dst.buffer[d, src.residual_at:] = src.buffer[s, src.residual_at:]


def tokens(pages, n, page_size=64):
    return (torch.tensor(pages)[:, None] * page_size + torch.arange(page_size)).flatten()[:n]


def pool_kv(pool, pages, n):
    return torch.stack([torch.stack([b[tokens(pages, n)] for b in bufs]) for bufs in (pool.k_buffer, pool.v_buffer)])


@pytest.mark.parametrize("heads, dim", [(3, 64), (2, 128)], ids=["smollm2-heads", "qwen2.5-heads"])
@pytest.mark.parametrize("mode", ["int8", "int4", "lynx"])
def test_pages_land_in_the_decode_pool_at_their_new_places_through_any_rows(mode, heads, dim):
    config = LynxConfig(mode=mode)
    prefill_pool, decode_pool = (fake_pool(seed=seed, heads=heads, dim=dim) for seed in (1, 2))
    prefill, decode = staging(config, prefill_pool), staging(config, decode_pool)
    src_pages, dst_pages, n = [1, 4, 2], [5, 0, 3], 150  # last page partly filled
    src_rows, dst_rows = [4, 0, 2], [1, 5, 3]
    prefill.encode(src_pages, src_rows, n, room=77)
    send(prefill, decode, src_rows, dst_rows, residual=False)
    decode.land(dst_pages, dst_rows, n, room=77, streams=decode.num_streams if mode == "int8" else 1)

    kv = pool_kv(prefill_pool, src_pages, n)
    err = ((pool_kv(decode_pool, dst_pages, n) - kv).norm() / kv.norm()).item()
    assert err < (0.01 if mode == "int8" else 0.12)
    if mode == "lynx":  # the Residual refines the same pages to exact INT8
        send(prefill, decode, src_rows, dst_rows, residual=True)
        decode.land(dst_pages, dst_rows, n, room=77, streams=decode.num_streams)
        whole_pool = fake_pool(seed=3, heads=heads, dim=dim)
        whole = staging(config, whole_pool)  # every byte at once: plain INT8
        whole.buffer.copy_(prefill.buffer)
        whole.land(src_pages, src_rows, n, room=77, streams=whole.num_streams)
        exact = pool_kv(decode_pool, dst_pages, n)
        assert torch.equal(exact, pool_kv(whole_pool, src_pages, n))
        assert ((exact - kv).norm() / kv.norm()).item() < err


def test_a_page_of_several_codec_blocks_lands_partly_filled():
    config = LynxConfig(mode="int8", group_size=32)  # a 64-token page holds two blocks
    prefill_pool, decode_pool = fake_pool(seed=4), fake_pool(seed=5)
    prefill, decode = staging(config, prefill_pool), staging(config, decode_pool)
    prefill.encode([2, 3], [0, 1], 64 + 20, room=9)  # the second page holds 20 tokens: one block
    send(prefill, decode, [0, 1], [3, 2], residual=True)
    decode.land([4, 1], [3, 2], 64 + 20, room=9, streams=decode.num_streams)
    kv = pool_kv(prefill_pool, [2, 3], 84)
    assert ((pool_kv(decode_pool, [4, 1], 84) - kv).norm() / kv.norm()).item() < 0.01


def test_each_row_is_its_page_encoded_on_its_own_after_a_header_with_the_checksums_of_both_streams():
    config = LynxConfig(mode="lynx")
    pool = fake_pool(num_pages=40)
    rows = staging(config, pool)
    pages, n = list(range(39, 0, -1)), 38 * 64 + 10  # more than a chunk; the last page partly filled
    rows.encode(pages, list(range(39)), n, room=21)
    for i, page in enumerate(pages):
        m = min(64, n - i * 64)
        planes = rows.codec.encode(pool_kv(pool, [page], m))
        row = rows.buffer[i].numpy()
        meta, anchor, residual = (row[at: at + len(plane)] for at, plane in
                                  ((rows.meta_at, planes.meta), (rows.anchor_at, planes.anchor),
                                   (rows.residual_at, planes.residual)))
        assert [meta.tobytes(), anchor.tobytes(), residual.tobytes()] == [
            planes.meta.numpy().tobytes(), planes.anchor.numpy().tobytes(), planes.residual.numpy().tobytes()]
        first_sum = xxhash.xxh3_64(meta.tobytes() + anchor.tobytes()).intdigest() & 0xFFFFFFFF
        residual_sum = xxhash.xxh3_64(residual.tobytes()).intdigest() & 0xFFFFFFFF
        assert HEADER.unpack(row[: HEADER.size].tobytes()) == (b"LYNX", 3, 4, 4, 1, 64, m, first_sum, 21, residual_sum,
                                                               0)


@pytest.mark.parametrize("plan", [(4, 2, 2), (5, 2, 1), (3, 1, 4)], ids=lambda p: ",".join(map(str, p)))
def test_a_residual_in_two_stages_lands_at_the_bits_landed_then_whole_as_int8(plan):
    """Each stage is one run of bytes of every row; the pages land Anchor-only, then at the bits of the
    Anchor and the middle stage, then as exact INT8: each time exactly what the codec decodes alone."""
    config = LynxConfig(mode="lynx", anchor_bits=plan[0], residual_stages=plan[1:])
    prefill_pool, decode_pool = fake_pool(seed=1), fake_pool(seed=2)
    prefill, decode = staging(config, prefill_pool), staging(config, decode_pool)
    two_stages = staging(LynxConfig(mode="lynx", anchor_bits=plan[0]), prefill_pool)
    assert decode.num_streams == 3 and decode.row_nbytes == two_stages.row_nbytes
    src_pages, dst_pages, rows, n = [1, 4, 2], [5, 0, 3], [0, 1, 2], 150  # the last page partly filled
    prefill.encode(src_pages, rows, n, room=7)
    codec, kv = decode.codec, pool_kv(prefill_pool, src_pages, n)
    errors = []
    for streams, (start, length) in enumerate([(0, decode.first_stream_nbytes), *decode.later_streams], 1):
        decode.buffer[rows, start: start + length] = prefill.buffer[rows, start: start + length]
        decode.land(dst_pages, rows, n, room=7, streams=streams)
        for i, (src, dst) in enumerate(zip(src_pages, dst_pages)):
            m = min(64, n - i * 64)
            planes = codec.encode(pool_kv(prefill_pool, [src], m))
            stages = codec.split_residual(planes.residual, m, plan[1:])[: streams - 1]
            alone = (codec.decode_anchor(planes.anchor, planes.meta, m) if streams == 1 else codec.decode_merged(
                planes.anchor, codec.merge_residual(stages, m, plan[1:]), planes.meta, m))
            assert torch.equal(pool_kv(decode_pool, [dst], m), alone)
        landed = pool_kv(decode_pool, dst_pages, n)
        errors.append(((landed - kv).norm() / kv.norm()).item())
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("stage", [0, 1])
def test_a_damaged_residual_stage_fails_the_landing_of_the_last_stage(stage):
    """The middle stage's KV only guides speculation: its bytes are checked, with the last stage's, before
    anything decoded on them is verified."""
    config = LynxConfig(mode="lynx", residual_stages=(2, 2))
    prefill, decode = staging(config, fake_pool(seed=1)), staging(config, fake_pool(seed=2))
    prefill.encode([1, 2], [0, 1], 100, room=3)
    send(prefill, decode, [0, 1], [2, 3], residual=True)
    decode.buffer[3, decode.later_streams[stage][0] + 5] ^= 0x04
    decode.land([4, 5], [2, 3], 100, room=3, streams=1)
    decode.land([4, 5], [2, 3], 100, room=3, streams=2)
    with pytest.raises(LynxTransferError, match="the Residual of row 3 fails its checksum"):
        decode.land([4, 5], [2, 3], 100, room=3, streams=3)


def test_every_request_s_middle_stage_is_sent_before_any_request_s_last_and_decode_hears_of_each():
    from sglang_lynx.streams.mooncake import MIDDLE_MESSAGE, RESIDUAL_MESSAGE, LynxKVManager, _ResidualPlan
    from sglang_lynx.streams.timings import Timings

    manager = LynxKVManager.__new__(LynxKVManager)  # the prefill side's sending, without SGLang's engine
    manager.lynx = LynxConfig(mode="lynx", residual_stages=(2, 2))
    manager.rows = staging(manager.lynx, fake_pool())
    manager.pacer, manager.streams, manager.timings = Pacer(None), StreamScheduler(), Timings(None, "prefill")
    manager.peers, manager.request_status, manager.residual_plans = {"decode": {"rows_ptr": 0}}, {}, {}
    sent, told = [], []
    manager._transfer_data = lambda session, blocks: sent.append(blocks[0][1] % manager.rows.row_nbytes) or 0
    manager._send_multipart_locked = lambda address, frames, is_ipv6: told.append((frames[0], int(frames[1])))
    gate = threading.Event()
    manager.streams.submit(ANCHOR, gate.wait)  # both requests' stages queue up behind it
    for room in (1, 2):
        manager.residual_plans[room] = _ResidualPlan([("decode", [room], [room], "127.0.0.1", 9)])
        manager._schedule_residual(room)
    gate.set()
    deadline = time.monotonic() + 5
    while len(told) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    manager.streams.close()
    assert told == [(MIDDLE_MESSAGE, 1), (MIDDLE_MESSAGE, 2), (RESIDUAL_MESSAGE, 1), (RESIDUAL_MESSAGE, 2)]
    (middle_at, _), (last_at, _) = manager.rows.later_streams
    assert sent == [middle_at, middle_at, last_at, last_at]


class Operations(TorchDispatchMode):
    """Counts the tensor operations run inside it, and the bytes of the largest tensor they create (views
    of ``existing`` tensors and writes into them do not count)."""

    def __init__(self, *existing):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.count = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.count += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.existing:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_a_long_prompt_is_encoded_and_landed_one_chunk_at_a_time():
    """Beside the pool and the staging area, neither side makes a tensor larger than one chunk's KV,
    however long the prompt; what lands is each page decoded on its own."""
    config = LynxConfig(mode="lynx")
    num_tokens = 2 * CHUNK_TOKENS + 100
    pages = -(-num_tokens // 64)
    # float32 KV of 8 KiB a token: a chunk's 16 MiB is more than the codec's own work memory
    prefill_pool, decode_pool = (fake_pool(num_pages=pages, layers=8, heads=2, seed=s) for s in (1, 2))
    prefill, decode = staging(config, prefill_pool), staging(config, decode_pool)
    chunk_kv = CHUNK_TOKENS * 2 * 8 * 2 * 64 * 4
    src_pages, dst_pages, rows = list(range(pages)), list(range(pages))[::-1], list(range(pages))
    with Operations(*prefill_pool.k_buffer, *prefill_pool.v_buffer, prefill.buffer) as ops:
        prefill.encode(src_pages, rows, num_tokens, room=8)
    assert 0 < ops.largest <= chunk_kv
    send(prefill, decode, rows, rows, residual=True)
    for merged in (False, True):
        with Operations(*decode_pool.k_buffer, *decode_pool.v_buffer, decode.buffer) as ops:
            decode.land(dst_pages, rows, num_tokens, room=8, streams=decode.num_streams if merged else 1)
        assert 0 < ops.largest <= chunk_kv
        for row, page in zip(rows, dst_pages):
            m = min(64, num_tokens - row * 64)
            meta, anchor, (residual,) = decode._planes(decode.buffer[row], m)
            alone = (decode.codec.decode_merged(anchor, residual, meta, m) if merged else
                     decode.codec.decode_anchor(anchor, meta, m))
            assert torch.equal(pool_kv(decode_pool, [page], m), alone)


@pytest.mark.parametrize("merged", [False, True])
def test_landing_a_chunk_of_pages_runs_the_same_operations_as_landing_one_page(monkeypatch, merged):
    """Headers and checksums are read, rows gathered and KV decoded into the pool (one codec call)
    per chunk, not page by page."""
    config = LynxConfig(mode="lynx")
    decoded = []  # the tokens of each codec call, whose own work is left out

    def record(num_tokens, out):
        decoded.append(num_tokens)
        return torch.zeros(2, 3, num_tokens, 2, 64) if out is None else out

    monkeypatch.setattr(lynx_kernels, "dequant_anchor",
                        lambda anchor, meta, table, n, dtype=None, out=None, backend=None: record(n, out))
    monkeypatch.setattr(lynx_kernels, "merge_dequant",
                        lambda anchor, residual, meta, n, dtype=None, out=None, backend=None: record(n, out))
    counts = []
    for pages in (1, CHUNK_TOKENS // 64):
        pool = fake_pool(num_pages=pages)
        prefill, decode = staging(config, pool), staging(config, pool)
        prefill.encode(list(range(pages)), list(range(pages)), pages * 64, room=4)
        send(prefill, decode, range(pages), range(pages), residual=True)
        with Operations() as ops:
            decode.land(list(range(pages)), list(range(pages)), pages * 64, room=4, streams=decode.num_streams if merged else 1)
        counts.append(ops.count)
    assert counts[0] == counts[1]
    assert decoded == [64, CHUNK_TOKENS]


def test_bytes_the_codec_cannot_decode_fail_their_request_not_the_worker(monkeypatch):
    config = LynxConfig(mode="int8")
    prefill, decode = staging(config, fake_pool(seed=1)), staging(config, fake_pool(seed=2))
    prefill.encode([0, 1], [0, 1], 100, room=2)
    send(prefill, decode, [0, 1], [0, 1], residual=True)

    def rejects(*args, **kwargs):
        raise ValueError("meta of 100 tokens must hold 1234 bytes")

    monkeypatch.setattr(lynx_kernels, "merge_dequant", rejects)
    with pytest.raises(LynxTransferError, match="cannot be decoded: meta of 100 tokens must hold 1234 bytes"):
        decode.land([2, 3], [0, 1], 100, room=2, streams=decode.num_streams)


def test_the_landing_benchmark_times_landing_and_its_extra_memory_beside_the_codec_alone(tmp_path):
    from sglang_lynx.bench.__main__ import main

    model = tmp_path / "model"  # the KV dimensions are all the benchmark reads of a model
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "hidden_size": 128}))
    out = tmp_path / "landing.json"
    main(["landing", "--model-path", str(model), "--tokens", "100,300", "--repeats", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["kv"] == {"layers": 2, "heads": 2, "head_dim": 32, "dtype": "float32", "page_size": 64}
    assert r["chunk_kv_bytes"] == CHUNK_TOKENS * 2 * 2 * 2 * 32 * 4
    assert [size["tokens"] for size in r["sizes"]] == [100, 300]
    for size in r["sizes"]:
        for stream in ("anchor", "merged"):
            s = size[stream]
            assert s["land_s"] > 0 and s["codec_s"] > 0 and s["land_over_codec"] == s["land_s"] / s["codec_s"]
            assert s["land_extra_peak_bytes"] >= 0 and s["codec_extra_peak_bytes"] >= 0
    assert set(r["targets"]) == {"land_extra_peak_within_one_chunk_kv", "land_within_1.25x_codec_decode"}


def test_only_the_first_stream_travels_first_and_int4_never_sends_a_residual():
    pool = fake_pool()
    lynx, int8, int4 = (staging(LynxConfig(mode=m), pool) for m in ("lynx", "int8", "int4"))
    assert lynx.first_stream_nbytes == int4.first_stream_nbytes < int8.first_stream_nbytes == int8.row_nbytes
    assert lynx.later_streams == [(lynx.residual_at, lynx.row_nbytes - lynx.residual_at)]
    assert int4.later_streams == int8.later_streams == []
    raw = staging(LynxConfig(mode="raw"), pool)
    assert raw.row_nbytes == raw.first_stream_nbytes == 32  # raw rows carry only the header


def test_decode_refuses_stale_rows_and_rows_of_other_settings():
    prefill = staging(LynxConfig(mode="lynx", anchor_bits=3), fake_pool())
    decode = staging(LynxConfig(mode="lynx"), fake_pool())
    with pytest.raises(LynxTransferError, match="is the prefill worker running with --lynx-mode lynx"):
        decode.land([0], [0], 64, room=5, streams=1)
    prefill.encode([0], [0], 64, room=5)
    decode.buffer[0, :32] = prefill.buffer[0, :32]
    with pytest.raises(LynxTransferError, match="prefill sent mode=lynx stages=3,5 .* decode expects mode=lynx stages=4,4"):
        decode.land([0], [0], 64, room=5, streams=1)
    with pytest.raises(LynxTransferError, match="no Lynx data arrived"):
        decode.land([0], [0], 64, room=6, streams=1)  # another request's bytes
    decode.free([0])
    with pytest.raises(LynxTransferError, match="no Lynx data arrived"):
        decode.land([0], [0], 64, room=5, streams=1)


@pytest.mark.parametrize("mode, stream", [("int8", "Anchor"), ("int8", "Residual"), ("lynx", "Anchor"),
                                          ("lynx", "Residual")])
def test_a_byte_damaged_on_the_way_fails_the_landing_of_its_stream(mode, stream):
    config = LynxConfig(mode=mode)
    prefill, decode = staging(config, fake_pool(seed=1)), staging(config, fake_pool(seed=2))
    prefill.encode([1, 2], [0, 1], 100, room=3)
    send(prefill, decode, [0, 1], [2, 3], residual=True)
    damaged = (decode.anchor_at if stream == "Anchor" else decode.residual_at) + 17
    decode.buffer[3, damaged] ^= 0x10  # one bit of the second (partly filled) page
    lands_first = mode == "lynx" and stream == "Residual"  # the Anchor alone is intact
    if lands_first:
        decode.land([4, 5], [2, 3], 100, room=3, streams=1)
    with pytest.raises(LynxTransferError, match=f"the {stream} of row 3 fails its checksum"):
        decode.land([4, 5], [2, 3], 100, room=3, streams=decode.num_streams if lands_first or mode == "int8" else 1)


def test_checksums_are_checked_only_where_both_workers_want_them():
    damaged = lambda prefill_sums, decode_sums: _land_damaged(LynxConfig(mode="int8", verify_checksums=prefill_sums),
                                                              LynxConfig(mode="int8", verify_checksums=decode_sums))
    with pytest.raises(LynxTransferError, match="fails its checksum"):
        damaged(True, True)
    damaged(False, True)  # no sums were written: the damage goes unseen, as with checksums off
    damaged(True, False)


def _land_damaged(prefill_config, decode_config):
    prefill, decode = staging(prefill_config, fake_pool()), staging(decode_config, fake_pool())
    prefill.encode([0], [0], 64, room=1)
    send(prefill, decode, [0], [0], residual=True)
    decode.buffer[0, decode.anchor_at] ^= 1
    decode.land([0], [0], 64, room=1, streams=decode.num_streams)


def test_rows_are_handed_out_per_request_and_come_back():
    row_nbytes = staging(LynxConfig(mode="lynx"), fake_pool()).row_nbytes
    rows = staging(LynxConfig(mode="lynx"), fake_pool(num_pages=8), nbytes=5 * row_nbytes + row_nbytes // 2)
    assert rows.num_rows == 5  # the area, not the pool, sets the count
    a = rows.alloc(3)
    assert sorted(a) == [0, 1, 2] and rows.rows_in_use == 3
    assert rows.alloc(3) is None and rows.free_rows == 2  # too few left: nothing is taken
    b = rows.alloc(2)
    rows.free(a)
    assert rows.rows_in_use == 2 and len(set(rows.alloc(3)) | set(b)) == 5


def test_never_more_rows_than_pool_pages_and_an_area_too_small_for_one_row_is_refused():
    assert staging(LynxConfig(mode="raw"), fake_pool()).num_rows == 6  # 32-byte rows
    with pytest.raises(LynxConfigError, match="--lynx-staging-mb .* holds no Lynx row"):
        staging(LynxConfig(mode="lynx"), fake_pool(), nbytes=1000)


def test_staging_defaults_to_a_share_of_the_kv_pool_set_aside_before_sglang_sizes_it():
    default, set_mb = LynxConfig(mode="lynx"), LynxConfig(mode="lynx", staging_mb=64)
    assert default.staging_nbytes(10**9) == STAGING_SHARE * 10**9
    budget = 21 * 10**9
    reserve = default.staging_reserve(budget)
    assert reserve == pytest.approx(default.staging_nbytes(budget - reserve), rel=1e-9)  # a share of what is left
    assert set_mb.staging_nbytes(10**9) == set_mb.staging_reserve(budget) == 64 << 20


def sglang_pool(dtype=torch.float32):
    """A small KV pool of SGLang's own, on the CPU."""
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(size=128, page_size=64, dtype=dtype, head_num=2, head_dim=8, layer_num=2,
                            device="cpu", enable_memory_saver=False)


def test_a_worker_with_any_kv_pool_but_a_plain_per_layer_one_of_floats_fails_at_start_naming_it(monkeypatch):
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool, PageMajorMHATokenToKVPool
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    from sglang_lynx.streams.mooncake import LynxKVManager

    manager = LynxKVManager.__new__(LynxKVManager)  # what attaching needs, without SGLang's engine
    manager.lynx = LynxConfig(mode="int8", staging_mb=1)
    manager.engine = types.SimpleNamespace(register=lambda ptr, n: None)
    manager.attach_pool(sglang_pool())
    # The class alone decides for these: no memory needed.
    unfit = [object.__new__(cls) for cls in (MLATokenToKVPool, SWAKVPool, PageMajorMHATokenToKVPool)]
    unfit.append(sglang_pool(torch.float8_e5m2))
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")
    unfit.append(sglang_pool())
    for pool, named in zip(unfit, ["MLATokenToKVPool.", "SWAKVPool.", "PageMajorMHATokenToKVPool.",
                                   "MHATokenToKVPool of torch.float8_e5m2.", "MHATokenToKVPool laid out hnd."]):
        with pytest.raises(LynxConfigError, match=re.escape(
                f"--lynx-mode int8 needs a plain per-layer K/V pool (one K and one V buffer of float tokens per "
                f"layer); this worker's KV pool is a {named} --lynx-mode off serves this model without Lynx")):
            manager.attach_pool(pool)


def test_row_runs_address_each_row_range():
    assert row_runs([2, 0], [1, 3], 1000, 5000, 100, 32, 10) == [(1232, 5132, 10), (1032, 5332, 10)]


def test_residual_jobs_are_bounded_and_cover_every_byte_once():
    blocks = [(1000, 9000, 250), (5000, 7000, 100)]
    jobs = split_blocks(blocks, 120)
    assert [sum(n for _, _, n in job) for job in jobs] == [120, 120, 110]
    assert jobs[2] == [(1240, 9240, 10), (5000, 7000, 100)]
    covered = sorted((s, d, n) for job in jobs for s, d, n in job)
    assert sum(n for _, _, n in covered) == 350 and covered[0] == (1000, 9000, 120)


def test_a_prefill_page_shared_by_two_requests_reaches_each_with_its_own_header():
    """A radix-cached prefix page is encoded into each request's own rows, named for that request."""
    config = LynxConfig(mode="lynx")
    prefill = staging(config, fake_pool(seed=6))
    decode_a, decode_b = (staging(config, fake_pool(seed=s)) for s in (7, 8))
    prefill.encode([1, 2], [0, 1], 128, room=11)  # request A: shared page 1, own page 2
    prefill.encode([1, 3], [2, 3], 100, room=12)  # request B: shared page 1, own page 3
    send(prefill, decode_a, [0, 1], [4, 5], residual=False)
    send(prefill, decode_b, [2, 3], [4, 5], residual=False)
    decode_a.land([4, 5], [4, 5], 128, room=11, streams=1)
    decode_b.land([4, 5], [4, 5], 100, room=12, streams=1)


class FakeDecodeManager:
    """What an Anchored request uses of the decode worker's Lynx KV manager."""

    def __init__(self, waiting_timeout):
        from sglang_lynx.streams.timings import Timings

        self.waiting_timeout, self.arrivals, self.released = waiting_timeout, {}, []
        self.timings = Timings(None, role="decode")

    def take_residual_arrival(self, room):
        return self.arrivals.pop(room, None)

    def release_rows(self, room, residual_due=False, rows_written=False):
        self.released.append((room, residual_due, rows_written))


def test_an_anchored_request_learns_of_its_residual_once_or_gives_up_after_the_timeout():
    from sglang_lynx.streams.landing import Anchored
    from sglang_lynx.streams.mooncake import ResidualArrival

    manager = FakeDecodeManager(waiting_timeout=60)
    waiting = Anchored(manager, [3, 4], [0, 1], 100, room=7, since=time.time())
    assert waiting.take_residual() is None
    manager.arrivals[7] = ResidualArrival(None, 123.0)
    assert waiting.take_residual() == (None, 123.0) and waiting.take_residual() is None
    waiting.close()
    assert manager.released == [(7, False, False)]  # nothing more is coming: rows free at once

    late = Anchored(manager, [5], [2], 10, room=8, since=time.time() - 61)
    failure, _ = late.take_residual()
    assert failure.startswith("the Residual did not arrive within 61 s")
    late.close(failure=failure)
    assert manager.released[-1] == (8, True, True)  # rows wait for it, should it still come


def decode_manager(num_rows=4, waiting_timeout=60):
    from sglang_lynx.streams.mooncake import LynxKVManager

    manager = LynxKVManager.__new__(LynxKVManager)  # the decode-side state, without SGLang's engine
    manager.lynx, manager.waiting_timeout = LynxConfig(mode="lynx"), waiting_timeout
    manager.rows = staging(manager.lynx, fake_pool(num_pages=num_rows))
    manager.staged, manager.waiting_since, manager.staging_waits = {}, {}, {}
    manager.residual_arrivals, manager.abandoned, manager.residual_sources = {}, {}, {}
    manager._arrivals_lock, manager.arrived, manager.first_tokens = threading.Lock(), threading.Event(), {}
    manager.middle_arrivals = {}
    # what SGLang's heartbeat bookkeeping needs
    manager.connection_lock, manager.connection_pool, manager.prefill_info_table = threading.Lock(), {}, {}
    manager.heartbeat_failures, manager.addr_to_rooms_tracker, manager.request_status = {}, {}, {}
    return manager


def residual_message(room):
    from sglang_lynx.streams.mooncake import RESIDUAL_MESSAGE

    return [RESIDUAL_MESSAGE, str(room).encode(), b"1", b""]


def test_rows_a_residual_may_still_be_written_into_come_back_only_once_it_has_landed():
    manager = decode_manager()
    manager.staged = {5: manager.rows.alloc(2), 6: manager.rows.alloc(1)}
    manager.release_rows(5, residual_due=True, rows_written=True)  # ended while its Residual streams
    assert manager.rows.rows_in_use == 3
    manager._on_residual_message(residual_message(5))
    assert manager.rows.rows_in_use == 1 and not manager.residual_arrivals  # dropped, rows back

    manager._on_residual_message(residual_message(6))
    assert set(manager.residual_arrivals) == {6} and manager.arrived.is_set()  # wakes the scheduler
    manager.release_rows(6, residual_due=True, rows_written=True)  # ended after it came
    assert manager.rows.rows_in_use == 0 and not manager.residual_arrivals and not manager.abandoned


def test_rows_waiting_for_a_residual_that_never_comes_come_back_after_the_timeout():
    manager = decode_manager(waiting_timeout=0)
    manager.staged = {7: manager.rows.alloc(2)}
    manager.release_rows(7, residual_due=True, rows_written=True)
    time.sleep(0.01)
    manager.release_rows(8)  # any later release sweeps expired ones
    assert manager.rows.rows_in_use == 0 and not manager.abandoned


def test_a_failed_request_frees_its_rows_at_once_and_forgets_its_residual_when_it_comes():
    manager = decode_manager()
    manager.staged = {9: manager.rows.alloc(3)}
    manager.release_rows(9, residual_due=True)
    assert manager.rows.rows_in_use == 0
    manager._on_residual_message(residual_message(9))
    assert not manager.residual_arrivals and not manager.abandoned


def test_a_middle_stage_is_kept_for_a_request_holding_rows_until_taken_or_released_and_dropped_after():
    from sglang_lynx.streams.mooncake import MIDDLE_MESSAGE

    manager = decode_manager()
    manager.staged = {9: manager.rows.alloc(2), 10: manager.rows.alloc(1)}
    for room in (9, 10, 11):  # 11 holds no rows: released (or never here)
        manager._on_middle_message([MIDDLE_MESSAGE, str(room).encode()])
    assert manager.arrived.is_set() and set(manager.middle_arrivals) == {9, 10}
    assert manager.middle_arrival(9) is not None and manager.take_middle_arrival(9) is not None
    assert manager.middle_arrival(9) is None
    manager.release_rows(10, residual_due=True)
    assert not manager.middle_arrivals
    manager._on_middle_message([MIDDLE_MESSAGE, b"10"])
    assert not manager.middle_arrivals


def test_prefill_releases_every_finished_request_at_the_end_of_its_step_health_checks_sharing_a_room_too():
    from sglang_lynx.streams.mooncake import LynxKVManager

    manager = LynxKVManager.__new__(LynxKVManager)  # the prefill side's releases, without SGLang's engine
    manager.lynx = LynxConfig(mode="lynx")
    manager.rows = staging(manager.lynx, fake_pool())
    manager.staged, manager.peer_rows, manager.first_token_messages = {}, {}, {}
    manager.waiting_chunks, manager.deferred_releases, manager.residual_plans = collections.deque(), {}, {7: None}
    released = []
    for room, name in [(0, "health check"), (0, "another health check"), (7, "sending its Residual")]:
        manager.release_after_residual(room, lambda name=name: released.append(name))
    one_rank = torch.distributed.ProcessGroupGloo(torch.distributed.HashStore(), 0, 1)
    manager.step(one_rank)
    assert released == ["health check", "another health check"] and manager.has_work()
    del manager.residual_plans[7]
    manager.step(one_rank)
    assert released[-1] == "sending its Residual" and not manager.has_work()


def aux_buffers():
    """Two aux buffers of 4 rows (token ids, logprobs), as SGLang's metadata buffers, and their kv_args."""
    aux = [torch.zeros(4, 3, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.float32)]
    return aux, types.SimpleNamespace(aux_data_ptrs=[b.data_ptr() for b in aux], aux_item_lens=[b[0].nbytes for b in aux])


def test_a_first_token_goes_from_prefill_s_aux_row_to_decode_s_and_wakes_its_scheduler_unless_it_has_ended():
    from sglang.srt.disaggregation.base.conn import KVPoll

    prefill, decode = prefill_manager(), decode_manager()
    (prefill_aux, prefill.kv_args), (decode_aux, decode.kv_args) = aux_buffers(), aux_buffers()
    prefill_aux[0][1], prefill_aux[1][1] = torch.tensor([17, 0, 0]), torch.tensor([-0.5, -2.0])
    sent = []
    prefill._send_multipart_locked = lambda address, frames, is_ipv6: sent.append(frames)
    info = types.SimpleNamespace(endpoint="127.0.0.1", dst_port=5000, dst_aux_index=2)
    prefill._prepare_first_token(5, 1, [("decode", info)])
    assert not sent  # until prefill has answered the request
    prefill.send_first_token(5)

    decode.request_status = {5: KVPoll.WaitingForInput}
    [message] = sent
    decode._on_first_token(message)
    assert decode_aux[0][2].tolist() == [17, 0, 0] and decode_aux[1][2].tolist() == [-0.5, -2.0]
    assert decode.arrived.is_set() and decode.take_first_token(5) is not None
    assert decode.take_first_token(5) is None  # taken once

    decode.arrived.clear()
    decode.request_status = {5: KVPoll.Failed}  # it ended meanwhile: its aux row may be another's by now
    decode_aux[0].zero_()
    decode._on_first_token(message)
    assert not decode_aux[0].any() and not decode.arrived.is_set() and decode.take_first_token(5) is None


def test_workers_that_differ_on_the_first_token_the_stages_or_the_tensor_parallel_size_are_told_which_flag_differs():
    from sglang_lynx.streams.mooncake import LynxKVManager
    from sglang_lynx.streams.rows import VERSION

    prefill = types.SimpleNamespace(lynx=LynxConfig(mode="lynx"), rows=types.SimpleNamespace(row_nbytes=64),
                                    attn_tp_size=2)
    decode = {"mode": "lynx", "stages": "4,4", "group_size": 64, "first_token_at_prefill": False,
              "tp_size": 2, "row_version": VERSION, "row_nbytes": 64}
    reason = LynxKVManager._lynx_mismatch(prefill, decode)
    assert reason.startswith("Lynx settings differ: prefill runs --lynx-mode lynx --lynx-stages 4,4 "
                             "--lynx-group-size 64 --lynx-first-token-at-prefill, decode runs --lynx-mode lynx "
                             "--lynx-stages 4,4 --lynx-group-size 64 --no-lynx-first-token-at-prefill;")
    decode["first_token_at_prefill"] = True
    assert LynxKVManager._lynx_mismatch(prefill, decode) is None
    assert "decode runs --lynx-mode lynx --lynx-stages 4,2,2 " in LynxKVManager._lynx_mismatch(
        prefill, {**decode, "stages": "4,2,2"})
    assert LynxKVManager._lynx_mismatch(prefill, {**decode, "tp_size": 1}).startswith(
        "Lynx needs the same --tp-size on both workers (each rank sends its own KV heads to its peer rank): "
        "prefill runs --tp-size 2, decode --tp-size 1")


def test_the_ranks_of_a_worker_agree_entry_by_entry_and_a_single_rank_decides_alone(tmp_path):
    import multiprocessing

    import torch.distributed as dist

    from sglang_lynx.streams import ranks

    seen = {0: [True, True, False], 1: [True, False, False]}  # e.g. whose Residual has landed, per rank

    def rank(i, store_path, results):
        group = dist.ProcessGroupGloo(dist.FileStore(store_path, 2), i, 2)
        results.put((i, ranks.on_every_rank(group, seen[i]), ranks.on_any_rank(group, seen[i]),
                     ranks.fewest(group, 10 + i), ranks.on_every_rank(group, [])))

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=rank, args=(i, str(tmp_path / "store"), results)) for i in range(2)]
    for worker in workers:
        worker.start()
    got = dict((i, rest) for i, *rest in (results.get(timeout=60) for _ in workers))
    for worker in workers:
        worker.join(10)
    agreed = ([True, False, False], [True, True, False], 10, [])
    assert got == {0: list(agreed), 1: list(agreed)}

    alone = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)
    assert ranks.on_every_rank(alone, seen[1]) == seen[1] and ranks.fewest(alone, 7) == 7


def test_requests_waiting_for_rows_are_timed_from_their_first_wait():
    manager = decode_manager()
    manager.note_waiting(held=[1, 2], admitted=[])
    first = dict(manager.waiting_since)
    time.sleep(0.01)
    manager.note_waiting(held=[2], admitted=[1])  # 1 is let through: its wait ends when it takes rows
    assert manager.waiting_since == first
    manager.note_waiting(held=[], admitted=[])  # 2 was aborted while it waited
    assert manager.waiting_since == {}


def prefill_manager(num_rows=4):
    """The prefill-side state of a Lynx KV manager, with SGLang's sending stubbed to a log."""
    from sglang_lynx.streams.mooncake import LynxKVManager
    from sglang_lynx.streams.timings import Timings

    manager = LynxKVManager.__new__(LynxKVManager)
    manager.lynx = LynxConfig(mode="lynx")
    manager.rows = staging(manager.lynx, fake_pool(num_pages=num_rows))
    manager.staged, manager.peer_rows, manager.request_status, manager.first_token_messages = {}, {}, {}, {}
    manager.waiting_chunks, manager.timings = collections.deque(), Timings(None, role="prefill")
    manager.disaggregation_mode = types.SimpleNamespace(value="prefill")
    manager.sent, manager.failed = [], []
    manager.streams = types.SimpleNamespace(submit=lambda priority, job: manager.sent.append(job.args[0].room))
    manager.conclude_failure = lambda bootstrap_room, failure_reason: manager.failed.append((bootstrap_room, failure_reason))
    return manager


def chunk(manager, room, pages, first=0):
    """A chunk of request ``room``: pool pages ``pages``, the request's pages from ``first`` on."""
    from sglang_lynx.streams.mooncake import _Chunk

    forwarded = lambda kv_indices: manager.sent.append(("forwarded", room))
    return _Chunk(room, np.asarray(pages), 64 * len(pages), slice(first, first + len(pages)), True,
                  [("decode", None)], forwarded, time.time())


def test_prefill_encodes_a_request_only_once_it_holds_rows_for_all_its_pages_oldest_first():
    manager = prefill_manager(num_rows=4)
    manager.peer_rows = {1: {"decode": np.arange(3)}, 2: {"decode": np.arange(2)}, 3: {"decode": np.arange(1)},
                         4: {"decode": np.arange(5)}}
    for c in (chunk(manager, 1, [0]), chunk(manager, 2, [1, 2]), chunk(manager, 3, [3])):
        manager.waiting_chunks.append(c)
    manager.start_waiting_chunks()
    # 1 takes 3 of the 4 rows at its first chunk; 2 needs 2 and waits; 3 would fit but is newer: waits too.
    assert manager.sent == [1] and [c.room for c in manager.waiting_chunks] == [2, 3]
    manager.waiting_chunks.append(chunk(manager, 1, [2, 3], first=1))  # 1's next chunk: its rows are taken
    manager.start_waiting_chunks()
    assert manager.sent == [1, 1] and len(manager.staged[1]) == 3

    manager._free_rows(1)  # its last stream has gone: 2 and 3 go, in order
    manager.start_waiting_chunks()
    assert manager.sent == [1, 1, 2, 3] and not manager.waiting_chunks and manager.rows.rows_in_use == 3

    manager.waiting_chunks.append(chunk(manager, 4, [0]))  # 5 pages: more than the whole area
    manager.start_waiting_chunks()
    [(room, reason)] = manager.failed
    assert room == 4 and re.fullmatch(r"Lynx: the prompt needs 5 Lynx rows \(.* MiB\) but the prefill worker's "
                                      r"staging area holds 4 \(.* MiB\): raise --lynx-staging-mb", reason)
    assert manager.sent[-1] == ("forwarded", 4)  # SGLang concludes the failed request


def test_requests_anchored_on_a_lost_prefill_learn_that_their_residual_will_not_come():
    manager = decode_manager()
    manager.expect_residual(1, "10.0.0.1:8998")
    manager.expect_residual(2, "10.0.0.2:8998")
    manager._handle_node_failure("10.0.0.1:8998")  # SGLang's heartbeat gave up on that prefill
    assert manager.arrived.is_set()  # an idle scheduler wakes for it
    failure = manager.take_residual_arrival(1).failure
    assert "lost the prefill worker (10.0.0.1:8998)" in failure
    assert manager.take_residual_arrival(2) is None  # its prefill is alive: it waits on


def test_a_second_release_of_a_failed_request_keeps_its_rows_quarantined():
    manager = decode_manager()
    manager.staged = {5: manager.rows.alloc(2)}
    manager.release_rows(5, residual_due=True, rows_written=True)  # Lynx: its Anchor failed to land
    manager.release_rows(5, residual_due=True)  # then SGLang releases the failed request
    assert manager.rows.rows_in_use == 2  # its Residual may still be written into them
    manager._on_residual_message(residual_message(5))
    assert manager.rows.rows_in_use == 0 and not manager.abandoned


def test_quarantined_rows_come_back_after_the_timeout_even_on_an_idle_worker():
    manager = decode_manager(waiting_timeout=0.1)
    manager.staged = {5: manager.rows.alloc(2)}
    manager.release_rows(5, residual_due=True, rows_written=True)
    assert manager.rows.rows_in_use == 2
    time.sleep(0.2)
    manager.note_waiting(held=[], admitted=[])  # the prealloc queue is polled
    assert manager.rows.rows_in_use == 0 and not manager.abandoned
