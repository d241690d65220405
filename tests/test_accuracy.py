"""Held-out accuracy of the bundled tiny BLIP, in PyTorch and on OpenVINO: the runtime loses nothing."""

from __future__ import annotations

from collections import defaultdict

import pytest

from model_build.tiny_blip.evaluate import evaluate
from model_build.tiny_blip.synthetic import COLOURS, QUESTION_TYPES, SHAPES

TARGET = 0.95


@pytest.fixture(scope="module")
def pytorch_accuracy(hf, held_out):
    model, processor = hf
    return evaluate(model, processor, held_out)


@pytest.fixture(scope="module")
def runtime_results(blip, held_out):
    images = [s.image for s in held_out]
    return blip.caption(images), blip.answer(images, [[qa.question for qa in s.qa] for s in held_out])


def runtime_accuracy(held_out, results) -> dict:
    captions, answers = results
    right, total = defaultdict(int), defaultdict(int)
    for scene, got in zip(held_out, answers):
        for qa, a in zip(scene.qa, got):
            total[qa.kind] += 1
            right[qa.kind] += a.text == qa.answer
    acc = {kind: right[kind] / total[kind] for kind in total}
    acc["overall"] = sum(right.values()) / sum(total.values())
    return {
        "answers": acc,
        "captions": sum(c.text == s.caption for c, s in zip(captions, held_out)) / len(held_out),
    }


def test_pytorch_reaches_target_on_every_question_kind(pytorch_accuracy):
    answers = pytorch_accuracy["answers"]
    assert set(QUESTION_TYPES) <= set(answers)
    assert min(answers.values()) >= TARGET, answers
    assert pytorch_accuracy["captions"] >= TARGET


def test_runtime_accuracy_equals_pytorch(pytorch_accuracy, held_out, runtime_results):
    ours = runtime_accuracy(held_out, runtime_results)
    assert ours["answers"] == pytest.approx(pytorch_accuracy["answers"], abs=1e-9)
    assert ours["captions"] == pytest.approx(pytorch_accuracy["captions"], abs=1e-9)
    assert min(ours["answers"].values()) >= TARGET


def test_captions_name_every_object_colour_and_shape(held_out, runtime_results):
    captions, _ = runtime_results
    keywords = COLOURS + SHAPES
    named = 0
    for scene, cap in zip(held_out, captions):
        # "two red squares" names red and square: compare word stems against the known words
        truth = {k for w in scene.caption.split() for k in keywords if w.startswith(k)}
        said = {k for w in cap.text.split() for k in keywords if w.startswith(k)}
        named += truth <= said
    assert named / len(held_out) >= TARGET


def test_rank_picks_the_right_candidate(blip, held_out):
    right, total = defaultdict(int), defaultdict(int)
    for scene in held_out[:100]:
        for qa in scene.qa:
            ranked = blip.rank([scene.image], qa.question, qa.candidates)[0]
            assert sum(ranked.scores.values()) == pytest.approx(1.0, abs=1e-4)
            assert ranked.score == max(ranked.scores.values())
            total[qa.kind] += 1
            right[qa.kind] += ranked.text == qa.answer
    accuracy = {kind: right[kind] / total[kind] for kind in total}
    assert min(accuracy.values()) >= TARGET, accuracy


def test_scores_are_probabilities_that_rank_right_above_wrong(held_out, runtime_results):
    captions, answers = runtime_results
    scores = [c.score for c in captions] + [a.score for row in answers for a in row]
    assert all(0.0 <= s <= 1.0 for s in scores)
    # confident where right: the mean score of right answers is high
    right = [
        a.score
        for scene, row in zip(held_out, answers)
        for qa, a in zip(scene.qa, row)
        if a.text == qa.answer
    ]
    assert sum(right) / len(right) > 0.8
