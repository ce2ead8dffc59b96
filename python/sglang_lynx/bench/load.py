"""Load: many requests of mixed lengths on a paced link, some clients leaving early; per mode, one run.

    python -m sglang_lynx.bench load --modes int8,lynx --num-requests 200 --concurrency 16 \\
        --min-len 128 --max-len 4096 --bandwidth-mbps 200 --disconnect-share 0.1 --json bench-load.json

Per mode a cluster (prefill, decode, router) is started and loaded with the same requests: prompt
lengths log-uniform between the bounds, each a different window of Hamlet, streamed through the
router's OpenAI API, ``--concurrency`` at a time; ``--disconnect-share`` of the clients close their
connection early (half before the first token, half right after it). Reported per mode: requests that
failed among those that stayed (must be 0), throughput, p50/p99 TTFT, and the workers' books before and
after (RSS, KV tokens in use, Lynx rows in use: back to their baseline). After the first mode's load,
a sample of prompts is answered again one at a time by that mode (``int8``): every mode's greedy
answers to them under load must equal those.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests
from tqdm import tqdm

from sglang_lynx.bench import parse_choices, write_json
from sglang_lynx.bench.faults import Disconnect
from sglang_lynx.client import complete
from sglang_lynx.cluster import ClusterSpec, PDCluster, settled
from sglang_lynx.config import LynxConfig
from sglang_lynx.data import text_windows
from sglang_lynx.models import add_model_argument, resolve

RSS_SLACK = 0.10  # allocator caches and lazily built kernels: RSS may settle a little above its baseline


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("load", help="mixed-length load with early disconnects, per mode",
                              description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="int8,lynx", help="comma-separated Lynx modes, one cluster each; "
                                                        "the first answers the reference sample")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--min-len", type=int, default=128, help="shortest prompt, tokens")
    p.add_argument("--max-len", type=int, default=4096, help="longest prompt, tokens")
    p.add_argument("--output-len", type=int, default=16, help="tokens generated per request")
    p.add_argument("--bandwidth-mbps", type=float, default=200.0, help="emulated KV link rate")
    p.add_argument("--disconnect-share", type=float, default=0.1, help="clients that leave early")
    p.add_argument("--sample", type=int, default=20, help="prompts whose greedy answers are compared")
    p.add_argument("--seed", type=int, default=0)
    add_model_argument(p)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.set_defaults(run=run)


def workload(args) -> tuple[list[int], set[int], list[int]]:
    """Prompt lengths, the requests whose clients leave early, and the sampled requests (which stay)."""
    rng = random.Random(args.seed)
    lo, hi = math.log(args.min_len), math.log(args.max_len)
    lengths = [int(math.exp(rng.uniform(lo, hi))) for _ in range(args.num_requests)]
    leaving = set(rng.sample(range(args.num_requests), round(args.disconnect_share * args.num_requests)))
    staying = [i for i in range(args.num_requests) if i not in leaving]
    return lengths, leaving, rng.sample(staying, min(args.sample, len(staying)))


def rss_mib(pd: PDCluster) -> float:
    """Resident memory of every worker process and its children (schedulers), MiB."""
    total = 0
    for name in pd.urls:
        for pid in pd.pids(name):
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total / 2**20


def worker_books(pd: PDCluster, timeout: float = 120) -> dict:
    """RSS and what each worker holds, once they hold nothing (or at the timeout)."""
    books, _ = pd.wait_settled(timeout)
    return {"rss_mib": round(rss_mib(pd)), "workers": books, "settled": settled(books)}


def one_request(url: str, prompt: str, output_len: int, leave: str | None) -> dict:
    """Stream one completion; ``leave``: "before" (the first token) or "after" it, or None (stay)."""
    def on_text(_piece: str) -> None:
        if leave == "after":
            raise Disconnect

    start = time.monotonic()
    try:
        timeout = (5, 0.5) if leave == "before" else 1800
        done = complete(url, prompt, max_tokens=output_len, stream=True, timeout=timeout, on_text=on_text,
                        ignore_eos=True)
    except (Disconnect, RuntimeError, requests.exceptions.RequestException) as e:
        if leave and isinstance(e, (Disconnect, requests.exceptions.Timeout)):
            return {"ok": None, "seconds": time.monotonic() - start}  # left, as planned
        return {"ok": False, "error": str(e)[:300], "seconds": time.monotonic() - start}
    return {"ok": True, "text": done.text, "ttft_s": done.ttft_s, "seconds": time.monotonic() - start}


def load(pd: PDCluster, prompts: list[str], leaving: set[int], args, mode: str) -> tuple[list[dict], float]:
    leave = {i: ("before" if k % 2 == 0 else "after") for k, i in enumerate(sorted(leaving))}
    results: list[dict] = [{}] * len(prompts)
    start = time.monotonic()
    with ThreadPoolExecutor(args.concurrency) as pool, tqdm(total=len(prompts), desc=f"{mode} load") as bar:
        futures = {pool.submit(one_request, pd.spec.router_url, p, args.output_len, leave.get(i)): i
                   for i, p in enumerate(prompts)}
        for future in futures:
            results[futures[future]] = future.result()
            bar.update()
    return results, time.monotonic() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_mode(mode: str, args, model_path: str, prompts: list[str], lengths: list[int], leaving: set[int],
             sample: list[int], reference: dict, log_dir: Path) -> dict:
    spec = ClusterSpec(model_path=model_path, log_dir=log_dir / mode,
                       lynx=LynxConfig(mode=mode, bandwidth_mbps=args.bandwidth_mbps))
    print(f"\n=== {mode}: starting prefill, decode and router ...", flush=True)
    with PDCluster(spec) as pd:
        before = worker_books(pd)
        results, wall_s = load(pd, prompts, leaving, args, mode)
        after = worker_books(pd)
        if not reference:  # after its load, whose prompts it would otherwise find in its prefix cache
            for i in tqdm(sample, desc=f"{mode} sequential sample"):
                reference[i] = complete(spec.router_url, prompts[i], max_tokens=args.output_len,
                                        ignore_eos=True).text
    stayed = [r for r in results if r["ok"] is not None]
    done = [r for r in stayed if r["ok"]]
    ttfts = [r["ttft_s"] * 1000 for r in done]
    differing = [i for i in sample if results[i].get("text") != reference[i]]
    rss_back = after["rss_mib"] <= before["rss_mib"] * (1 + RSS_SLACK)
    return {
        "requests": len(results), "stayed": len(stayed), "left_early": len(results) - len(stayed),
        "failed": len(stayed) - len(done), "errors": sorted({r["error"] for r in stayed if r["ok"] is False})[:5],
        "wall_s": round(wall_s, 1), "requests_per_s": round(len(done) / wall_s, 3),
        "output_tokens_per_s": round(len(done) * args.output_len / wall_s, 1),
        "input_tokens_per_s": round(sum(n for n, r in zip(lengths, results) if r["ok"]) / wall_s),
        "p50_ttft_ms": round(percentile(ttfts, 50)), "p99_ttft_ms": round(percentile(ttfts, 99)),
        "sample_equal_to_sequential": len(sample) - len(differing), "sample_size": len(sample),
        "sample_differing": differing,
        "books_before": before, "books_after": after,
        "kv_and_rows_back": after["settled"],
        "rss_back": rss_back,
    }


def run(args: argparse.Namespace) -> dict:
    modes = parse_choices(args.modes, "load")
    model_path = resolve(args.model_path)
    lengths, leaving, sample = workload(args)
    prompts = text_windows(model_path, lengths)
    reference: dict = {}
    with tempfile.TemporaryDirectory(prefix="lynx-load-") as tmp:
        report = {"modes": {m: run_mode(m, args, model_path, prompts, lengths, leaving, sample, reference,
                                            Path(tmp))
                            for m in modes},
                  "num_requests": args.num_requests, "concurrency": args.concurrency,
                  "prompt_tokens": {"min": min(lengths), "median": int(statistics.median(lengths)),
                                    "max": max(lengths)},
                  "output_len": args.output_len, "bandwidth_mbps": args.bandwidth_mbps,
                  "disconnect_share": args.disconnect_share, "reference_mode": modes[0]}
    print(f"\n{'mode':<6} {'stayed':>6} {'failed':>6} {'req/s':>6} {'out tok/s':>9} {'p50 TTFT ms':>11} "
          f"{'p99 TTFT ms':>11} {'sample eq':>9} {'RSS MiB before/after':>21} {'KV+rows back':>12}")
    for mode, r in report["modes"].items():
        rss = f"{r['books_before']['rss_mib']}/{r['books_after']['rss_mib']}"
        print(f"{mode:<6} {r['stayed']:>6} {r['failed']:>6} {r['requests_per_s']:>6} {r['output_tokens_per_s']:>9} "
              f"{r['p50_ttft_ms']:>11} {r['p99_ttft_ms']:>11} {r['sample_equal_to_sequential']:>4}/{r['sample_size']:<4} "
              f"{rss:>21} {str(r['kv_and_rows_back']):>12}")
    write_json(args.json, report)
    bad = [m for m, r in report["modes"].items()
           if r["failed"] or r["sample_differing"] or not r["kv_and_rows_back"] or not r["rss_back"]]
    if bad:
        sys.exit(f"bench load: {', '.join(bad)} failed a check")
    return report
