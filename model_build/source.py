"""Load a BLIP checkpoint (hub id or local folder) with its processor, or say precisely why not."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoProcessor, BlipForConditionalGeneration, BlipForQuestionAnswering

SUPPORTED = {
    "BlipForQuestionAnswering": (BlipForQuestionAnswering, ["caption", "answer"]),
    "BlipForConditionalGeneration": (BlipForConditionalGeneration, ["caption"]),
}


class BuildError(Exception):
    """A build problem the user can fix; the message says what and where."""


@dataclass
class Checkpoint:
    model: torch.nn.Module
    processor: object
    architecture: str
    tasks: list[str]
    source: str
    revision: str | None
    generation: dict


def load_checkpoint(source: str, revision: str | None = None) -> Checkpoint:
    """Load `source` (a local checkpoint folder or a Hugging Face hub id) in fp32, eval mode."""
    path = Path(source).expanduser()
    # a hub id is "owner/name"; anything else that names a path is meant as a folder
    looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local:
        _check_folder(path)
        source = str(path.resolve())
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except OSError as e:
        if looks_local:
            raise BuildError(f"{path}: cannot read the checkpoint's config.json ({e})") from None
        raise BuildError(
            f"cannot load {source!r} from the Hugging Face hub: {_first_line(e)}\n"
            "Check the model id and revision, your network or HF_TOKEN, or pass a local checkpoint folder."
        ) from None
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if config.model_type != "blip" or architecture not in SUPPORTED:
        raise BuildError(
            f"{source}: architecture {architecture or config.model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    model_class, tasks = SUPPORTED[architecture]
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    try:
        model = model_class.from_pretrained(source, revision=revision, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError, SafetensorError) as e:
        raise BuildError(f"{source}: checkpoint files are missing or unreadable: {_first_line(e)}") from None
    model.eval()
    generation = {}
    if model.generation_config is not None:
        generation = model.generation_config.to_diff_dict()
    return Checkpoint(model, processor, architecture, tasks, source, revision, generation)


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise BuildError(f"{path}: no such folder")
    if not path.is_dir():
        raise BuildError(f"{path}: not a folder; pass a checkpoint folder or a hub id")
    if not os.access(path, os.R_OK | os.X_OK):
        raise BuildError(f"{path}: folder is not readable by this user")
    config = path / "config.json"
    if not config.is_file():
        raise BuildError(f"{path}: no config.json, so this is not a transformers checkpoint folder")
    unreadable = [p.name for p in path.iterdir() if p.is_file() and not os.access(p, os.R_OK)]
    if unreadable:
        raise BuildError(f"{path}: not readable by this user: {', '.join(sorted(unreadable))}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
