"""Tiny BLIPs (captioning + VQA) trained from scratch on synthetic shape scenes.

Two checkpoints are committed so that tests never retrain and INT8 settings are never tuned on one shape
only: ``checkpoint/`` (hidden 96, 96 px) and ``checkpoint-wide/`` (hidden 160, 5 heads, 128 px, another
token order). Rebuild them with ``python -m model_build.tiny_blip.train [--shape wide]``. ``synthetic``
generates the data and has no torch dependency.
"""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
WIDE_CHECKPOINT_DIR = Path(__file__).parent / "checkpoint-wide"


def bundled(source: str) -> str:
    """`blip-build`'s names for the bundled test models ('tiny', 'tiny-wide'); anything else as given."""
    return str({"tiny": CHECKPOINT_DIR, "tiny-wide": WIDE_CHECKPOINT_DIR}.get(source, source))
