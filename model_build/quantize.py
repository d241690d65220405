"""NNCF INT8: post-training quantization of the encoders, weight compression of the decoder.

The vision encoder and the question encoder (`text_encoder_kv` and `text_encoder`) get full INT8
(weights and activations) with NNCF's transformer preset, calibrated on the user's images and
questions. The decoder and its cross-attention projections get weight-only compression: quantizing the
decoder's activations costs accuracy (DESIGN.md), and its step is bound by weight reads anyway. Every
part is accuracy-controlled through the whole pipeline (model_build/accuracy.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nncf
import numpy as np
import openvino as ov
from nncf.quantization.advanced_parameters import (
    AdvancedQuantizationParameters,
    AdvancedSmoothQuantParameters,
)

from backend.runtime.blip import Blip, encode_images, ov_config
from backend.runtime.preprocess import pixel_values
from model_build.accuracy import TARGET_AGREEMENT, Control
from model_build.calibration import Sample

WEIGHT_MODES = ("int8_asym", "int8_sym", "int4_asym", "int4_sym")
STATISTICS_PRECISIONS = ("f32", "bf16")


def native_bf16() -> bool:
    """Whether this CPU executes bf16 in hardware (AVX512_BF16 or AMX); elsewhere OpenVINO emulates it."""
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def default_statistics_precision() -> str:
    return "bf16" if native_bf16() else "f32"


@dataclass(frozen=True)
class QuantSettings:
    subset_size: int = 300
    smooth_quant_alpha: float = 0.95  # NNCF's transformer default for MatMul; negative disables SmoothQuant
    ignored_scope: tuple[str, ...] = ()  # regex patterns of node names kept in full precision
    weights: str = "int8_asym"  # decoder weight compression mode
    group_size: int | None = None  # INT4 only (NNCF default 128)
    ratio: float | None = None  # INT4 only: share of layers in INT4, the rest INT8 (NNCF default 1.0)
    target_agreement: float = TARGET_AGREEMENT  # what accuracy control holds (model_build/accuracy.py)
    accuracy_control: bool = True  # False: plain NNCF, the gate alone decides what is served
    # what NNCF runs the model in to collect its statistics (the FP16 reference stays f32)
    statistics_precision: str = field(default_factory=default_statistics_precision)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {self.weights!r}")
        if not self.weights.startswith("int4") and (self.group_size is not None or self.ratio is not None):
            raise ValueError("group size and ratio apply to INT4 weight modes only")
        if self.subset_size < 1:
            raise ValueError("subset size must be at least 1")
        if not 0.0 < self.target_agreement <= 1.0:
            raise ValueError("target agreement must be in (0, 1]")
        if self.statistics_precision not in STATISTICS_PRECISIONS:
            raise ValueError(
                f"statistics precision must be one of {', '.join(STATISTICS_PRECISIONS)}, "
                f"not {self.statistics_precision!r}"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "subset_size": self.subset_size,
            "smooth_quant_alpha": self.smooth_quant_alpha,
            "ignored_scope": list(self.ignored_scope),
            "weights": self.weights,
            "group_size": self.group_size,
            "ratio": self.ratio,
            "target_agreement": self.target_agreement,
            "accuracy_control": self.accuracy_control,
            "statistics_precision": self.statistics_precision,
        }


QUESTIONS_PER_IMAGE = 2  # text-encoder calibration: up to this many of each image's questions


class Calibration:
    """The calibration inputs of each part NNCF quantizes fully, one item per image or question
    (batch 1, as NNCF advises for transformers).

    A part's inputs are computed with the INT8 parts quantized before it (in `int8_dir`), so each
    part is calibrated on what it receives when served; INT8 also encodes images ~2.7x faster than
    FP16. Only the images whose questions make up the text encoder's subset are encoded.
    """

    PARTS = ("vision", "text_encoder_kv", "text_encoder")  # in this order: each needs the one before

    def __init__(self, blip: Blip, samples: list[Sample], subset_size: int, int8_dir: Path) -> None:
        self.blip, self.samples, self.subset_size, self.int8_dir = blip, samples, subset_size, int8_dir
        self.chosen: list[tuple[Sample, list[str]]] = []  # images with the questions asked of them
        n_questions = 0
        for s in samples if "answer" in blip.tasks else []:
            if n_questions >= subset_size:
                break
            if questions := s.questions[:QUESTIONS_PER_IMAGE]:
                self.chosen.append((s, questions))
                n_questions += len(questions)
        self._embeds = np.zeros((0, 0, 0), np.float32)

    def dataset(self, part: str) -> tuple[nncf.Dataset, int, str]:
        """(the dataset, its number of items, what an item is)"""
        settings = self.blip.image_settings
        if part == "vision":
            images = [
                {"pixel_values": pixel_values([s.image], settings)} for s in self.samples[: self.subset_size]
            ]
            return nncf.Dataset(images), len(images), "images"
        if part == "text_encoder_kv":
            self._embeds = encode_images(self._int8("vision"), [s.image for s, _ in self.chosen], settings)
            embeds = [{"encoder_states": e[None]} for e in self._embeds]
            return nncf.Dataset(embeds), len(embeds), "images"
        if part == "text_encoder":
            items = [(j, q) for j, (_, qs) in enumerate(self.chosen) for q in qs][: self.subset_size]
            image_kv = self._int8("text_encoder_kv").create_infer_request()
            last: dict[int, np.ndarray] = {}  # an image's keys/values (42 MB full-size) for its next question

            def question(item: tuple[int, str]) -> dict[str, np.ndarray]:
                j, q = item
                if j not in last:
                    last.clear()
                    last[j] = image_kv.infer({"encoder_states": self._embeds[j : j + 1]})[0]
                ids, mask = self.blip.text_codec.encode([q])
                index = np.zeros(1, np.int64)
                return {"input_ids": ids, "attention_mask": mask, "image_kv": last[j], "image_index": index}

            return nncf.Dataset(items, question), len(items), "questions"
        raise ValueError(f"{part} is not calibrated")

    def _int8(self, part: str) -> ov.CompiledModel:
        return ov.Core().compile_model(self.int8_dir / f"{part}.xml", "CPU", ov_config("CPU", None, None))


def quantize_parts(
    fp16: dict[str, Path],
    int8_dir: Path,
    calibration: Calibration,
    settings: QuantSettings,
    control: Control,
) -> dict[str, dict[str, Any]]:
    """fp16 part name -> xml; writes the INT8 parts into int8_dir, returns manifest entries.

    The weight-only parts first, then the fully quantized ones in pipeline order: each is calibrated on
    what the INT8 parts before it produce, and validated with them in the pipeline.
    """
    int8_dir.mkdir(parents=True, exist_ok=True)
    core = ov.Core()
    weight_only = [name for name in fp16 if name not in Calibration.PARTS]
    steps = [*weight_only, *(name for name in Calibration.PARTS if name in fp16)]
    heads = {name: f"      {i}/{len(steps)} {name}:" for i, name in enumerate(steps, 1)}
    compressed = {}
    for name in weight_only:
        t0 = time.perf_counter()
        _log(f"{heads[name]} compressing weights ({settings.weights})")
        model = nncf.compress_weights(
            core.read_model(fp16[name]),
            mode=nncf.CompressWeightsMode(settings.weights),
            group_size=settings.group_size,
            ratio=settings.ratio,
            ignored_scope=_ignored(settings),
        )
        compressed[name] = _save(model, int8_dir / f"{name}.xml")
        _log(f"{' ' * len(heads[name])} done in {time.perf_counter() - t0:.1f} s")
    if compressed and settings.accuracy_control:
        for name, xml in control.weight_only(compressed, fp16).items():
            if xml == fp16[name]:  # kept in FP16: the INT8 build holds its own copy
                _save(core.read_model(xml), int8_dir / f"{name}.xml")
    for name in steps[len(weight_only) :]:
        t0 = time.perf_counter()
        dataset, n, unit = calibration.dataset(name)
        _log(f"{heads[name]} quantizing on {n} {unit}")
        model, subset = core.read_model(fp16[name]), min(n, settings.subset_size)
        options = {"model_type": nncf.ModelType.TRANSFORMER, "ignored_scope": _ignored(settings)}
        advanced = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=settings.smooth_quant_alpha)
        )
        with statistics_in(settings.statistics_precision):
            if settings.accuracy_control:
                options["advanced_quantization_parameters"] = advanced
                model = control.quantize(name, model, dataset, subset, options)
            else:
                model = nncf.quantize(
                    model, dataset, subset_size=subset, advanced_parameters=advanced, **options
                )
        _save(model, int8_dir / f"{name}.xml")
        _log(f"{' ' * len(heads[name])} done in {time.perf_counter() - t0:.1f} s")
    return {name: {"files": [int8_dir / f"{name}.xml", int8_dir / f"{name}.bin"]} for name in fp16}


@contextmanager
def statistics_in(precision: str) -> Iterator[None]:
    """NNCF collects its statistics by running the model in f32 whatever the CPU offers
    (nncf.openvino.engine.OVNativeEngine hard-codes the hint); its pipeline looks that class up in its
    module each time it runs a model, so swapping it there is how to run the passes in bf16: 1.5x faster
    passes on the full-size vision encoder, which takes two over every calibration image."""
    import nncf.openvino.engine as engine
    from nncf.openvino.graph.model_utils import model_has_state

    native = engine.OVNativeEngine

    class Engine(native):  # type: ignore[misc, valid-type]
        def __init__(self, model: ov.Model, use_fp32_precision: bool = True) -> None:
            compiled = ov.Core().compile_model(model, "CPU", ov_config("CPU", None, precision))
            self.engine = engine.OVCompiledModelEngine(compiled, model_has_state(model))

    engine.OVNativeEngine = Engine
    try:
        yield
    finally:
        engine.OVNativeEngine = native


def _save(model: ov.Model, xml: Path) -> Path:
    ov.save_model(model, xml, compress_to_fp16=True)
    return xml


def _ignored(settings: QuantSettings) -> nncf.IgnoredScope | None:
    if not settings.ignored_scope:
        return None
    return nncf.IgnoredScope(patterns=list(settings.ignored_scope), validate=False)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
