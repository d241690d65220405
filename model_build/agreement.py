"""How often a build says what FP16 says: the quantity the INT8 gate and accuracy control hold.

FP16 executed in f32 is token-exact with PyTorch, so agreement with FP16 is agreement with the checkpoint.
The gate value is the weaker of two shares: held-out questions answered exactly as FP16 answers them, and
caption token positions equal to FP16's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.runtime.blip import Blip
from model_build.calibration import Sample


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Share of token positions where two decodings agree (over the longer of each pair)."""
    same = total = 0
    for a, b in zip(reference, other):
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    return same / total if total else 1.0


def exact_match(reference: list[str], other: list[str]) -> float:
    return float(np.mean([a == b for a, b in zip(reference, other)])) if reference else 1.0


def gate_value(agreements: dict[str, Any]) -> float:
    """The weaker of answer and caption-token agreement: what --target-agreement is compared with."""
    keys = [k for k in ("answer_agreement", "caption_token_agreement") if k in agreements]
    return min(agreements[k] for k in keys)


@dataclass
class Measured:
    """One build against FP16 on some images: the shares, and the gate value per image (worst first
    is what NNCF's ranking looks at)."""

    shares: dict[str, Any]
    per_image: list[float]

    @property
    def value(self) -> float:
        return gate_value(self.shares)


@dataclass
class Encoded:
    """A fixed vision encoder's embeddings and captions of every reference sample (computed once while
    only the question encoder changes)."""

    embeds: np.ndarray
    captions: list[list[int]]


class Reference:
    """FP16's captions and answers for a set of samples, computed once; `measure` compares a build."""

    def __init__(self, fp16: Blip, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)
        self.answers_too = "answer" in fp16.tasks
        embeds = fp16.encode([s.image for s in self.samples])
        self.captions = [c.tokens for c in fp16.caption(embeds)]
        self.answers = self._answers(fp16, embeds, range(len(self.samples)))

    def encoded(self, blip: Blip) -> Encoded:
        embeds = blip.encode([s.image for s in self.samples])
        return Encoded(embeds, [c.tokens for c in blip.caption(embeds)])

    def measure(
        self, blip: Blip, idx: Sequence[int] | None = None, vision: Encoded | None = None
    ) -> Measured:
        """`blip` on samples `idx` (default all); with `vision`, its embeddings and captions stand in for
        `blip`'s vision encoder and decoder."""
        idx = list(range(len(self.samples))) if idx is None else list(idx)
        if vision is None:
            embeds = blip.encode([self.samples[i].image for i in idx])
            captions = [c.tokens for c in blip.caption(embeds)]
        else:
            embeds, captions = vision.embeds[idx], [vision.captions[i] for i in idx]
        ref_captions = [self.captions[i] for i in idx]
        shares: dict[str, Any] = {
            "images": len(idx),
            "caption_token_agreement": agreement(ref_captions, captions),
            "caption_exact_match": float(np.mean([a == b for a, b in zip(ref_captions, captions)])),
        }
        per_image = [agreement([a], [b]) for a, b in zip(ref_captions, captions)]
        if self.answers_too:
            answers = self._answers(blip, embeds, idx)
            ref_answers = [self.answers[i] for i in idx]
            flat_ref = [a for row in ref_answers for a in row]
            shares["questions"] = len(flat_ref)
            shares["answer_agreement"] = exact_match(flat_ref, [a for row in answers for a in row])
            per_image = [min(p, exact_match(r, a)) for p, r, a in zip(per_image, ref_answers, answers)]
        return Measured(shares, per_image)

    def _answers(self, blip: Blip, embeds: np.ndarray, idx: Sequence[int]) -> list[list[str]]:
        if not self.answers_too:
            return [[] for _ in idx]
        return [
            [a.text for a in row] for row in blip.answer(embeds, [self.samples[i].questions for i in idx])
        ]
