"""The codec on real KV: SmolLM2-135M's cache for the opening of Hamlet (the issue's targets, measured
in full by `python -m sglang_lynx.bench codec`)."""

import json

import pytest
import torch

from sglang_lynx.codec import Codec
from sglang_lynx.codec.rtn import fake_quantize

TOKENS = 256


@pytest.fixture(scope="module")
def smollm2_path():
    from sglang_lynx.models import smollm2

    try:
        return smollm2()
    except FileNotFoundError as e:
        pytest.skip(f"the bundled model is not installed: {e}")


@pytest.fixture(scope="module")
def kv(smollm2_path):
    from sglang_lynx.data import gutenberg_text, prefill_kv

    return prefill_kv(smollm2_path, gutenberg_text("hamlet"), TOKENS)


def vnmse(x_hat, kv):
    return ((x_hat - kv).square().flatten(1).sum(1) / kv.square().flatten(1).sum(1)).tolist()


def test_merged_is_int8_and_anchor_beats_same_grouping_int4_by_5_percent_on_k_and_v(kv):
    codec = Codec(num_layers=kv.shape[1], num_heads=kv.shape[3], head_dim=kv.shape[4])
    planes = codec.encode(kv)
    merged = codec.decode_merged(planes.anchor, planes.residual, planes.meta, TOKENS)
    assert torch.equal(merged, fake_quantize(kv, 64, 1, 8))
    anchor = vnmse(codec.decode_anchor(planes.anchor, planes.meta, TOKENS), kv)
    int4 = vnmse(fake_quantize(kv, 64, 1, 4), kv)
    assert anchor[0] <= 0.95 * int4[0] and anchor[1] <= 0.95 * int4[1]


def test_per_channel_grouping_has_the_lowest_int8_error_of_the_shapes_with_equal_metadata(kv):
    shapes = [(64, 1), (16, 4), (8, 8), (1, 64)]  # tokens x channels, 64 elements each
    errors = {shape: vnmse(fake_quantize(kv, *shape, 8), kv) for shape in shapes}
    for part in (0, 1):  # K, V
        assert min(errors, key=lambda s: errors[s][part]) == (64, 1)


def test_benchmark_writes_the_issue_s_json(smollm2_path, tmp_path):
    from sglang_lynx.bench.__main__ import main

    out = tmp_path / "codec.json"
    main(["codec", "--tokens", "64", "--repeats", "1", "--json", str(out)])
    r = json.loads(out.read_text())
    for name in ("int4", "int4_naive", "int8", "anchor", "merged"):
        assert set(r["vnmse"][name]) == {"k", "v"}
    assert set(r["bits_per_element"]) >= {"anchor", "residual", "int8"}
    assert set(r["throughput_gbps"]) >= {"quantize_split", "dequant_anchor", "merge_dequant", "copy"}
    assert r["merge_exact"] is True and r["device"].startswith("cpu")
    assert r["grouping"]["candidates"]["64x1"]["int8"] == r["vnmse"]["int8"]


def test_margin_shift_measures_how_far_the_anchor_moves_int8_s_top_two_gap():
    from sglang_lynx.bench.acceptance import margin_shift

    exact = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]])
    anchor = torch.tensor([[2.5, 1.5, 9.0], [0.0, 1.0, 1.5]])  # row 0: token 2 overtakes; row 1: 1 and 2 swap
    shift, flipped = margin_shift(exact, anchor)
    assert shift.tolist() == [1.0, 1.0]  # gaps of the same pair: 2.0 -> 1.0 and 0.5 -> -0.5
    assert flipped.tolist() == [True, True]
    assert margin_shift(exact, exact)[1].tolist() == [False, False]


def test_acceptance_benchmark_reports_kept_tokens_and_flip_rates(smollm2_path, tmp_path):
    from sglang_lynx.bench.__main__ import main

    out = tmp_path / "acceptance.json"
    main(["acceptance", "--anchor-bits", "3", "--stages", "3,3,2", "--input-len", "64", "--output-len", "8",
          "--num-prompts", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["int8_gap_median"] > 0
    for r in report["variants"].values():
        assert all(0 <= k <= 7 for k in r["kept"]) and 0 <= r["accept_rate"] <= 1
        assert 0 <= r["flip_rate"] <= 1
    # A 3,3,2 plan drafts on 6 bits once its middle stage has landed: each bit about halves the shift.
    wide, narrow = report["variants"]["stages 3,3,2"], report["variants"]["A=3"]
    assert narrow["margin_shift_median"] > 2 * wide["margin_shift_median"] > 0
