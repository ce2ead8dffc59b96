"""How many speculated tokens a model would keep: greedy decoding on Anchor-only KV against INT8 KV.

    python -m sglang_lynx.bench acceptance --anchor-bits 4,5,6 --input-len 256 --output-len 32
    python -m sglang_lynx.bench acceptance --anchor-bits 4 --stages 4,2,2 5,2,1   # progressive plans

No servers: the model runs in-process (Hugging Face transformers, CPU). For each prompt (windows of a
Gutenberg text) its KV cache is encoded with the Lynx codec; the model then decodes greedily twice
from the same first token, once on the INT8 KV (what verification compares against) and once on the
Anchor-only KV (what ``lynx`` speculates on). The number of leading tokens on which the two agree is
what verification would keep of a speculation of that length: acceptance is its mean over the
speculated tokens. ``--split`` also anchors only the keys, or only the values, at the first anchor
width, to tell which the model is sensitive to.

``--stages`` predicts progressive plans (bits per stage, 8 in all: ``4,2,2`` sends the Anchor's 4 bits,
then 2, then the last 2). Decode re-drafts when a middle stage lands: it keeps its drafts up to the
first token the KV at those bits disagrees with, takes that KV's token there and drafts on. Greedy
drafts are then the greedy tokens on the middle stage's KV (its codes with the missing low bits at
the middle of their range), which is what the final verification on INT8 KV compares.

Why a speculation ends is measured too, token by token: one teacher-forced pass over INT8's greedy
tokens, on each KV, gives at every position INT8's top-2 logit gap and how far the Anchor moves it
(the *margin shift*); a position *flips* where the Anchor's argmax differs from INT8's. A speculation
survives n tokens only if none of them flips, about (1 - f)**n of the time at a flip rate f: the
rate says whether a model suits a given Anchor width.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from sglang_lynx.bench import write_json
from sglang_lynx.codec import Codec
from sglang_lynx.config import stage_plan
from sglang_lynx.data import gutenberg_text
from sglang_lynx.models import add_model_argument, resolve


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("acceptance", help="predicted acceptance: decoding on Anchor vs INT8 KV (no servers)",
                              description=__doc__.split("\n")[0])
    p.add_argument("--anchor-bits", default="4,5,6", help="comma-separated Anchor widths to compare")
    p.add_argument("--split", action="store_true", help="also anchor only K, and only V (first width)")
    p.add_argument("--stages", nargs="*", default=[], type=stage_plan, metavar="A,B[,C]",
                   help="progressive plans to predict, e.g. 4,4 4,2,2: drafts on the KV of all but the last stage")
    p.add_argument("--group-size", type=int, default=64, help="tokens per quantization group (--lynx-group-size)")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=32, help="tokens decoded (the first is exact)")
    p.add_argument("--num-prompts", type=int, default=6)
    p.add_argument("--text", default="hamlet", help="Gutenberg text the prompts are cut from")
    add_model_argument(p)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.set_defaults(run=run)


def variants(widths: list[int], split: bool, plans: list[tuple[int, ...]] = ()) -> dict[str, tuple]:
    """name -> (anchor bits, anchor K, anchor V, the Residual's stages: their bits, of which the first landed)."""
    out = {f"A={a}": (a, True, True, ()) for a in widths}
    if split:
        out[f"A={widths[0]}, K only"] = (widths[0], True, False, ())
        out[f"A={widths[0]}, V only"] = (widths[0], False, True, ())
    out.update((f"stages {','.join(map(str, p))}", (p[0], True, True, p[1:] if len(p) > 2 else ())) for p in plans)
    return out


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    widths = [int(a) for a in args.anchor_bits.split(",")]
    model_path = resolve(args.model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = tokenizer(gutenberg_text(args.text)).input_ids
    stride = (len(ids) - args.input_len) // args.num_prompts
    prompts = [ids[i * stride: i * stride + args.input_len] for i in range(args.num_prompts)]
    cases = variants(widths, args.split, args.stages)
    kept = {name: [] for name in cases}
    shifts = {name: [] for name in cases}  # per position: how far the Anchor moves INT8's top-2 gap
    flips = {name: [] for name in cases}
    gaps = []  # per position: INT8's top-2 gap
    with torch.inference_mode(), tqdm(total=len(prompts) * len(cases), desc="bench acceptance") as progress:
        for prompt in prompts:
            out = model(torch.tensor([prompt]), use_cache=True)
            kv = torch.stack([torch.stack([layer.keys[0] for layer in out.past_key_values.layers]),
                              torch.stack([layer.values[0] for layer in out.past_key_values.layers])])
            kv = kv.transpose(2, 3).contiguous()  # [2, L, T, H, D]
            first = int(out.logits[0, -1].argmax())
            reference = exact_logits = None
            for name, (bits, anchor_k, anchor_v, stages) in cases.items():
                codec = Codec(kv.shape[1], kv.shape[3], kv.shape[4], anchor_bits=bits, group_size=args.group_size)
                T = kv.shape[2]
                planes = codec.encode(kv)
                exact = codec.decode_merged(planes.anchor, planes.residual, planes.meta, T)
                if stages:  # the KV decode drafts on once the middle stage has landed
                    middle = codec.merge_residual(codec.split_residual(planes.residual, T, stages)[:1], T, stages)
                    anchor = codec.decode_merged(planes.anchor, middle, planes.meta, T)
                else:
                    anchor = codec.decode_anchor(planes.anchor, planes.meta, T)
                anchor = torch.stack([anchor[0] if anchor_k else exact[0], anchor[1] if anchor_v else exact[1]])
                if reference is None:  # INT8 codes do not depend on the Anchor width
                    reference = greedy(model, exact, first, args.output_len)
                    exact_logits = forced_logits(model, exact, reference)
                    top2 = exact_logits.topk(2, dim=-1).values
                    gaps += (top2[:, 0] - top2[:, 1]).tolist()
                draft = greedy(model, anchor, first, args.output_len)
                kept[name].append(next((j for j in range(1, len(draft)) if draft[j] != reference[j]), len(draft)) - 1)
                shift, flipped = margin_shift(exact_logits, forced_logits(model, anchor, reference))
                shifts[name] += shift.tolist()
                flips[name] += flipped.tolist()
                progress.update()
    speculated = args.output_len - 1
    report = {"input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
              "text": args.text, "group_size": args.group_size, "int8_gap_median": statistics.median(gaps),
              "variants": {name: {"kept": k, "accepted_mean": statistics.mean(k),
                                  "accept_rate": statistics.mean(k) / speculated,
                                  "flip_rate": statistics.mean(flips[name]),
                                  "margin_shift_median": statistics.median(shifts[name])}
                           for name, k in kept.items()}}
    print(f"\n{args.num_prompts} windows of {args.text}, {args.input_len} tokens; greedy, {speculated} tokens "
          f"after the exact first one; INT8's top-2 logit gap: median {report['int8_gap_median']:.3f}")
    for name, r in report["variants"].items():
        print(f"{name:<16} kept {r['accepted_mean']:5.1f} of {speculated}  (acceptance {r['accept_rate']:.2f})  "
              f"flip rate {r['flip_rate']:.3f}  margin shift {r['margin_shift_median']:.3f}  "
              f"per prompt {r['kept']}")
    write_json(args.json, report)
    return report


def cache_of(kv: torch.Tensor):
    """A transformers cache holding ``kv`` [2, L, T, H, D] (a copy: decoding appends to it)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for layer in range(kv.shape[1]):  # the cache holds [batch, heads, tokens, dim]
        cache.update(kv[0, layer].transpose(0, 1)[None].clone(), kv[1, layer].transpose(0, 1)[None].clone(), layer)
    return cache


def greedy(model, kv: torch.Tensor, first: int, num_tokens: int) -> list[int]:
    """Greedy tokens after a prompt whose KV cache is ``kv`` [2, L, T, H, D], starting from ``first``."""
    cache = cache_of(kv)
    tokens = [first]
    for _ in range(num_tokens - 1):
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def forced_logits(model, kv: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens) - 1, V] predicting tokens[1:] after ``kv``, all positions in one pass."""
    return model(torch.tensor([tokens[:-1]]), past_key_values=cache_of(kv), use_cache=True).logits[0]


def margin_shift(exact: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of two logit tensors [N, V]: how much ``anchor`` changes the gap between exact's
    top two tokens (absolute), and whether anchor's argmax differs from exact's."""
    top2 = exact.topk(2, dim=-1)
    pair = anchor.gather(-1, top2.indices)
    shift = (pair[:, 0] - pair[:, 1] - (top2.values[:, 0] - top2.values[:, 1])).abs()
    return shift, anchor.argmax(-1) != top2.indices[:, 0]
