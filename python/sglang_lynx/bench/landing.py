"""``landing``: the time and memory of landing a prompt's Lynx rows in the KV pool, beside the codec alone.

    python -m sglang_lynx.bench landing --json bench-landing.json

A KV pool of the model's dimensions (default SmolLM2-135M: 30 layers x 3 KV heads x 64, float32 as on a
CPU, pages of 64 tokens) holds random KV with per-channel offsets and spreads. Each prompt is encoded
into Lynx rows as prefill does (``StagingRows.encode``), then landed in the pool's pages in another order
as decode does (``StagingRows.land``): Anchor-only (the first stream), then merged (the refinement when
the Residual has come). Beside it, the codec decodes the same prompt encoded in one piece (the same
tokens, as many bytes) in one call into a new tensor (``Codec.decode_anchor`` / ``decode_merged``): the
codec's own time.

Extra peak memory: the process's peak resident memory during the call (VmHWM, reset before it) minus its
resident memory just before, with freed heap returned to the system first (malloc_trim), so that every
page the call touches counts. Times and memory: the fastest and the largest of ``--repeats`` runs, taken
in turns. Targets: landing adds at most one chunk's KV (``streams.rows.CHUNK_TOKENS`` tokens of it) at
any prompt length, and takes at most 1.25 times the codec's own decode.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from sglang_lynx.bench import write_json
from sglang_lynx.bench.codec import device_name
from sglang_lynx.config import LynxConfig
from sglang_lynx.models import add_model_argument, resolve
from sglang_lynx.streams.rows import CHUNK_TOKENS, StagingRows

PAGE_SIZE = 64
MAX_LAND_OVER_CODEC = 1.25
MiB = 2**20


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("landing", help="time and extra memory of landing rows in the KV pool (CPU)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2048,8192,32768", help="comma-separated prompt lengths")
    add_model_argument(p)
    p.add_argument("--repeats", type=int, default=3, help="runs of each call; the fastest time counts")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> dict:
    lengths = [int(n) for n in args.tokens.split(",")]
    layers, heads, head_dim = kv_dims(Path(resolve(args.model_path)))
    pool = random_pool(max(lengths), layers, heads, head_dim)
    rows = StagingRows(LynxConfig(mode="lynx"), pool, PAGE_SIZE, nbytes=1 << 62)  # a row per pool page
    token_nbytes = 2 * layers * heads * head_dim * 4
    report = {
        "device": device_name(torch.device("cpu")),
        "model": args.model_path,
        "kv": {"layers": layers, "heads": heads, "head_dim": head_dim, "dtype": "float32", "page_size": PAGE_SIZE},
        "chunk_tokens": CHUNK_TOKENS,
        "chunk_kv_bytes": CHUNK_TOKENS * token_nbytes,
        "extra_peak": "VmHWM during the call minus VmRSS before it, after malloc_trim(0)",
        "sizes": [],
    }
    progress = tqdm(lengths, desc="landing bench", unit="prompt")
    for n in progress:
        progress.set_postfix_str(f"{n} tokens")
        report["sizes"].append(measure(rows, n, args.repeats) | {"prompt_kv_bytes": n * token_nbytes})
    progress.close()
    landings = [size[stream] for size in report["sizes"] for stream in ("anchor", "merged")]
    report["targets"] = {
        "land_extra_peak_within_one_chunk_kv": all(s["land_extra_peak_bytes"] <= report["chunk_kv_bytes"]
                                                   for s in landings),
        f"land_within_{MAX_LAND_OVER_CODEC}x_codec_decode": all(s["land_over_codec"] <= MAX_LAND_OVER_CODEC for s in landings),
    }
    print(format_table(report))
    write_json(args.json, report)
    return report


def kv_dims(model: Path) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) from a Hugging Face folder's config.json."""
    config = json.loads((model / "config.json").read_text())
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"], heads, head_dim


def random_pool(num_tokens: int, layers: int, heads: int, head_dim: int) -> SimpleNamespace:
    """A float32 pool of ``num_tokens`` tokens (whole pages) of KV-like values: each channel with its own
    offset and spread, as keys and values have."""
    size = -(-num_tokens // PAGE_SIZE) * PAGE_SIZE
    g = torch.Generator().manual_seed(0)

    def layer() -> torch.Tensor:
        offset = torch.randn(heads, head_dim, generator=g) * 2
        spread = torch.exp(torch.randn(heads, head_dim, generator=g))
        return torch.randn(size, heads, head_dim, generator=g).mul_(spread).add_(offset)

    return SimpleNamespace(k_buffer=[layer() for _ in range(layers)], v_buffer=[layer() for _ in range(layers)])


def measure(rows: StagingRows, num_tokens: int, repeats: int) -> dict:
    """Encode a prompt into rows and land it in the pool's pages backwards, beside the codec's own decode."""
    pages = list(range(rows.pages_for(num_tokens)))  # row i holds page i
    room = 1
    rows.encode(pages, pages, num_tokens, room)
    whole = torch.empty((2, len(rows.k_buffers), num_tokens, *rows.k_buffers[0].shape[1:]))
    for i, bufs in enumerate((rows.k_buffers, rows.v_buffers)):
        for layer, buf in enumerate(bufs):
            whole[i, layer] = buf[:num_tokens]
    planes = rows.codec.encode(whole)
    del whole
    landed = pages[::-1]  # each page lands in another of the pool's pages, as on a decode worker
    calls = {
        "encode": lambda: rows.encode(pages, pages, num_tokens, room),
        "land_anchor": lambda: rows.land(landed, pages, num_tokens, room, streams=1),
        "codec_anchor": lambda: rows.codec.decode_anchor(planes.anchor, planes.meta, num_tokens),
        "land_merged": lambda: rows.land(landed, pages, num_tokens, room, streams=rows.num_streams),
        "codec_merged": lambda: rows.codec.decode_merged(planes.anchor, planes.residual, planes.meta, num_tokens),
    }
    best = {name: (float("inf"), 0) for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            seconds, extra = timed(call)
            best[name] = (min(best[name][0], seconds), max(best[name][1], extra))
    result = {"tokens": num_tokens, "encode": {"s": best["encode"][0], "extra_peak_bytes": best["encode"][1]}}
    for stream in ("anchor", "merged"):
        (land_s, land_extra), (codec_s, codec_extra) = best[f"land_{stream}"], best[f"codec_{stream}"]
        result[stream] = {"land_s": land_s, "codec_s": codec_s, "land_over_codec": land_s / codec_s,
                          "land_extra_peak_bytes": land_extra, "codec_extra_peak_bytes": codec_extra}
    return result


def timed(call) -> tuple[float, int]:
    """(seconds, extra peak resident bytes) of one call."""
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return seconds, _status_bytes("VmHWM") - before


_libc = ctypes.CDLL("libc.so.6")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def format_table(r: dict) -> str:
    kv, chunk = r["kv"], r["chunk_kv_bytes"]
    lines = [
        f"Lynx landing, {r['model']} KV ({kv['layers']} layers x {kv['heads']} KV heads x {kv['head_dim']}, "
        f"{kv['dtype']}), pages of {kv['page_size']} tokens, chunks of {r['chunk_tokens']} tokens "
        f"(one chunk's KV: {chunk / MiB:.1f} MiB); {r['device']}",
        f"extra peak: {r['extra_peak']}",
        "",
        f"{'tokens':>7}{'prompt KV':>12}  {'stream':<8}{'land ms':>9}{'codec ms':>10}{'land/codec':>12}"
        f"{'land extra':>12}{'codec extra':>13}",
    ]
    for size in r["sizes"]:
        for i, stream in enumerate(("anchor", "merged")):
            s = size[stream]
            head = f"{size['tokens']:>7}{size['prompt_kv_bytes'] / MiB:>8.0f} MiB" if i == 0 else " " * 19
            lines.append(f"{head}  {stream:<8}{s['land_s'] * 1e3:>9.0f}{s['codec_s'] * 1e3:>10.0f}"
                         f"{s['land_over_codec']:>12.2f}{s['land_extra_peak_bytes'] / MiB:>8.1f} MiB"
                         f"{s['codec_extra_peak_bytes'] / MiB:>9.1f} MiB")
    lines += ["", "encode (prefill, checksums on): " + ", ".join(
        f"{size['tokens']} tokens {size['encode']['s'] * 1e3:.0f} ms, extra "
        f"{size['encode']['extra_peak_bytes'] / MiB:.1f} MiB" for size in r["sizes"]), ""]
    for target, met in r["targets"].items():
        lines.append(f"target {target}: {'met' if met else 'NOT met'}")
    return "\n".join(lines)
