"""Bring up prefill + decode + router, ask one chat question through the router, shut down.

    python -m sglang_lynx.demo [--lynx-mode lynx] [--question "..."]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

from sglang_lynx.client import complete
from sglang_lynx.cluster import ClusterSpec, PDCluster
from sglang_lynx.config import LynxConfig
from sglang_lynx.models import smollm2


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # run the same clean-up as Ctrl-C


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sglang_lynx.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-tokens", type=int, default=48)
    LynxConfig.add_cli_args(parser)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)

    spec = ClusterSpec(model_path=str(smollm2()), lynx=LynxConfig.from_cli_args(args))
    started = time.perf_counter()
    print(f"starting prefill, decode and router (lynx mode: {spec.lynx.mode}; logs in {spec.log_dir}/) ...",
          flush=True)
    try:
        with PDCluster(spec):
            print(f"cluster ready in {time.perf_counter() - started:.0f} s; router at {spec.router_url}")
            print(f"\nuser: {args.question}")
            answer = complete(spec.router_url, [{"role": "user", "content": args.question}],
                              max_tokens=args.max_tokens, stream=True)
            print(f"assistant: {answer.text.strip()}\n")
            print(f"time to first token: {answer.ttft_s * 1000:.0f} ms")
            print(f"total time:          {answer.total_s * 1000:.0f} ms ({len(answer.chunks)} streamed chunks)")
            print("shutting down ...")
    except KeyboardInterrupt:
        print("\ninterrupted: cluster stopped", file=sys.stderr)
        sys.exit(130)
    print("done: all servers stopped")


if __name__ == "__main__":
    main()
