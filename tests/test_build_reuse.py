"""`blip-build --skip-if-built`: a model directory that holds the requested build is left alone.

docker-compose's one-shot model-build service relies on it: `docker compose up` a second time must not
rebuild, and a changed model, revision or setting must.
"""

from __future__ import annotations

import json
import shutil
import time

import huggingface_hub

from backend.runtime.blip import Blip
from backend.server.app import Settings, create_app
from model_build import reuse
from model_build.__main__ import main as blip_build
from model_build.__main__ import parser, quant_settings
from model_build.tiny_blip import CHECKPOINT_DIR


def wanted(*argv: str, source: str | None = None) -> dict:
    args = parser().parse_args([*argv, "-o", "unused"])
    return reuse.requested(args, source or str(CHECKPOINT_DIR), quant_settings(args).describe())


def test_same_request_is_up_to_date():
    assert reuse.differences(wanted("tiny"), wanted("tiny")) == []


def test_each_setting_counts():
    base = wanted("tiny")
    for other in (
        wanted("tiny", "--no-int8"),
        wanted("tiny", "--subset-size", "20"),
        wanted("tiny", "--seed", "1"),
        wanted("tiny", "--min-agreement", "0.9"),
        wanted("tiny", "--target-agreement", "0.95"),
        wanted("tiny", "--no-accuracy-control"),
        wanted("tiny", "--caption-model", "tiny-wide"),
        {**base, "tools": {**base["tools"], "openvino": "0.0"}},
        {**base, "source": "Salesforce/blip-vqa-base"},
    ):
        diffs = reuse.differences(base, other)
        assert len(diffs) == 1, diffs
    assert reuse.differences(base, wanted("tiny", "--subset-size", "20"))[0].startswith("int8: ")


def test_revisions_compare_resolved():
    commit = "a" * 40
    stored = {**wanted("tiny"), "revision": "main", "resolved": commit}
    # "main" then, the commit it pointed at now: the same build
    assert reuse.differences(stored, {**stored, "revision": commit}) == []
    # the branch moved on
    assert reuse.differences(stored, {**stored, "resolved": "b" * 40}) == [
        f'resolved: "{commit}" -> "{"b" * 40}"'
    ]
    # the hub is unreachable now: the requested revision decides
    assert reuse.differences(stored, {**stored, "resolved": None}) == []
    assert reuse.differences(stored, {**stored, "resolved": None, "revision": "v2"}) != []


def test_local_checkpoint_is_resolved_by_content(tmp_path):
    ckpt = shutil.copytree(CHECKPOINT_DIR, tmp_path / "ckpt")
    before = reuse.resolve_revision(str(ckpt), None)
    assert before.startswith("sha256:") and before == reuse.resolve_revision(str(ckpt), "ignored")
    (ckpt / ".hidden").write_text("not part of the checkpoint")
    assert reuse.resolve_revision(str(ckpt), None) == before
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "note": "retrained"}))
    assert reuse.resolve_revision(str(ckpt), None) != before
    assert reuse.resolve_revision(str(tmp_path / "missing"), None) is None


def test_hub_revision_resolution(monkeypatch, tmp_path):
    commit = "c" * 40
    assert reuse.resolve_revision("Salesforce/blip-vqa-base", commit) == commit  # pinned: no hub asked

    class Hub:
        def model_info(self, repo, revision=None, timeout=None):
            assert (repo, revision) == ("Salesforce/blip-vqa-base", "main")
            return type("Info", (), {"sha": commit})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    assert reuse.resolve_revision("Salesforce/blip-vqa-base", "main") == commit

    class Offline:
        def model_info(self, *a, **kw):
            raise OSError("unreachable")

    cached = tmp_path / "snapshots" / ("d" * 40) / "config.json"
    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **kw: str(cached))
    assert reuse.resolve_revision("Salesforce/blip-vqa-base", "main") == "d" * 40
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **kw: None)
    assert reuse.resolve_revision("Salesforce/blip-vqa-base", "main") is None


def test_calibration_source_counts(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"1")
    questions = tmp_path / "q.txt"
    questions.write_text("what is it?\n")
    argv = ("tiny", "--calibration-images", str(images), "--calibration-questions", str(questions))
    first = wanted(*argv)
    assert reuse.differences(first, wanted(*argv)) == []
    (images / "notes.txt").write_text("not an image")
    assert reuse.differences(first, wanted(*argv)) == []
    (images / "b.png").write_bytes(b"2")
    assert reuse.differences(first, wanted(*argv)) != []
    second = wanted(*argv)
    questions.write_text("what colour is it?\n")
    assert reuse.differences(second, wanted(*argv)) != []
    assert reuse.differences(wanted("tiny", "--project", "3"), wanted("tiny", "--project", "4")) != []


def test_skip_if_built(tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["tiny", "-o", str(out), "--no-int8", "--skip-if-built"]
    assert blip_build(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["source"] == "tiny" and manifest["build"]["int8"] is None
    assert manifest["build"]["resolved"] == reuse.resolve_revision(str(CHECKPOINT_DIR), None)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()

    t0 = time.perf_counter()
    assert blip_build(argv) == 0
    assert f"model directory {out} is up to date" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # nothing written
    assert time.perf_counter() - t0 < 30

    # other settings: a different build, which only --force may replace
    assert blip_build([*argv[:-2], "--subset-size", "8", "--skip-if-built"]) == 2
    assert "pass --force" in capsys.readouterr().err

    # a damaged directory is not up to date: rebuilt (with --force, as docker-compose runs it)
    (out / "fp16" / "decoder.bin").write_bytes(b"broken")
    assert blip_build([*argv, "--force"]) == 0
    assert "decoder.bin" in capsys.readouterr().err

    assert blip_build(argv) == 0
    assert "is up to date" in capsys.readouterr().out

    # nor is one an older blip-build wrote (another manifest format), e.g. a previous release's volume, nor
    # an interrupted build (the record is written last): each says why, and is only replaced with --force
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    assert blip_build(argv) == 2
    err = capsys.readouterr().err
    assert "manifest format 1" in err and "pass --force" in err
    del manifest["build"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert blip_build(argv) == 2
    assert "no record of a completed build" in capsys.readouterr().err


def test_failed_gate_serves_fp16_and_is_reported_again(tmp_path, capsys):
    """A build whose INT8 missed --min-agreement exits 3 and leaves INT8 unserved; asking for it again
    says so again, fast."""
    out = tmp_path / "model"
    argv = ["tiny", "-o", str(out), "--subset-size", "8", "--min-agreement", "1.01", "--skip-if-built"]
    assert blip_build(argv) == 3
    assert "will serve FP16" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["int8"]["serve"] is False
    assert Blip(out).precision == "fp16"
    assert Blip(out, precision="int8").precision == "int8"  # PRECISION=int8 can still force it
    # and the backend, given no PRECISION, serves FP16 too
    health = create_app(out, settings=Settings()).test_client().get("/health").get_json()
    assert health["precision"] == "fp16"
    assert blip_build(argv) == 3
    captured = capsys.readouterr()
    assert "is up to date" in captured.out and "serves FP16" in captured.err
