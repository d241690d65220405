"""blip-build says precisely why it cannot build, and exits 2."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from model_build.__main__ import main
from model_build.export import export_parts
from model_build.source import BuildError, load_checkpoint
from model_build.tiny_blip import CHECKPOINT_DIR


def run_build(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    return capsys.readouterr().err


def test_missing_folder(capsys, tmp_path: Path):
    assert "no such folder" in run_build(capsys, str(tmp_path / "nope"), "-o", str(tmp_path / "out"))


def test_file_instead_of_folder(capsys, tmp_path: Path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    assert "not a folder" in run_build(capsys, str(f), "-o", str(tmp_path / "out"))


def test_folder_without_config(capsys, tmp_path: Path):
    assert "no config.json" in run_build(capsys, str(tmp_path), "-o", str(tmp_path / "out"))


def test_unsupported_architecture(capsys, tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    err = run_build(capsys, str(tmp_path), "-o", str(tmp_path / "out"))
    assert "'BertModel' is not supported" in err and "BlipForQuestionAnswering" in err


def test_unknown_hub_id(capsys, tmp_path: Path, monkeypatch):
    # the hub is unreachable here; offline mode makes the same failure quick and deterministic anywhere
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    err = run_build(capsys, "no-such-owner/no-such-blip", "-o", str(tmp_path / "out"))
    assert "cannot load 'no-such-owner/no-such-blip' from the Hugging Face hub" in err


def test_corrupt_weights(capsys, tmp_path: Path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in CHECKPOINT_DIR.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "model.safetensors").write_bytes(b"garbage")
    err = run_build(capsys, str(folder), "-o", str(tmp_path / "out"))
    assert "missing or unreadable" in err


def test_refuses_to_overwrite_without_force(capsys, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    assert "--force" in run_build(capsys, "tiny", "-o", str(out))


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_not_enough_space_is_refused_before_starting(capsys, small_disk: Path):
    err = run_build(capsys, "tiny", "-o", str(small_disk / "out"))
    assert "MiB free on that disk" in err


def test_disk_filling_up_while_writing(small_disk: Path):
    with pytest.raises(BuildError, match="disk full"):
        export_parts(load_checkpoint(str(CHECKPOINT_DIR)), small_disk / "fp16")
