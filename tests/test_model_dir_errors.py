"""A broken model directory is refused at load time with a message that says what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.runtime.blip import Blip
from backend.runtime.manifest import ModelDirError


def test_missing_directory(tmp_path: Path):
    with pytest.raises(ModelDirError, match="does not exist"):
        Blip(tmp_path / "nope")


def test_folder_without_manifest(tmp_path: Path):
    with pytest.raises(ModelDirError, match=r"no manifest\.json"):
        Blip(tmp_path)


def test_missing_part(model_copy: Path):
    (model_copy / "fp16" / "decoder.bin").unlink()
    with pytest.raises(ModelDirError, match=r"fp16/decoder: .*decoder\.bin is missing"):
        Blip(model_copy)


def test_truncated_part(model_copy: Path):
    path = model_copy / "fp16" / "vision.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelDirError, match=r"fp16/vision: .*bytes, manifest says"):
        Blip(model_copy)


def test_corrupt_part(model_copy: Path):
    path = model_copy / "fp16" / "text_encoder.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match=r"fp16/text_encoder: .*sha256"):
        Blip(model_copy)


def test_manifest_missing_a_part(model_copy: Path):
    manifest = json.loads((model_copy / "manifest.json").read_text())
    del manifest["parts"]["fp16"]["decoder"]
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match=r"lacks part.*decoder"):
        Blip(model_copy)


def test_manifest_not_json(model_copy: Path):
    (model_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="unreadable"):
        Blip(model_copy)


def test_manifest_of_another_format(model_copy: Path):
    manifest = json.loads((model_copy / "manifest.json").read_text())
    manifest["format"] = 99
    (model_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelDirError, match="format 99"):
        Blip(model_copy)


def test_precision_not_built(tiny_dir: Path):
    with pytest.raises(ValueError, match="no int8 build"):
        Blip(tiny_dir, precision="int8")
