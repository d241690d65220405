"""A tiny BLIP (captioning + VQA) trained from scratch on synthetic shape scenes.

The checkpoint in ``checkpoint/`` is committed so that tests never retrain; rebuild it with
``python -m model_build.tiny_blip.train``. ``synthetic`` generates the data and has no torch dependency.
"""

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
