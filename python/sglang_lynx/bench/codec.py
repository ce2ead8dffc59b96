"""``codec``: accuracy, size and speed of the Lynx codec on a real model's KV (default: SmolLM2).

    python -m sglang_lynx.bench codec --json bench-codec.json

vNMSE = ||x_hat - x||^2 / ||x||^2, for keys and values apart, of: int4_naive (4-bit, per token over
the head dimension), int4 (4-bit with Lynx's grouping and metadata), Lynx anchor-only (and with the
plain bin-centre rule, for comparison), int8, Lynx merged. Also the INT8 vNMSE of every grouping
candidate with the same metadata bits, bits per element, and kernel throughput in GB/s of KV (the float
tensor read or written) beside the device's plain copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lynx_kernels
from sglang_lynx.bench import write_json
from sglang_lynx.codec import Codec
from sglang_lynx.codec.anchor_table import centre_table, estimate_table
from sglang_lynx.codec.rtn import fake_quantize, metadata_bits
from sglang_lynx.models import add_model_argument, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPU_THROUGHPUT_TOKENS = 32768
GPU_LAUNCHES_PER_TIMING = 10  # one launch takes microseconds: time several back to back


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("codec", help="accuracy, size and speed of the Lynx codec on real KV",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of text to prefill (default: 1024)")
    p.add_argument("--text", default="hamlet", help="Gutenberg text (sglang_lynx.data; default: hamlet)")
    add_model_argument(p)
    p.add_argument("--anchor-bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the kernels run (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="KV dtype (default: float32, as SGLang keeps it on a CPU; bfloat16 on most GPUs)")
    p.add_argument("--backend", choices=lynx_kernels.BACKENDS, default=None,
                   help="kernel backend (default: triton on cuda, reference otherwise)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per kernel; the fastest counts")
    p.add_argument("--throughput-tokens", type=int, default=None,
                   help="tokens of KV to time the kernels on: the prefilled KV repeated (default: --tokens on "
                        f"a CPU, {GPU_THROUGHPUT_TOKENS} on a GPU, which a short prompt's KV would leave idle)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from sglang_lynx.data import gutenberg_text, prefill_kv

    progress = tqdm(total=4, desc="codec bench", unit="step")
    progress.set_postfix_str("prefilling real KV")
    kv = prefill_kv(resolve(args.model_path), gutenberg_text(args.text), args.tokens).to(args.device, DTYPES[args.dtype])
    progress.update()
    _, L, T, H, D = kv.shape
    codec = Codec(L, H, D, anchor_bits=args.anchor_bits, group_size=args.group_size, backend=args.backend)
    results = {
        "device": device_name(kv.device),
        "backend": args.backend or ("triton" if kv.is_cuda else "reference"),
        "kv": {"text": args.text, "tokens": T, "layers": L, "heads": H, "head_dim": D, "dtype": str(kv.dtype)},
        "codec": {"anchor_bits": codec.anchor_bits, "group_size": codec.group_size},
    }
    results.update(measure_accuracy(kv, codec, progress))
    results["bits_per_element"] = bits_per_element(codec, T, kv.numel())
    progress.set_postfix_str("timing kernels")
    timing_tokens = args.throughput_tokens or (GPU_THROUGHPUT_TOKENS if kv.is_cuda else T)
    timing_kv = kv.repeat(1, 1, -(-timing_tokens // T), 1, 1)[:, :, :timing_tokens].contiguous()
    results["throughput_tokens"] = timing_tokens
    results["throughput_gbps"] = measure_throughput(timing_kv, codec, args.repeats)
    progress.update()
    progress.close()
    print(format_table(results))
    write_json(args.json, results)


def vnmse(x_hat: torch.Tensor, kv: torch.Tensor) -> dict:
    err = (x_hat.double() - kv.double()).square().flatten(1).sum(1)
    ref = kv.double().square().flatten(1).sum(1)
    return dict(zip("kv", (err / ref).tolist()))


def measure_accuracy(kv: torch.Tensor, codec: Codec, progress) -> dict:
    G, D, T = codec.group_size, codec.head_dim, kv.shape[2]
    progress.set_postfix_str("Lynx and baselines")
    planes = codec.encode(kv)
    merged = codec.decode_merged(planes.anchor, planes.residual, planes.meta, T)
    int8 = fake_quantize(kv, G, 1, 8)
    centre = codec.decode_anchor(planes.anchor, planes.meta, T,
                                 table=centre_table(codec.num_layers, codec.anchor_bits, kv.device))
    errors = {
        "int4_naive": vnmse(fake_quantize(kv, 1, D, 4), kv),
        "int4": vnmse(fake_quantize(kv, G, 1, 4), kv),
        "anchor": vnmse(codec.decode_anchor(planes.anchor, planes.meta, T), kv),
        "anchor_centre": vnmse(centre, kv),
        "int8": vnmse(int8, kv),
        "merged": vnmse(merged, kv),
    }
    progress.update()

    progress.set_postfix_str("grouping candidates")
    # Every tokens x channels shape of G elements (so the same metadata bits) that fits the head.
    shapes = [(G // c, c) for c in (2**i for i in range(G.bit_length())) if c <= D and D % c == 0]
    candidates = {f"{t}x{c}": {"int8": vnmse(fake_quantize(kv, t, c, 8), kv),
                               "int4": vnmse(fake_quantize(kv, t, c, 4), kv)} for t, c in shapes}
    progress.update()
    lowest = {part: min(candidates, key=lambda c: candidates[c]["int8"][part]) for part in "kv"}
    return {
        "vnmse": errors,
        "anchor_over_int4": {part: errors["anchor"][part] / errors["int4"][part] for part in "kv"},
        "merge_exact": torch.equal(merged, int8),
        "grouping": {"chosen": f"{G}x1", "meaning": "tokens x channels of one head per group",
                     "metadata_bits_per_element": metadata_bits(G, D), "lowest_int8": lowest, "candidates": candidates},
    }


def bits_per_element(codec: Codec, num_tokens: int, elements: int) -> dict:
    """Bits sent per KV element, padding of the last block and the metadata header included."""
    anchor = codec.anchor_nbytes(num_tokens) * 8 / elements
    residual = codec.residual_nbytes(num_tokens) * 8 / elements
    meta = codec.meta_nbytes(num_tokens) * 8 / elements
    return {
        "anchor": anchor + meta,  # what anchor-only decoding needs: the Anchor and its metadata
        "residual": residual,
        "int8": anchor + residual + meta,
        "meta": meta,
        "meta_header": codec.meta_header_nbytes * 8 / elements,
        "int4": 4 + metadata_bits(codec.group_size, codec.head_dim),
        "int4_naive": 4 + metadata_bits(codec.head_dim, codec.head_dim),
    }


def measure_throughput(kv: torch.Tensor, codec: Codec, repeats: int) -> dict:
    """GB/s of KV for each kernel writing into preallocated outputs, as the copy does; encode and
    clone also allocate theirs (fresh memory costs page faults: on CPUs that dominates)."""
    A, G, T, backend = codec.anchor_bits, codec.group_size, kv.shape[2], codec.backend
    planes = lynx_kernels.empty_planes(kv, A, G)
    anchor, residual, meta = lynx_kernels.quantize_split(kv, A, G, out=planes, backend=backend)
    table = estimate_table(anchor, residual)
    copy, decoded = torch.empty_like(kv), torch.empty_like(kv)
    kernels = {
        "copy": lambda: copy.copy_(kv),
        "quantize_split": lambda: lynx_kernels.quantize_split(kv, A, G, out=planes, backend=backend),
        "dequant_anchor": lambda: lynx_kernels.dequant_anchor(anchor, meta, table, T, kv.dtype, decoded,
                                                              backend),
        "merge_dequant": lambda: lynx_kernels.merge_dequant(anchor, residual, meta, T, kv.dtype, decoded,
                                                            backend),
        "encode": lambda: codec.encode(kv),  # the kernel, the anchor table, fresh buffers
        "clone": lambda: kv.clone(),
    }
    nbytes = kv.numel() * kv.element_size()
    gbps = {name: nbytes / seconds / 1e9 for name, seconds in best_times(kernels, repeats, kv.device).items()}
    gbps["quantize_split_over_copy"] = gbps["quantize_split"] / gbps["copy"]
    return gbps


def best_times(fns: dict, repeats: int, device: torch.device) -> dict:
    """The fastest of `repeats` runs of each function, run in turns so that a busy spell of the
    machine slows all of them alike."""
    for fn in fns.values():
        fn()  # warm-up (and Triton compilation)
    launches = GPU_LAUNCHES_PER_TIMING if device.type == "cuda" else 1
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(launches):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) / launches)
    return best


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def format_table(r: dict) -> str:
    kv, bits, gbps, e = r["kv"], r["bits_per_element"], r["throughput_gbps"], r["vnmse"]
    lines = [
        f"Lynx codec, A={r['codec']['anchor_bits']} G={r['codec']['group_size']}, on {kv['tokens']} tokens of "
        f"{kv['text']} (KV {kv['layers']} layers x {kv['heads']} heads x {kv['head_dim']}, {kv['dtype']}); "
        f"{r['device']}, {r['backend']} kernels",
        "",
        f"{'vNMSE':<16}{'K':>11}{'V':>11}{'K / int4':>11}{'V / int4':>11}",
    ]
    for name in ("int4_naive", "int4", "anchor_centre", "anchor", "int8", "merged"):
        k, v = e[name]["k"], e[name]["v"]
        lines.append(f"  {name:<14}{k:>11.3e}{v:>11.3e}{k / e['int4']['k']:>11.3f}{v / e['int4']['v']:>11.3f}")
    lines.append(f"  merged == int8 bit for bit: {'yes' if r['merge_exact'] else 'NO'}")
    g = r["grouping"]
    lines += ["", f"grouping (tokens x channels per group, {g['metadata_bits_per_element']:.4f} metadata bits "
                  f"per element each): chosen {g['chosen']}; lowest INT8 vNMSE: K {g['lowest_int8']['k']}, "
                  f"V {g['lowest_int8']['v']}",
              f"  {'group':<8}{'int8 K':>11}{'int8 V':>11}{'int4 K':>11}{'int4 V':>11}"]
    for name, c in g["candidates"].items():
        lines.append(f"  {name:<8}{c['int8']['k']:>11.3e}{c['int8']['v']:>11.3e}"
                     f"{c['int4']['k']:>11.3e}{c['int4']['v']:>11.3e}")
    lines += ["", "bits per element (metadata, header and padding included):",
              f"  anchor + meta {bits['anchor']:.4f}   residual {bits['residual']:.4f}   int8 {bits['int8']:.4f}"
              f"   (meta {bits['meta']:.4f}, of which header {bits['meta_header']:.4f}; int4 {bits['int4']:.4f},"
              f" int4_naive {bits['int4_naive']:.4f})",
              "", f"throughput on {r['throughput_tokens']} tokens, GB/s of KV (best of the runs; encode and "
                  "clone write into fresh memory):"]
    for name in ("copy", "quantize_split", "dequant_anchor", "merge_dequant", "encode", "clone"):
        lines.append(f"  {name:<16}{gbps[name]:>8.2f}   {gbps[name] / gbps['copy']:>6.1%} of copy")
    return "\n".join(lines)
