"""Time to first, second and K-th token, per Lynx mode, over a rate-limited KV link.

    python -m sglang_lynx.bench ttft --modes raw,int8,int4,lynx --bandwidth-mbps 2 \\
        --input-len 128 --output-len 16 --num-prompts 3 --json bench-ttft.json
    python -m sglang_lynx.bench ttft --bandwidth-mbps 5,10,20,50 --input-len 1024,4096 ...  # a sweep
    python -m sglang_lynx.bench ttft --input-len 2048 --first-token-at-prefill both ...  # with and without
    python -m sglang_lynx.bench ttft --modes int4,lynx --stages 4,4 4,2,2 ...  # lynx once per plan

For each bandwidth and mode: bring up prefill + decode + router with that mode and the paced link
(one cluster, reused for every prompt length), send the prompts one at a time through the router
(SGLang's ``/generate``, streaming, greedy, ``ignore_eos``) and time the first, the second and the
K-th token on the client (every chunk carries the token count so far). The servers' timing records
give, per request, the KV bytes each stream carried, the moment prefill's forward was done (P:
everything but the transfer) and, in ``lynx`` mode, how many tokens were speculated on the Anchor
and how many verification kept. With the first token at prefill (the default) TTFT is about P in
every mode, and the transfer shows from the second token on. The floor is P + Anchor bytes /
bandwidth: what any 4-bit-first transfer must wait for before decoding (and, with
``--first-token-at-prefill off``, before its first token). ``--stages`` runs ``lynx`` once per
progressive plan (``--lynx-stages``), named ``lynx 4,2,2`` etc. when there are several, and compares
their acceptance and time to the K-th token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from sglang_lynx.bench import parse_choices, write_json
from sglang_lynx.client import generate
from sglang_lynx.cluster import ClusterSpec, PDCluster
from sglang_lynx.config import MODES, LynxConfig, stage_plan
from sglang_lynx.data import text_windows
from sglang_lynx.models import add_model_argument, resolve


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ttft", help="TTFT per Lynx mode over a rate-limited KV link",
                              description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="raw,int8,int4,lynx", help="comma-separated Lynx modes")
    p.add_argument("--bandwidth-mbps", type=_list_of(float), default=[2.0],
                   help="emulated KV link rate; a comma-separated list sweeps")
    p.add_argument("--input-len", type=_list_of(int), default=[128],
                   help="prompt tokens; a comma-separated list sweeps")
    p.add_argument("--output-len", type=int, default=16, help="K: tokens generated (time to the K-th)")
    p.add_argument("--num-prompts", type=int, default=3, help="requests per mode, sent one at a time")
    p.add_argument("--max-speculative-tokens", type=int, default=64,
                   help="lynx: tokens decoded on the Anchor before the Residual must land")
    p.add_argument("--stages", nargs="+", type=stage_plan, default=[(4, 4)], metavar="A,B[,C]",
                   help="lynx: progressive plans (--lynx-stages), e.g. 4,4 4,2,2: one lynx cluster each")
    p.add_argument("--first-token-at-prefill", choices=("on", "off", "both"), default="on",
                   help="prefill sends the first token ahead of the KV (--lynx-first-token-at-prefill); both: "
                        "every mode also runs without it, and the report compares the two")
    p.add_argument("--text", default="hamlet", help="Gutenberg text the prompts are cut from")
    add_model_argument(p)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None,
                   help="write a PNG of TTFT and time to the K-th token against link bandwidth, one panel "
                        "per prompt length: measured medians, the floor, and with one bandwidth the model "
                        "P + first-stream bytes / bandwidth")
    p.set_defaults(run=run)


def _list_of(kind):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive {kind.__name__}s, got {text!r}")
        return values
    return parse


def check_context(model_path: str, input_lens: list[int], output_len: int) -> None:
    """Refuse, before any cluster starts, a prompt that would not fit the model's context."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    context = config.get("max_position_embeddings")
    too_long = [n for n in input_lens if context and n + output_len > context]
    if too_long:
        raise SystemExit(f"--input-len {too_long[0]} + --output-len {output_len} exceeds the model's context of "
                         f"{context} tokens ({model_path})")


def make_prompts(model_path: str, text: str, input_len: int, num_prompts: int) -> list[str]:
    """Distinct windows of ``input_len`` tokens of the text (distinct: no prefix-cache hits), as text.
    The servers record the token count they saw."""
    try:
        return text_windows(model_path, [input_len] * num_prompts, text)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def variants(modes: list[str], plans: list[tuple[int, ...]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (mode, plan): ``lynx`` once per plan (named by its plan when there are several), the
    other modes once (their transfer does not depend on it)."""
    out = {}
    for mode in modes:
        for plan in plans if mode == "lynx" else plans[:1]:
            named = mode == "lynx" and len(plans) > 1
            out[f"{mode} {','.join(map(str, plan))}" if named else mode] = (mode, plan)
    return out


def run_cluster(name: str, mode: str, plan: tuple[int, ...], first_token_at_prefill: bool, bandwidth: float, args,
                model_path: str, prompts: dict, progress: tqdm, log_dir: Path) -> dict:
    """One cluster of ``mode`` on a ``bandwidth`` link; every prompt length through it. -> results by length."""
    name = name if first_token_at_prefill else f"{name}-first-token-off"
    timings = log_dir / f"{name.replace(' ', '-')}-timings.jsonl"
    lynx = LynxConfig(mode=mode, bandwidth_mbps=bandwidth, timings_file=str(timings),
                      max_speculative_tokens=args.max_speculative_tokens,
                      first_token_at_prefill=first_token_at_prefill, anchor_bits=plan[0], residual_stages=plan[1:])
    spec = ClusterSpec(model_path=model_path, lynx=lynx, log_dir=log_dir / name.replace(" ", "-"))
    sent = {n: [] for n in prompts}
    where = f"{name} @ {bandwidth:g} Mbit/s"
    progress.set_postfix_str(f"{where}: starting cluster")
    with PDCluster(spec):
        for n, texts in prompts.items():
            for i, prompt in enumerate(texts):
                progress.set_postfix_str(f"{where}: {n} tokens, request {i + 1}/{len(texts)}")
                at = time.time()
                c = generate(spec.router_url, prompt, max_tokens=args.output_len, ignore_eos=True)
                got = c.chunk_tokens[-1] if c.chunk_tokens else 0
                if got < args.output_len:
                    raise SystemExit(f"{where}: a {n}-token request ended after {got} of {args.output_len} "
                                     f"tokens (finish reason: {c.finish_reason})")
                sent[n].append({"rid": c.id, "sent": at, "ttft_s": c.ttft_s,
                                "t2_s": c.time_to_token(min(2, args.output_len)),
                                "ttk_s": c.time_to_token(args.output_len)})
                progress.update()
    records = [json.loads(line) for line in timings.read_text().splitlines()]
    return {n: mode_result(mode, requests, records) for n, requests in sent.items()}


def mode_result(mode: str, requests: list[dict], records: list[dict]) -> dict:
    """Client-side times of the requests joined with the workers' records of them (by request id)."""
    decode = {r["rid"]: r for r in records if r["role"] == "decode" and "rid" in r}
    prefill = {r["room"]: r for r in records if r["role"] == "prefill"}
    for req in requests:
        dec = decode[req["rid"]]
        pre = prefill[dec["room"]]
        req["prefill_s"] = pre["kv_ready"] - req["sent"]
        req["prompt_tokens"] = pre["tokens"]
        req["first_stream_bytes"] = pre["first_stream_bytes"]
        req["residual_bytes"] = pre.get("residual_bytes", 0)
        if mode == "lynx":
            req.update({key: dec[key] for key in ("speculated", "accepted", "verify_s", "refine_s", "redrafted",
                                                  "redraft_speculated", "redraft_s") if key in dec})
            if "paused" in dec and dec.get("speculated"):  # decoding alone on the Anchor until the cap
                req["decode_step_s"] = (dec["paused"] - dec["speculating_from"]) / dec["speculated"]
    for req in requests:
        req["ttft_over_prefill"] = req["ttft_s"] / req["prefill_s"]
    med = lambda key: statistics.median(r[key] for r in requests)
    result = {
        "ttft_ms_median": 1000 * med("ttft_s"),
        "ttft_over_prefill_median": med("ttft_over_prefill"),
        "t2_ms_median": 1000 * med("t2_s"),
        "ttk_ms_median": 1000 * med("ttk_s"),
        "prefill_ms_median": 1000 * med("prefill_s"),
        "first_stream_bytes": med("first_stream_bytes"),
        "residual_bytes": med("residual_bytes"),
        "kv_bytes": med("first_stream_bytes") + med("residual_bytes"),
        "prompt_tokens_median": med("prompt_tokens"),
    }
    if mode == "lynx":
        result.update(speculation_summary(requests))
    result["requests"] = requests
    return result


def speculation_summary(requests: list[dict]) -> dict:
    """Acceptance over the requests that speculated: accepted / speculated tokens (all requests
    together), and the share of requests whose every speculated token was kept."""
    verified = [r for r in requests if r.get("speculated")]
    if not verified:
        return {"accept_rate_mean": None, "whole_accept_share": None, "speculated_mean": 0}
    summary = {
        "accept_rate_mean": sum(r["accepted"] for r in verified) / sum(r["speculated"] for r in verified),
        "whole_accept_share": sum(r["accepted"] == r["speculated"] for r in verified) / len(verified),
        "speculated_mean": statistics.mean(r["speculated"] for r in verified),
        "accepted_mean": statistics.mean(r["accepted"] for r in verified),
        "verify_ms_median": 1000 * statistics.median(r["verify_s"] for r in verified),
    }
    redrafted = [r for r in verified if "redraft_s" in r]
    if redrafted:  # a Residual in stages: drafts dropped when the middle stage landed count as not kept too
        summary.update({
            "redrafted_share": len(redrafted) / len(verified),
            "redrafted_mean": statistics.mean(r["redrafted"] for r in redrafted),
            "redraft_speculated_mean": statistics.mean(r["redraft_speculated"] for r in redrafted),
            "redraft_ms_median": 1000 * statistics.median(r["redraft_s"] for r in redrafted),
            "accept_rate_all_drafts": sum(r["accepted"] for r in verified) / sum(
                r["speculated"] + r.get("redrafted", 0) for r in verified),
        })
    steps = [r["decode_step_s"] for r in verified if "decode_step_s" in r]
    if steps:
        summary["decode_step_ms_median"] = 1000 * statistics.median(steps)
    return summary


def run(args: argparse.Namespace) -> dict:
    modes = parse_choices(args.modes, "ttft", allowed=[m for m in MODES if m != "off"])  # off: unpaced
    model_path = resolve(args.model_path)
    check_context(model_path, args.input_len, args.output_len)
    prompts = {n: make_prompts(model_path, args.text, n, args.num_prompts) for n in args.input_len}
    first_token = {"on": [True], "off": [False], "both": [True, False]}[args.first_token_at_prefill]
    runs = variants(modes, args.stages)
    results = {}  # (bandwidth, input length) -> first token at prefill -> mode (or lynx plan) -> result
    total = len(args.bandwidth_mbps) * len(first_token) * len(runs) * len(args.input_len) * args.num_prompts
    with tempfile.TemporaryDirectory(prefix="lynx-bench-") as tmp, \
            tqdm(total=total, desc="bench ttft", unit="req") as progress:
        for bandwidth in args.bandwidth_mbps:
            for name, (mode, plan) in runs.items():
                for early in first_token:
                    by_length = run_cluster(name, mode, plan, early, bandwidth, args, model_path, prompts,
                                            progress, Path(tmp) / f"{bandwidth:g}")
                    for n, result in by_length.items():
                        results.setdefault((bandwidth, n), {}).setdefault(early, {})[name] = result
    reports = [summarise(bandwidth, n, args, results[(bandwidth, n)])
               for n in args.input_len for bandwidth in args.bandwidth_mbps]
    for report in reports:
        print_table(report)
    # One run keeps the report's keys at the top level; a sweep lists one such report per point.
    out = reports[0] if len(reports) == 1 else {
        "bandwidths_mbps": args.bandwidth_mbps, "input_lens": args.input_len, "output_len": args.output_len,
        "num_prompts": args.num_prompts, "modes": modes, "sweep": reports}
    write_json(args.json, out)
    if args.plot:
        plot(reports, args.plot)
        print(f"wrote {args.plot}")
    return out


def compare_stages(results: dict) -> dict:
    """With ``lynx`` run once per plan: each plan's acceptance, its time to the K-th token against the
    first plan's (and int4's), and its acceptance gain over the first plan."""
    plans = [name for name in results if name.startswith("lynx ")]
    if len(plans) < 2:
        return {}
    first = results[plans[0]]
    out = {}
    for name in plans:
        r = results[name]
        entry = {"accept_rate_mean": r.get("accept_rate_mean"), "ttk_ms_median": r["ttk_ms_median"],
                 "ttk_over_first_plan": r["ttk_ms_median"] / first["ttk_ms_median"]}
        if r.get("accept_rate_mean") is not None and first.get("accept_rate_mean") is not None:
            entry["accept_rate_gain"] = r["accept_rate_mean"] - first["accept_rate_mean"]
        if "int4" in results:
            entry["ttk_over_int4"] = r["ttk_ms_median"] / results["int4"]["ttk_ms_median"]
        for key in ("accept_rate_all_drafts", "redrafted_mean", "redraft_ms_median"):
            if key in r:
                entry[key] = r[key]
        out[name.removeprefix("lynx ")] = entry
    return out


def summarise(bandwidth: float, input_len: int, args, by_first_token: dict) -> dict:
    """The report of one (bandwidth, prompt length): per mode, ratios between modes, and with
    ``--first-token-at-prefill both`` the same modes without it (``modes_first_token_off``)."""
    early = args.first_token_at_prefill != "off"
    results = by_first_token[early]
    bytes_per_s = bandwidth * 1e6 / 8
    prefill_ms = statistics.median(r["prefill_ms_median"] for r in results.values())
    report = {"bandwidth_mbps": bandwidth, "input_len": input_len,
              "output_len": args.output_len, "num_prompts": args.num_prompts,
              "first_token_at_prefill": early, "prefill_ms": prefill_ms, "modes": results}
    lynx_runs = [name for name in results if name.split()[0] == "lynx"]
    if lynx_runs:  # every plan sends the same first stream
        anchor = results[lynx_runs[0]]["first_stream_bytes"]
        report["floor_ms"] = prefill_ms + 1000 * anchor / bytes_per_s
        report["anchor_transfer_over_prefill"] = (1000 * anchor / bytes_per_s) / prefill_ms
    ratios = {}
    ttft = {m: r["ttft_ms_median"] for m, r in results.items()}
    ttk = {m: r["ttk_ms_median"] for m, r in results.items()}
    if {"lynx", "int4"} <= ttft.keys():
        ratios["ttft_lynx_over_int4"] = ttft["lynx"] / ttft["int4"]
        ratios["ttk_lynx_over_int4"] = ttk["lynx"] / ttk["int4"]
    if {"lynx", "int8"} <= ttft.keys():
        ideal = ((prefill_ms + 1000 * results["int8"]["kv_bytes"] / bytes_per_s)
                 / (prefill_ms + 1000 * results["lynx"]["first_stream_bytes"] / bytes_per_s))
        ratios["ttft_int8_over_lynx"] = ttft["int8"] / ttft["lynx"]
        ratios["ttft_int8_over_lynx_ideal"] = ideal
        ratios["ttft_int8_over_lynx_fraction_of_ideal"] = ratios["ttft_int8_over_lynx"] / ideal
    if {"int8", "int4"} <= ttk.keys():
        ratios["ttk_int4_over_int8"] = ttk["int4"] / ttk["int8"]
        if "lynx" in ttk and ttk["int8"] > ttk["int4"]:
            # The share of int8's extra wait for the K-th token that lynx removes.
            ratios["ttk_gap_closed"] = (ttk["int8"] - ttk["lynx"]) / (ttk["int8"] - ttk["int4"])
    if "floor_ms" in report:
        for name in lynx_runs:
            ratios[f"ttft_{name.replace(' ', '_')}_over_floor"] = ttft[name] / report["floor_ms"]
    stages = compare_stages(results)
    if stages:
        report["stages"] = stages
    if "lynx" in results:
        # Speculation pays off when the Residual lands before the K-th token would be decoded.
        report["residual_transfer_ms"] = 1000 * results["lynx"]["residual_bytes"] / bytes_per_s
    if "int8" in results:
        report["decode_rest_ms"] = ttk["int8"] - ttft["int8"]  # tokens 2..K on exact KV
    if len(by_first_token) == 2:
        off = report["modes_first_token_off"] = by_first_token[False]
        for m in results:  # the first token early; nothing after it later
            ratios[f"ttft_{m}_first_token_on_over_off"] = ttft[m] / off[m]["ttft_ms_median"]
            ratios[f"ttk_{m}_first_token_on_over_off"] = ttk[m] / off[m]["ttk_ms_median"]
    report["ratios"] = ratios
    return report


def print_table(report: dict) -> None:
    k = report["output_len"]
    print(f"\nKV link {report['bandwidth_mbps']:g} Mbit/s, {report['input_len']} prompt tokens, "
          f"{k} output tokens, {report['num_prompts']} prompts per mode (medians)")
    print(f"{'mode':<10} {'first token':<11} {'TTFT ms':>9} {'TTFT/P':>7} {'T-to-2 ms':>10} {f'T-to-{k} ms':>11} "
          f"{'1st stream B':>13} {'residual B':>11}")
    tables = [(report["first_token_at_prefill"], report["modes"])]
    if "modes_first_token_off" in report:
        tables.append((False, report["modes_first_token_off"]))
    for early, modes in tables:
        for mode, r in modes.items():
            print(f"{mode:<10} {'at prefill' if early else 'with KV':<11} {r['ttft_ms_median']:>9.0f} "
                  f"{r['ttft_over_prefill_median']:>7.2f} {r['t2_ms_median']:>10.0f} {r['ttk_ms_median']:>11.0f} "
                  f"{r['first_stream_bytes']:>13.0f} {r['residual_bytes']:>11.0f}")
    print(f"\nprefill (P, all but the transfer): {report['prefill_ms']:.0f} ms")
    if "floor_ms" in report:
        print(f"floor (P + Anchor bytes / bandwidth): {report['floor_ms']:.0f} ms "
              f"(Anchor transfer = {report['anchor_transfer_over_prefill']:.1f} x P)")
    if "residual_transfer_ms" in report and "decode_rest_ms" in report:
        print(f"Residual transfer {report['residual_transfer_ms']:.0f} ms; int8 decodes tokens 2..{k} in "
              f"{report['decode_rest_ms']:.0f} ms")
    for name, lynx in report["modes"].items():
        if name.split()[0] != "lynx" or lynx.get("accept_rate_mean") is None:
            continue
        print(f"{name} speculation: {lynx['accepted_mean']:.1f} of {lynx['speculated_mean']:.1f} tokens kept "
              f"(acceptance {lynx['accept_rate_mean']:.3f}; whole run kept in {lynx['whole_accept_share']:.0%} "
              f"of requests); verify pass {lynx['verify_ms_median']:.0f} ms")
        if "redraft_ms_median" in lynx:
            print(f"{' ' * len(name)} middle stage: {lynx['redrafted_share']:.0%} of requests re-drafted, "
                  f"{lynx['redrafted_mean']:.1f} of {lynx['redraft_speculated_mean']:.1f} drafts replaced "
                  f"(pass {lynx['redraft_ms_median']:.0f} ms); kept of every draft made: "
                  f"{lynx['accept_rate_all_drafts']:.3f}")
    for plan, entry in report.get("stages", {}).items():
        gain = entry.get("accept_rate_gain")
        print(f"stages {plan:<8} T-to-{k} / first plan's {entry['ttk_over_first_plan']:.3f}"
              + (f", / int4's {entry['ttk_over_int4']:.3f}" if "ttk_over_int4" in entry else "")
              + (f"; acceptance {gain:+.3f} over the first plan" if gain is not None else ""))
    for name, value in report["ratios"].items():
        print(f"{name:<40} {value:.3f}")


def plot(reports: list[dict], path: Path) -> None:
    """TTFT (solid, dots) and time to the K-th token (dashed, squares) against bandwidth, one panel per
    prompt length, with the floor; a single bandwidth adds the model P + first stream / bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    lengths = sorted({r["input_len"] for r in reports})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.8), squeeze=False)
    names = list(reports[0]["modes"])
    order = dict.fromkeys(("raw", "int8", "int4", "lynx", *names))  # the four modes keep their colours
    colours = {m: f"C{i}" for i, m in enumerate(order) if m in names}
    for ax, n in zip(axes[0], lengths):
        points = sorted((r for r in reports if r["input_len"] == n), key=lambda r: r["bandwidth_mbps"])
        bw = [r["bandwidth_mbps"] for r in points]
        k = points[0]["output_len"]
        for mode in points[0]["modes"]:
            c = colours[mode]
            ax.plot(bw, [r["modes"][mode]["ttft_ms_median"] / 1000 for r in points], "o-", color=c,
                    label=f"{mode}: TTFT")
            ax.plot(bw, [r["modes"][mode]["ttk_ms_median"] / 1000 for r in points], "s--", color=c, alpha=0.7,
                    label=f"{mode}: token {k}")
        if "floor_ms" in points[0]:
            ax.plot(bw, [r["floor_ms"] / 1000 for r in points], ":", color="black", lw=2,
                    label="floor: P + Anchor / bandwidth")
        if len(points) == 1:  # one measured bandwidth: draw the model around it
            r = points[0]
            grid = np.geomspace(bw[0] / 8, bw[0] * 64, 200)
            for mode, m in r["modes"].items():
                model = r["prefill_ms"] + 8 * m["first_stream_bytes"] / (grid * 1e6) * 1000
                ax.plot(grid, model / 1000, "-", color=colours[mode], alpha=0.3, lw=1)
            ax.axhline(r["prefill_ms"] / 1000, color="grey", ls=":", label="P (everything but the transfer)")
        ax.set(xscale="log", yscale="log", xlabel="KV link bandwidth (Mbit/s)", ylabel="seconds",
               title=f"{n}-token prompts ({points[0]['num_prompts']} per point, medians)")
        if len(points) > 1:  # label the measured bandwidths in plain numbers
            ax.set_xticks(bw, [f"{b:g}" for b in bw], minor=False)
            ax.set_xticks([], minor=True)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("SmolLM2-135M on this CPU: time to first token and to token K, measured")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
