"""The benchmark cannot rot: a smoke run on the tiny model (one repeat) completes and reports every cell.

Speed itself is never asserted here (bench/run.py measures it, on the full-size model); this only
proves the command works and that its notebook-style reference is a correct BLIP pipeline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_run_reports_every_contender_and_workload(tmp_path: Path, held_out):
    out = tmp_path / "results.json"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "run.py"),
        "--smoke",
        "--work",
        str(tmp_path),
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    for workload in ("vision", "caption", "question", "task"):
        assert set(results["ms"][workload]) == {"pytorch", "notebook_int8", "fp16", "int8"}
        assert all(ms > 0 for ms in results["ms"][workload].values())
    for precision in ("int8", "fp16"):
        assert results["backend"][precision]["tasks_per_s"] > 0
        assert results["backend"][precision]["peak_rss_mib"] > 50
    assert results["build_s"] > 0
    assert "task (caption + 3 q)" in run.stdout and "tasks/s" in run.stdout

    # the reference pipeline the README's ratios are measured against gets the test model's scenes right
    sys.path.insert(0, str(REPO / "bench"))
    from notebook_style import NotebookPipeline

    pipeline = NotebookPipeline(
        tmp_path / "model", tmp_path / "notebook" / "decoder_with_cross_attention.xml", 1
    )
    scenes = held_out[:10]
    right = sum(pipeline.caption(s.image, stop=True) == s.caption for s in scenes)
    right += sum(pipeline.answer(s.image, s.qa[0].question, stop=True) == s.qa[0].answer for s in scenes)
    assert right >= 18, right
