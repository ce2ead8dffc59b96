"""Greedy ``lynx`` against greedy ``int8`` on many prompts, each divergence explained.

    python -m sglang_lynx.bench agreement --num-prompts 100 --json bench-agreement.json
    python -m sglang_lynx.bench agreement --stages 4,2,2 ...  # lynx re-drafting at a middle stage

Brings up an ``int8`` cluster, then a ``lynx`` one, on the same paced link, and asks both the same
prompts (windows of several Gutenberg texts as completions, and questions about them as chat), a
few at a time so that every ``lynx`` request speculates before its Residual lands. Both runs return
the top logprobs of every token. Where the answers differ, the report gives the first differing
position and int8's margin there: the gap between its two most likely tokens. ``lynx`` keeps
exactly the tokens of the exact (INT8) model, so a divergence can only come from floating-point
differences between its verify pass (all positions at once) and int8's decode steps (one at a
time), which decide only near-ties.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from sglang_lynx.bench import write_json
from sglang_lynx.client import complete
from sglang_lynx.cluster import ClusterSpec, PDCluster
from sglang_lynx.config import LynxConfig, stage_plan
from sglang_lynx.data import gutenberg_text
from sglang_lynx.models import add_model_argument, resolve

TEXTS = ("hamlet", "macbeth", "lear", "othello", "tempest")
TOP = 5  # logprobs per position


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("agreement", help="greedy lynx vs int8 on many prompts, divergences explained",
                              description=__doc__.split("\n")[0])
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--bandwidth-mbps", type=float, default=16.0, help="emulated KV link rate")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel ranks per worker (SGLang's --tp-size)")
    p.add_argument("--stages", type=stage_plan, default=(4, 4), metavar="A,B[,C]",
                   help="the lynx cluster's progressive plan (--lynx-stages), e.g. 4,2,2")
    add_model_argument(p)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.set_defaults(run=run)


def make_prompts(model_path: str, n: int) -> list:
    """Text windows of 48 to 400 tokens from several plays; every other one as a chat question."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = [tokenizer(gutenberg_text(name)).input_ids for name in TEXTS]
    prompts = []
    for i in range(n):
        ids = texts[i % len(TEXTS)]
        length = 48 + (i * 37) % 353
        start = (len(ids) - length) * (i // len(TEXTS) + 1) // (n // len(TEXTS) + 2)
        passage = tokenizer.decode(ids[start: start + length])
        prompts.append(passage if i % 2 == 0 else
                       [{"role": "user", "content": f"Here is a passage:\n\n{passage}\n\nWho speaks in it?"}])
    return prompts


def per_token(logprobs: dict) -> list[tuple[str, list[tuple[str, float]]]]:
    """(token, [(candidate, logprob) by rank]) per generated token, for completions or chat."""
    if "content" in logprobs:  # chat
        return [(t["token"], [(c["token"], c["logprob"]) for c in t["top_logprobs"]]) for t in logprobs["content"]]
    return [(token, sorted(top.items(), key=lambda kv: -kv[1]))
            for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"])]


def ask(url: str, prompt, max_tokens: int):
    chat = isinstance(prompt, list)
    extra = {"logprobs": True, "top_logprobs": TOP} if chat else {"logprobs": TOP}
    return complete(url, prompt, max_tokens=max_tokens, **extra)


def run_mode(mode: str, args, model_path: str, prompts: list, log_dir: Path) -> dict:
    timings = log_dir / f"{mode}-timings.jsonl"
    lynx = LynxConfig(mode=mode, bandwidth_mbps=args.bandwidth_mbps, timings_file=str(timings),
                      anchor_bits=args.stages[0], residual_stages=args.stages[1:])
    spec = ClusterSpec(model_path=model_path, lynx=lynx, log_dir=log_dir / mode,
                       server_args=["--tp-size", str(args.tp_size)] if args.tp_size > 1 else [])
    with PDCluster(spec), ThreadPoolExecutor(args.concurrency) as pool, \
            tqdm(total=len(prompts), desc=f"agreement {mode}", unit="req") as progress:
        def one(prompt):
            answer = ask(spec.router_url, prompt, args.max_tokens)
            progress.update()
            return answer

        answers = list(pool.map(one, prompts))
    decode = {r.get("rid"): r for r in map(json.loads, timings.read_text().splitlines()) if r["role"] == "decode"}
    return {"answers": answers, "decode": [decode.get(a.id, {}) for a in answers]}


def compare(int8: list, lynx: list) -> dict:
    divergences = []
    for i, (a, b) in enumerate(zip(int8, lynx)):
        if a.text == b.text:
            continue
        ours, theirs = per_token(a.logprobs), per_token(b.logprobs)
        j = next((j for j, (x, y) in enumerate(zip(ours, theirs)) if x[0] != y[0]), min(len(ours), len(theirs)))
        entry = {"prompt": i, "position": j}
        if j < len(ours) and j < len(theirs):
            top = ours[j][1]
            ranked = [token for token, _ in top]
            entry.update(int8_token=ours[j][0], lynx_token=theirs[j][0],
                         int8_gap=top[0][1] - top[1][1] if len(top) > 1 else None,
                         lynx_token_rank_in_int8=ranked.index(theirs[j][0]) + 1 if theirs[j][0] in ranked else None,
                         lynx_gap=theirs[j][1][0][1] - theirs[j][1][1][1] if len(theirs[j][1]) > 1 else None)
        divergences.append(entry)
    return {"prompts": len(int8), "identical": len(int8) - len(divergences), "divergences": divergences}


def run(args: argparse.Namespace) -> dict:
    model_path = resolve(args.model_path)
    prompts = make_prompts(model_path, args.num_prompts)
    with tempfile.TemporaryDirectory(prefix="lynx-agreement-") as tmp:
        runs = {mode: run_mode(mode, args, model_path, prompts, Path(tmp)) for mode in ("int8", "lynx")}
    report = compare(runs["int8"]["answers"], runs["lynx"]["answers"])
    verified = [r for r in runs["lynx"]["decode"] if r.get("speculated")]
    report.update(
        max_tokens=args.max_tokens, bandwidth_mbps=args.bandwidth_mbps, concurrency=args.concurrency,
        tp_size=args.tp_size, stages=",".join(map(str, args.stages)),
        redrafted_requests=sum(r.get("redrafted", 0) > 0 for r in verified),
        redrafted_tokens=sum(r.get("redrafted", 0) for r in verified),
        speculated_min=min((r["speculated"] for r in verified), default=0),
        speculated_mean=statistics.mean(r["speculated"] for r in verified) if verified else 0,
        accept_rate_mean=(sum(r["accepted"] for r in verified) / sum(r["speculated"] for r in verified)
                          if verified else None),
        rolled_back_requests=sum(r["accepted"] < r["speculated"] for r in verified))
    print_report(report)
    write_json(args.json, report)
    return report


def print_report(report: dict) -> None:
    ranks = f", {report['tp_size']} tensor-parallel ranks per worker" if report["tp_size"] > 1 else ""
    if report["stages"] != "4,4":
        ranks += (f", lynx in stages {report['stages']} ({report['redrafted_requests']} requests re-drafted "
                  f"{report['redrafted_tokens']} tokens at the middle stage)")
    print(f"\ngreedy lynx == int8 on {report['identical']} of {report['prompts']} prompts{ranks} "
          f"({report['max_tokens']} tokens each; every lynx request speculated >= {report['speculated_min']} "
          f"tokens, {report['speculated_mean']:.1f} on average; acceptance {report['accept_rate_mean']:.3f}; "
          f"{report['rolled_back_requests']} requests rolled back)")
    for d in report["divergences"]:
        if "int8_gap" in d:
            print(f"  prompt {d['prompt']}: token {d['position']}: int8 {d['int8_token']!r} vs lynx "
                  f"{d['lynx_token']!r}, int8's top-2 logprob gap {d['int8_gap']:.2e} "
                  f"(lynx's token is int8's #{d['lynx_token_rank_in_int8']})")
        else:
            print(f"  prompt {d['prompt']}: one answer is a prefix of the other (ends at token {d['position']})")
