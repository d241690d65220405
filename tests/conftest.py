"""Shared fixtures: the bundled tiny BLIP (trained, committed) exported once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from label_studio_server import label_studio, ls  # noqa: F401 (session fixtures)

from model_build.tiny_blip import CHECKPOINT_DIR
from model_build.tiny_blip.synthetic import HELD_OUT_SEED, make_scenes

HELD_OUT = 200


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_build.export import build

    return build(str(CHECKPOINT_DIR), tmp_path_factory.mktemp("tiny") / "model", int8=False)


@pytest.fixture(scope="session")
def blip(tiny_dir: Path):
    from backend.runtime.blip import Blip

    return Blip(tiny_dir)


@pytest.fixture(scope="session")
def hf():
    """The same checkpoint in PyTorch: (model, processor)."""
    from transformers import AutoProcessor, BlipForQuestionAnswering

    model = BlipForQuestionAnswering.from_pretrained(CHECKPOINT_DIR).eval()
    return model, AutoProcessor.from_pretrained(CHECKPOINT_DIR)


@pytest.fixture(scope="session")
def held_out():
    return make_scenes(HELD_OUT, HELD_OUT_SEED)


@pytest.fixture
def model_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the exported model directory, for tests that damage it."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))
