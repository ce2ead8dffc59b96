"""Lynx on one machine: prefill + decode + router on a paced KV link, a long-context question asked
through the OpenAI API with streaming, then the request's timeline as the servers recorded it.

    python -m sglang_lynx.demo [--lynx-mode lynx] [--lynx-bandwidth-mbps 40] [--context-tokens 2000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time

from sglang_lynx.client import complete
from sglang_lynx.cluster import DEFAULT_STATE_DIR, ClusterSpec, PDCluster
from sglang_lynx.config import LynxConfig
from sglang_lynx.data import gutenberg_text
from sglang_lynx.models import add_model_argument, resolve

TEXT = "hamlet"
QUESTION = "Which characters speak in the passage above, and what happens in it? Answer in two sentences."


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # run the same clean-up as Ctrl-C


def long_context(model_path: str, tokens: int) -> str:
    """About ``tokens`` tokens of the play, from the start of Act III."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    text = gutenberg_text(TEXT)
    passage = text[text.find("ACT III"):] if "ACT III" in text else text
    return tokenizer.decode(tokenizer(passage).input_ids[:tokens])


def timeline(spec: ClusterSpec, rid: str, sent: float, ttft_s: float, total_s: float) -> list[str]:
    """The request's transfer and speculation, in seconds since it was sent, from the timing records."""
    deadline = time.time() + 10  # the workers write a record when the request's streams are done
    while True:
        records = [json.loads(line) for line in open(spec.lynx.timings_file)]
        decode = next((r for r in records if r["role"] == "decode" and r.get("rid") == rid), None)
        prefill = next((r for r in records if decode and r["role"] == "prefill" and r["room"] == decode["room"]),
                       None)
        if prefill or time.time() > deadline:
            break
        time.sleep(0.2)
    if prefill is None:
        return ["(no timing records for this request)"]
    mbps = spec.lynx.bandwidth_mbps
    first, residual = prefill["first_stream_bytes"], prefill.get("residual_bytes", 0)
    events = [(prefill["kv_ready"], "prefill done: the prompt's KV is ready to ship, and the first token")]
    if "first_token_came" in decode:
        events.append((decode["first_token_came"], "first token on decode, ahead of the KV (from prefill)"))
    events += [(decode["first_stream_landed"], f"first stream landed on decode ({first / 1e6:.2f} MB"
                + (f": Anchor, {spec.lynx.anchor_bits} of 8 bits and scales)" if residual else ")")),
               (sent + ttft_s, "first token on the client")]
    middle_bits = spec.lynx.anchor_bits + spec.lynx.residual_plan[0]
    if "middle_landed" in decode:
        redraft = (f"one re-draft pass ({decode['redraft_s'] * 1000:.0f} ms) over the {decode['redraft_speculated']} "
                   f"tokens drafted so far: {decode['redraft_speculated'] - decode['redrafted']} kept, "
                   f"{decode['redrafted']} drafted again" if "redraft_s" in decode else "no tokens to re-draft")
        events.append((decode["middle_landed"], f"middle stage landed: KV refined to {middle_bits} of 8 bits; "
                       f"{redraft}; drafting goes on at {middle_bits} bits"))
    if "residual_landed" in decode:
        on = "on the Anchor" + (f" and at {middle_bits} bits" if "middle_landed" in decode else "")
        events += [(decode["residual_landed"], f"Residual landed ({residual / 1e6:.2f} MB); "
                    f"{decode.get('speculated', 0)} tokens speculated {on} meanwhile"),
                   (decode["residual_applied"], f"KV refined to INT8; one verify pass "
                    f"({decode['verify_s'] * 1000:.0f} ms): {decode['accepted']} kept, "
                    f"{decode['rolled_back']} rolled back and redone exactly: the second token on")]
    events.append((sent + total_s, "last token on the client"))
    lines = [f"prompt            {prefill['tokens']} tokens"]
    lines += [f"{t - sent:7.2f} s  {what}" for t, what in sorted(events, key=lambda e: e[0])]
    if residual and mbps:
        waited = prefill["kv_ready"] - sent + (first + residual) * 8 / (mbps * 1e6)
        lines.append(f"int8 would have shipped all {(first + residual) / 1e6:.2f} MB before decoding past the "
                     f"first token: at ~{waited:.2f} s; lynx decoded on the Anchor from "
                     f"{decode['first_stream_landed'] - sent:.2f} s")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sglang_lynx.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--context-tokens", type=int, default=2000, help="tokens of the play in the prompt")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-tokens", type=int, default=48)
    add_model_argument(parser)
    LynxConfig.add_cli_args(parser)
    parser.set_defaults(lynx_mode="lynx", lynx_bandwidth_mbps=40.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)

    timings = DEFAULT_STATE_DIR / "demo-timings.jsonl"
    timings.parent.mkdir(parents=True, exist_ok=True)
    timings.unlink(missing_ok=True)
    lynx = dataclasses.replace(LynxConfig.from_cli_args(args), timings_file=str(timings))
    spec = ClusterSpec(model_path=resolve(args.model_path), lynx=lynx)
    link = f"{spec.lynx.bandwidth_mbps:g} Mbit/s" if spec.lynx.bandwidth_mbps else "unpaced"
    started = time.perf_counter()
    print(f"starting prefill, decode and router (lynx mode: {spec.lynx.mode}, KV link {link}; "
          f"logs in {spec.log_dir}/) ...", flush=True)
    try:
        with PDCluster(spec):
            print(f"cluster ready in {time.perf_counter() - started:.0f} s; router at {spec.router_url}")
            context = long_context(spec.model_path, args.context_tokens)
            print(f"\nuser: [{args.context_tokens} tokens of {TEXT.title()}, Act III]\n\n{args.question}")
            print("\nassistant: ", end="", flush=True)
            sent = time.time()
            answer = complete(spec.router_url, [{"role": "user", "content": f"{context}\n\n{args.question}"}],
                              max_tokens=args.max_tokens, stream=True,
                              on_text=lambda piece: print(piece, end="", flush=True))
            print("\n\ntimeline (seconds since the request was sent):")
            for line in timeline(spec, answer.id, sent, answer.ttft_s, answer.total_s):
                print(f"  {line}")
            print("\nshutting down ...")
    except KeyboardInterrupt:
        print("\ninterrupted: cluster stopped", file=sys.stderr)
        sys.exit(130)
    print("done: all servers stopped")


if __name__ == "__main__":
    main()
