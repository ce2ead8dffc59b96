"""SGLang's own load generator, ``sglang.bench_serving``, against a Lynx PD cluster started for it.

    python -m sglang_lynx.bench serving --modes lynx --bandwidth-mbps 20 --num-prompts 16 \\
        --input-len 256 --output-len 32 --max-concurrency 4 --json bench-serving.json

For each mode: bring up prefill + decode + router, run ``python -m sglang.bench_serving --backend
sglang-oai --dataset-name random-ids`` against the router exactly as an SGLang user would (its
table is printed as it comes), stop the cluster. Exits non-zero if any request failed. JSON:
``modes.<mode>`` = bench_serving's own result record, plus ``failed``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from sglang_lynx.bench import parse_choices, write_json
from sglang_lynx.cluster import ClusterSpec, PDCluster
from sglang_lynx.config import LynxConfig
from sglang_lynx.models import add_model_argument, resolve


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serving", help="sglang.bench_serving against a Lynx PD cluster",
                              description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="lynx", help="comma-separated Lynx modes, one cluster each")
    p.add_argument("--bandwidth-mbps", type=float, default=20.0, help="emulated KV link rate")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (random ids)")
    p.add_argument("--output-len", type=int, default=32, help="tokens generated per request")
    p.add_argument("--max-concurrency", type=int, default=4, help="requests in flight at once")
    add_model_argument(p)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.set_defaults(run=run)


def bench_serving_cmd(router_url: str, model_path: str, output_file: Path, *, num_prompts: int, input_len: int,
                      output_len: int, max_concurrency: int) -> list[str]:
    return [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang-oai", "--base-url", router_url,
            "--dataset-name", "random-ids", "--tokenizer", model_path, "--model", model_path,
            "--num-prompts", str(num_prompts), "--random-input-len", str(input_len),
            "--random-output-len", str(output_len), "--random-range-ratio", "1.0",
            "--max-concurrency", str(max_concurrency), "--warmup-requests", "1",
            "--disable-tqdm", "--output-file", str(output_file)]


def run_mode(mode: str, args, model_path: str, tmp: Path) -> dict:
    output = tmp / f"{mode}.jsonl"
    spec = ClusterSpec(model_path=model_path, lynx=LynxConfig(mode=mode, bandwidth_mbps=args.bandwidth_mbps),
                       log_dir=tmp / mode)
    print(f"\n=== {mode}: starting prefill, decode and router ...", flush=True)
    with PDCluster(spec):
        subprocess.run(bench_serving_cmd(spec.router_url, model_path, output, num_prompts=args.num_prompts,
                                         input_len=args.input_len, output_len=args.output_len,
                                         max_concurrency=args.max_concurrency), check=True)
    result = json.loads(output.read_text().splitlines()[-1])
    result["failed"] = args.num_prompts - result["completed"]
    return result


def run(args: argparse.Namespace) -> dict:
    modes = parse_choices(args.modes, "serving")
    model_path = resolve(args.model_path)
    with tempfile.TemporaryDirectory(prefix="lynx-serving-") as tmp:
        report = {"modes": {mode: run_mode(mode, args, model_path, Path(tmp)) for mode in modes},
                  "bandwidth_mbps": args.bandwidth_mbps, "input_len": args.input_len,
                  "output_len": args.output_len, "num_prompts": args.num_prompts,
                  "max_concurrency": args.max_concurrency}
    print("\nmode   completed  failed  output tok/s  median TTFT (ms)  median ITL (ms)")
    for mode, r in report["modes"].items():
        print(f"{mode:<6} {r['completed']:>9} {r['failed']:>7} {r['output_throughput']:>13.1f} "
              f"{r['median_ttft_ms']:>17.0f} {r['median_itl_ms']:>16.1f}")
    write_json(args.json, report)
    if any(r["failed"] for r in report["modes"].values()):
        sys.exit("bench serving: some requests failed")
    return report
