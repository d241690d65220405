"""A warmed-up model gives back its IR weight files' pages, and nothing it answers changes. How much of
the files OpenVINO reads again later depends on the model (on a full-size INT8 build, 17 of 363 MB:
embedding rows looked up); bench/memory.py measures that and the rest of a worker's memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from backend.runtime.blip import Blip

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def weight_files(model_dir: Path, blip: Blip) -> list[Path]:
    parts = blip.manifest.data["parts"][blip.precision].values()
    return [model_dir / f["path"] for part in parts for f in part["files"] if f["path"].endswith(".bin")]


def resident_kib(files: list[Path]) -> int:
    """This process's resident KiB of its mappings of `files`."""
    wanted, total, counting = {str(f.resolve()) for f in files}, 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            counting = len(fields) >= 6 and fields[5] in wanted
        elif counting and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def outputs(blip: Blip, scenes) -> tuple:
    images = [s.image for s in scenes]
    questions = [[qa.question for qa in s.qa] for s in scenes]
    return (
        [c.text for c in blip.caption(images)],
        [[a.text for a in answers] for answers in blip.answer(images, questions)],
        [r.text for r in blip.rank(images, "what shape is on the left?", ["circle", "square", "triangle"])],
    )


def test_warm_up_gives_back_the_weight_files_and_changes_no_answer(tiny_dir: Path, held_out) -> None:
    scenes = held_out[:12]
    cold = Blip(tiny_dir)
    files = weight_files(tiny_dir, cold)
    expected = outputs(cold, scenes)
    size_kib = sum(f.stat().st_size for f in files) >> 10
    assert resident_kib(files) > size_kib // 2, "a model that has run holds its weight files' pages"

    warm = Blip(tiny_dir)
    released = warm.warm_up()
    assert released >= size_kib << 10
    assert resident_kib(files) < size_kib // 20
    assert outputs(warm, scenes) == expected  # new batch sizes and question lengths after the release
