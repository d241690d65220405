"""Exact-match accuracy of a BLIP checkpoint on synthetic scenes, using the stock transformers generate calls.

Answers are generated one question at a time: transformers' ``BlipForQuestionAnswering.generate`` lets the
answer decoder attend to question padding, so padded batches would measure something the model never saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import BlipForQuestionAnswering, BlipProcessor

from model_build.reference import caption_ids

from .synthetic import QUESTION_TYPES, Scene

ANSWER_MAX_NEW_TOKENS = 10
CAPTION_MAX_NEW_TOKENS = 20


@torch.no_grad()
def answer(
    model: BlipForQuestionAnswering, processor: BlipProcessor, image: Image.Image, question: str
) -> str:
    """Greedy answer to one question about one image."""
    inputs = processor(images=image, text=question, return_tensors="pt")
    output = model.generate(
        input_ids=inputs["input_ids"],
        pixel_values=inputs["pixel_values"],
        attention_mask=inputs["attention_mask"],
        max_new_tokens=ANSWER_MAX_NEW_TOKENS,
    )
    return processor.decode(output[0], skip_special_tokens=True).strip()


def caption(model: BlipForQuestionAnswering, processor: BlipProcessor, image: Image.Image) -> str:
    """Greedy caption from the answer decoder conditioned directly on the image tokens."""
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    output = caption_ids(model, pixel_values, max_new_tokens=CAPTION_MAX_NEW_TOKENS)
    return processor.decode(output[0], skip_special_tokens=True).strip()


def evaluate(model: BlipForQuestionAnswering, processor: BlipProcessor, scenes: Sequence[Scene]) -> dict:
    """Exact-match accuracies: ``{"answers": {kind: acc, ..., "overall": acc}, "captions": acc}``.

    Kinds with no questions among ``scenes`` are left out of ``answers``.
    """
    was_training = model.training
    model.eval()
    right = dict.fromkeys(QUESTION_TYPES, 0)
    total = dict.fromkeys(QUESTION_TYPES, 0)
    captions_right = 0
    for scene in scenes:
        captions_right += caption(model, processor, scene.image) == scene.caption
        for qa in scene.qa:
            total[qa.kind] += 1
            right[qa.kind] += answer(model, processor, scene.image, qa.question) == qa.answer
    model.train(was_training)
    answers = {kind: right[kind] / total[kind] for kind in QUESTION_TYPES if total[kind]}
    answers["overall"] = sum(right.values()) / max(1, sum(total.values()))
    return {"answers": answers, "captions": captions_right / max(1, len(scenes))}
