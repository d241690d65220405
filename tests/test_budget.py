"""MEMORY_BUDGET_MB: a worker fits its batch sizes and embedding cache to a memory budget; what it
predicts does not change, only how many images each model call takes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from label_studio_server import data_uri
from templates import vqa

from backend.__main__ import main
from backend.annotate import budget
from backend.runtime.blip import Batches, Blip
from backend.server.app import Settings, create_app
from model_build.tiny_blip.synthetic import HELD_OUT_SEED, make_scenes

CONFIG = vqa(2, extra='\n  <TextArea name="caption" toName="image"/>')


def predictions(app, scenes) -> list:
    tasks = [
        {"id": i, "data": {"image": data_uri(s.image), "q1": s.qa[0].question, "q2": s.qa[1].question}}
        for i, s in enumerate(scenes)
    ]
    response = app.test_client().post("/predict", json={"tasks": tasks, "label_config": CONFIG})
    assert response.status_code == 200
    return [
        sorted((r["from_name"], r["value"]["text"][0]) for r in e["result"]) for e in response.json["results"]
    ]


def test_a_budget_too_small_runs_one_image_per_call_and_predicts_the_same(tiny_dir: Path, caplog) -> None:
    scenes = make_scenes(9, HELD_OUT_SEED)
    free = create_app(blip=Blip(tiny_dir), settings=Settings())
    assert free.config["predictor"].blip.batches == Batches()
    with caplog.at_level(logging.WARNING, logger="backend.annotate.budget"):
        tight = create_app(blip=Blip(tiny_dir), settings=Settings(memory_budget_mb=1))
    assert "MEMORY_BUDGET_MB=1 is less than this model needs" in caplog.text
    predictor = tight.config["predictor"]
    assert predictor.blip.batches == budget.CHOICES[-1] and not predictor.cache.enabled
    got = predictions(tight, scenes)
    assert all(len(p) == 3 for p in got)  # a caption and two answers for every task
    assert got == predictions(free, scenes)


def test_the_fastest_batches_that_fit_and_the_rest_to_the_cache() -> None:
    # a full-size model: 690 MiB after loading, 1.69 MiB of embeddings per image
    loaded, kv = 690.0, 577 * 768 * 4 / (1 << 20)
    roomy = budget.choose(loaded, kv, budget_mb=4000, cache_mb=256)
    assert roomy.batches == Batches() and roomy.cache_mb == 256 and roomy.fits
    smallest = budget.choose(loaded, kv, budget_mb=roomy.peak_mb - 256 - 1, cache_mb=256)
    assert smallest.batches != Batches() and smallest.fits
    assert smallest.peak_mb <= roomy.peak_mb - 256 - 1
    squeezed = budget.choose(loaded, kv, budget_mb=roomy.peak_mb - 100, cache_mb=256)
    assert squeezed.batches == Batches() and squeezed.cache_mb == 156
    short = budget.choose(loaded, kv, budget_mb=900, cache_mb=256)
    assert not short.fits and short.batches == budget.CHOICES[-1] and short.cache_mb == 0


def test_malformed_numbers_in_the_environment_stop_the_start(monkeypatch, capsys) -> None:
    monkeypatch.setenv("MEMORY_BUDGET_MB", "1.5GB")
    with pytest.raises(ValueError, match=r"MEMORY_BUDGET_MB must be a positive whole number, got '1\.5GB'"):
        Settings.from_env()
    monkeypatch.setenv("MEMORY_BUDGET_MB", "1500")
    assert Settings.from_env().memory_budget_mb == 1500
    # read by the command line, before gunicorn starts: WORKERS=two used to mean one worker, silently
    monkeypatch.setenv("WORKERS", "two")
    assert main(["serve", "--model-dir", "models/none"]) == 2
    assert "WORKERS must be a positive whole number, got 'two'" in capsys.readouterr().err
