"""The benchmark cannot rot: a smoke run on the tiny model (one repeat) completes and reports every cell.

Speed itself is never asserted here (bench/run.py measures it, on the full-size model); this only
proves the command works and that its two notebook references (the notebook as users run it, and the
notebook's pipeline shape on this project's parts) are correct BLIP pipelines.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
from transformers import BlipForQuestionAnswering

from model_build.reference import caption_ids
from model_build.tiny_blip import CHECKPOINT_DIR

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
        assert set(results["ms"][workload]) == {"pytorch", "notebook", "notebook_style", "fp16", "int8"}
        assert all(ms > 0 for ms in results["ms"][workload].values())
    for precision in ("int8", "fp16"):
        assert results["backend"][precision]["tasks_per_s"] > 0
        assert results["backend"][precision]["peak_rss_mib"] > 50
    assert results["build_s"] > 0 and results["notebook"]["build_s"] > 0
    asked = results["backend"]["int8"]["interactive"]
    assert asked["first_ms"] > 0 and asked["follow_up_ms"] > 0
    # the notebook's IRs are compiled with OpenVINO's defaults, on the bench's number of threads
    compiled = results["notebook"]["compiled"]
    assert set(compiled) == {"blip_vision_model", "blip_text_encoder", "blip_text_decoder_with_past"}
    for settings in compiled.values():
        assert settings["PERFORMANCE_HINT"] == "LATENCY" and settings["NUM_STREAMS"] == 1
        assert settings["INFERENCE_NUM_THREADS"] == results["threads"]
        assert settings["INFERENCE_PRECISION_HINT"] in ("f32", "bf16", "f16")
    # the machine the ratios belong to: CPU model and flags
    machine = results["machine"]
    assert machine["cpu"] and machine["cores"] >= 1
    if Path("/proc/cpuinfo").exists() and platform.machine() == "x86_64":
        assert "sse2" in machine["cpu_flags"].split()  # every x86-64 CPU has it
    assert "task (caption + 3 q)" in run.stdout and "tasks/s" in run.stdout and "follow-up" in run.stdout

    # the reference pipelines the README's ratios are measured against get the test model's scenes right
    sys.path.insert(0, str(REPO / "bench"))
    from notebook_faithful import NotebookBlip
    from notebook_style import NotebookPipeline

    scenes = held_out[:10]
    # the notebook as users run it: its IRs, transformers' generate, max_length=20, stopping at [SEP]
    notebook = NotebookBlip(CHECKPOINT_DIR, tmp_path / "notebook_faithful", threads=1)
    right = sum(notebook.caption(s.image) == s.caption for s in scenes)
    right += sum(notebook.answer(s.image, s.qa[0].question) == s.qa[0].answer for s in scenes)
    assert right >= 18, right
    # and its export is transformers' BLIP: the FP16 IRs executed in f32 decode transformers' token ids
    exact = NotebookBlip(
        CHECKPOINT_DIR,
        tmp_path / "notebook_faithful",
        threads=1,
        precision="fp16",
        config={"INFERENCE_PRECISION_HINT": "f32"},
    )
    model = BlipForQuestionAnswering.from_pretrained(CHECKPOINT_DIR, dtype=torch.float32).eval()
    for s in scenes[:5]:
        inputs = exact.processor(images=s.image, text=s.qa[1].question, return_tensors="pt")
        pixels, length = inputs["pixel_values"], {"max_length": 20}  # the notebook's
        with torch.no_grad():
            answer = model.generate(**inputs, **length)
        caption = caption_ids(model, pixels, **length)
        assert exact.generate_answer(**inputs, **length).tolist() == answer.tolist()
        assert exact.generate_caption(pixels, **length).tolist() == caption.tolist()

    pipeline = NotebookPipeline(
        tmp_path / "model", tmp_path / "notebook_style" / "decoder_with_cross_attention.xml", 1
    )
    right = sum(pipeline.caption(s.image, stop=True) == s.caption for s in scenes)
    right += sum(pipeline.answer(s.image, s.qa[0].question, stop=True) == s.qa[0].answer for s in scenes)
    assert right >= 18, right


def test_memory_breakdown_measures_each_step_of_a_worker(tmp_path: Path, tiny_dir):
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(REPO / "bench" / "memory.py"), str(tiny_dir), "--tasks", "3"]
    cmd += ["--requests", "2"]
    run = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {row["step"]: row for row in json.loads(out.read_text())["rows"]}
    parts = ("vision", "text_encoder", "decoder")
    assert all(f"compile {part}" in rows for part in parts)
    assert "/predict 2: 3 tasks" in rows and "peak over the run" in run.stdout
    for row in rows.values():
        assert row["VmHWM"] >= row["VmRSS"] > 0 and row["RssAnon"] + row["RssFile"] <= row["VmRSS"] + 1
    assert rows["/predict 2: 3 tasks"]["VmRSS"] > rows["python"]["VmRSS"] + 50  # the model is in there


def test_throughput_compares_layouts_and_compile_options_side_by_side(tmp_path: Path, tiny_dir):
    out = tmp_path / "throughput.json"
    cmd = [sys.executable, str(REPO / "bench" / "throughput.py"), str(tiny_dir), "--out", str(out)]
    cmd += ["--only", "streams2,two_processes,int4_half", "--tasks", "4", "--rounds", "1"]
    run = subprocess.run([*cmd, "--repeats", "2"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    variants = results["variants"]
    assert list(variants) == ["streams2", "two_processes", "int4_half"]  # int4_half: its decoder recompressed
    for v in variants.values():
        assert len(v["tasks_per_s"]) == 2 and all(x > 0 for x in v["tasks_per_s"])  # one per repeat
        assert all(x > 0 for x in v["vision"] + v["captions"] + v["answers"] + v["follow_up"])
    # each variant's compile options and threads reached OpenVINO
    assert variants["streams2"]["settings"]["NUM_STREAMS"] == 2
    assert variants["two_processes"]["settings"] == {"NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": 1}
    assert results["machine"]["cpu"] and "| variant |" in run.stdout
