"""INT8 builds of the tiny BLIP, calibrated on a folder of the user's images: smaller, as accurate, gated."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from templates import vqa

from backend.runtime.blip import Blip
from model_build.__main__ import main
from model_build.tiny_blip.synthetic import make_scenes

CALIBRATION = 130


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Synthetic scenes saved as files, with per-image questions, two broken files among them."""
    folder = tmp_path_factory.mktemp("calibration")
    lines = []
    for i, scene in enumerate(make_scenes(CALIBRATION, seed=77)):
        scene.image.save(folder / f"img{i:03d}.png")
        lines.append(json.dumps({"image": f"img{i:03d}.png", "questions": [qa.question for qa in scene.qa]}))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.jpg").write_text("this is text")
    (folder / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def int8_dir(image_folder: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "model"
    args = ["tiny", "-o", str(out), "--subset-size", "100"]
    args += [
        "--calibration-images",
        str(image_folder),
        "--calibration-questions",
        str(image_folder / "questions.jsonl"),
    ]
    assert main([*args, "--min-agreement", "0.95"]) == 0
    return out


def test_report_and_manifest(int8_dir: Path):
    report = json.loads((int8_dir / "report.json").read_text())
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    assert manifest["report"] == report
    assert manifest["int8"]["serve"] is True
    assert report["calibration"]["source"].startswith("folder ")
    assert len(report["calibration"]["skipped"]) == 2  # broken.png and notes.jpg, counted, not fatal
    for part, size in report["sizes"].items():
        assert size["int8_bytes"] < size["fp16_bytes"], part
    assert report["agreement"]["answer_agreement"] >= 0.95
    assert {"caption_ms", "answer_ms"} <= set(report["latency"]["int8"])


def test_serving_picks_int8_and_it_answers_like_fp16(int8_dir: Path, held_out):
    int8, fp16 = Blip(int8_dir), Blip(int8_dir, precision="fp16")
    assert int8.precision == "int8"
    scenes = held_out[:100]
    accuracy = {}
    for name, blip in (("fp16", fp16), ("int8", int8)):
        answers = blip.answer([s.image for s in scenes], [[qa.question for qa in s.qa] for s in scenes])
        right, total = defaultdict(int), defaultdict(int)
        for scene, row in zip(scenes, answers):
            for qa, a in zip(scene.qa, row):
                total[qa.kind] += 1
                right[qa.kind] += a.text == qa.answer
        accuracy[name] = sum(right.values()) / sum(total.values())
    assert accuracy["int8"] >= accuracy["fp16"] - 0.02, accuracy


def test_impossible_min_agreement_fails_and_leaves_int8_unserved(image_folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "model"
    args = ["tiny", "-o", str(out), "--subset-size", "20", "--calibration-images", str(image_folder)]
    assert main([*args, "--min-agreement", "1.01"]) == 3
    assert "will serve FP16" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["int8"]["serve"] is False
    assert Blip(out).precision == "fp16"
    # and the backend, given no PRECISION, serves FP16 too
    from backend.server.app import Settings, create_app

    health = create_app(out, settings=Settings()).test_client().get("/health").get_json()
    assert health["precision"] == "fp16"


def test_evaluation_command_reproduces_the_accuracy(int8_dir: Path, held_out, tmp_path: Path, capsys):
    from model_build.evaluate import main as evaluate_main

    scenes = held_out[:40]
    lines = []
    for i, scene in enumerate(scenes):
        scene.image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "captions": [scene.caption]}))
        # ten humans agreeing, as in VQA's data: a right answer scores 1
        lines += [
            json.dumps({"image": f"{i}.png", "question": qa.question, "answers": [qa.answer] * 10})
            for qa in scene.qa
        ]
    (tmp_path / "labels.jsonl").write_text("\n".join(lines) + "\n")
    assert evaluate_main([str(int8_dir), str(tmp_path / "labels.jsonl"), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    for precision in ("fp16", "int8"):
        blip = Blip(int8_dir, precision=precision)
        answers = blip.answer([s.image for s in scenes], [[qa.question for qa in s.qa] for s in scenes])
        flat = [a.text == qa.answer for s, row in zip(scenes, answers) for qa, a in zip(s.qa, row)]
        assert reported[precision]["questions"] == len(flat)
        assert reported[precision]["vqa_accuracy"] == pytest.approx(sum(flat) / len(flat))
        captions = blip.caption([s.image for s in scenes])
        exact = sum(c.text == s.caption for c, s in zip(captions, scenes)) / len(scenes)
        # an exact caption overlaps fully; the overlap is at least the exact-match rate
        assert reported[precision]["caption_overlap"] >= exact


VQA_CONFIG = vqa(1)


def test_int8_from_a_label_studio_export(tmp_path: Path):
    import base64
    import io

    tasks = []
    for i, scene in enumerate(make_scenes(30, seed=78)):
        if i % 2:  # half as files next to the export, half inline
            scene.image.save(tmp_path / f"t{i}.png")
            image = f"t{i}.png"
        else:
            buf = io.BytesIO()
            scene.image.save(buf, format="PNG")
            image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        tasks.append({"id": i + 1, "data": {"image": image, "q1": scene.qa[0].question}})
    tasks.append({"id": 99, "data": {"image": "http://127.0.0.1:9/gone.png", "q1": "what colour is it?"}})
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    (tmp_path / "config.xml").write_text(VQA_CONFIG)
    out = tmp_path / "model"
    args = [
        "tiny",
        "-o",
        str(out),
        "--subset-size",
        "20",
        "--calibration-export",
        str(tmp_path / "export.json"),
    ]
    assert main([*args, "--label-config", str(tmp_path / "config.xml"), "--min-agreement", "0.95"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"].startswith("Label Studio export")
    assert list(report["calibration"]["skipped"]) == ["task 99"]
    # --subset-size, with enough tasks left over for a held-out slice
    assert report["calibration"]["samples"] == 20
    assert report["agreement"]["answer_agreement"] >= 0.95
