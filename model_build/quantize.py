"""NNCF INT8: post-training quantization of the encoders, weight compression of the decoder.

Vision encoder and text encoder get full INT8 (weights and activations) with NNCF's transformer
preset, calibrated on the user's images and questions. The decoder and its cross-attention
projections get weight-only compression: quantizing the decoder's activations costs accuracy
(DESIGN.md), and its step is bound by weight reads anyway.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nncf
import numpy as np
import openvino as ov
from nncf.quantization.advanced_parameters import (
    AdvancedQuantizationParameters,
    AdvancedSmoothQuantParameters,
)

from backend.blip import Blip, encode_images, ov_config
from backend.preprocess import pixel_values
from model_build.calibration import Sample

WEIGHT_MODES = ("int8_asym", "int8_sym", "int4_asym", "int4_sym")


@dataclass(frozen=True)
class QuantSettings:
    subset_size: int = 300
    smooth_quant_alpha: float = 0.95  # NNCF's transformer default for MatMul; negative disables SmoothQuant
    ignored_scope: tuple[str, ...] = ()  # regex patterns of node names kept in full precision
    weights: str = "int8_asym"  # decoder weight compression mode
    group_size: int | None = None  # INT4 only (NNCF default 128)
    ratio: float | None = None  # INT4 only: share of layers in INT4, the rest INT8 (NNCF default 1.0)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {self.weights!r}")
        if not self.weights.startswith("int4") and (self.group_size is not None or self.ratio is not None):
            raise ValueError("group size and ratio apply to INT4 weight modes only")
        if self.subset_size < 1:
            raise ValueError("subset size must be at least 1")

    def describe(self) -> dict[str, Any]:
        return {
            "subset_size": self.subset_size,
            "smooth_quant_alpha": self.smooth_quant_alpha,
            "ignored_scope": list(self.ignored_scope),
            "weights": self.weights,
            "group_size": self.group_size,
            "ratio": self.ratio,
        }


QUESTIONS_PER_IMAGE = 2  # text-encoder calibration: up to this many of each image's questions


def vision_inputs(blip: Blip, samples: list[Sample], subset_size: int) -> list[dict]:
    """The vision encoder's calibration inputs, one image each (batch 1, as NNCF advises for transformers)."""
    return [{"pixel_values": pixel_values([s.image], blip.image_settings)} for s in samples[:subset_size]]


def text_inputs(blip: Blip, vision: ov.CompiledModel, samples: list[Sample], subset_size: int) -> list[dict]:
    """The text encoder's calibration inputs, one question each, on image embeddings from `vision`.

    `vision` is the INT8 vision encoder once quantized: the text encoder is calibrated on the
    embeddings it receives when served (and INT8 encodes them ~2.7x faster than FP16). Only the
    images whose questions make up the first `subset_size` inputs, the ones NNCF uses, are encoded.
    """
    if "answer" not in blip.tasks:
        return []
    chosen: list[tuple[Sample, list[str]]] = []
    n_questions = 0
    for s in samples:
        if n_questions >= subset_size:
            break
        if questions := s.questions[:QUESTIONS_PER_IMAGE]:
            chosen.append((s, questions))
            n_questions += len(questions)
    embeds = encode_images(vision, [s.image for s, _ in chosen], blip.image_settings)
    text: list[dict] = []
    for (_, questions), image_embeds in zip(chosen, embeds):
        for q in questions:
            ids, mask = blip.text_codec.encode([q])
            text.append({"input_ids": ids, "attention_mask": mask, "image_embeds": image_embeds[None]})
    return text[:subset_size]


def quantize_parts(
    fp16: dict[str, Path],
    int8_dir: Path,
    vision: list[dict],
    text: Callable[[ov.CompiledModel], list[dict]],
    settings: QuantSettings,
) -> dict[str, dict[str, Any]]:
    """fp16 part name -> xml; writes the INT8 parts into int8_dir, returns manifest entries.

    `text` makes the text encoder's calibration inputs with the vision encoder quantized before it.
    """
    int8_dir.mkdir(parents=True, exist_ok=True)
    core = ov.Core()
    parts = {}
    steps = list(fp16)
    for i, name in enumerate(steps, 1):
        model = core.read_model(fp16[name])
        t0 = time.perf_counter()
        head = f"      {i}/{len(steps)} {name}:"
        if name == "vision":
            _log(f"{head} quantizing on {min(len(vision), settings.subset_size)} images")
            model = _quantize(model, vision, settings)
        elif name == "text_encoder":
            int8_vision = core.compile_model(int8_dir / "vision.xml", "CPU", ov_config("CPU", None, None))
            inputs = text(int8_vision)
            _log(f"{head} quantizing on {len(inputs)} questions (image embeddings by the INT8 vision part)")
            model = _quantize(model, inputs, settings)
        else:
            _log(f"{head} compressing weights ({settings.weights})")
            model = nncf.compress_weights(
                model,
                mode=nncf.CompressWeightsMode(settings.weights),
                group_size=settings.group_size,
                ratio=settings.ratio,
                ignored_scope=_ignored(settings),
            )
        xml = int8_dir / f"{name}.xml"
        ov.save_model(model, xml, compress_to_fp16=True)
        _log(f"{' ' * len(head)} done in {time.perf_counter() - t0:.1f} s")
        parts[name] = {"files": [xml, xml.with_suffix(".bin")]}
    return parts


def _quantize(model: ov.Model, inputs: list[dict], settings: QuantSettings) -> ov.Model:
    alpha = settings.smooth_quant_alpha
    return nncf.quantize(
        model,
        nncf.Dataset(inputs),
        subset_size=min(len(inputs), settings.subset_size),
        model_type=nncf.ModelType.TRANSFORMER,
        ignored_scope=_ignored(settings),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha)
        ),
    )


def _ignored(settings: QuantSettings) -> nncf.IgnoredScope | None:
    if not settings.ignored_scope:
        return None
    return nncf.IgnoredScope(patterns=list(settings.ignored_scope), validate=False)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Share of token positions where two decodings agree (over the longer of each pair)."""
    same = total = 0
    for a, b in zip(reference, other):
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    return same / total if total else 1.0


def exact_match(reference: list[str], other: list[str]) -> float:
    return float(np.mean([a == b for a, b in zip(reference, other)])) if reference else 1.0
