"""NNCF INT8: post-training quantization of the encoders, weight compression of the decoder.

The vision encoder and the question encoder (`text_encoder`) get full INT8
(weights and activations) with NNCF's transformer preset, calibrated on the user's images and
questions. The decoder gets weight-only compression: quantizing its activations costs accuracy
(DESIGN.md), and its step is bound by weight reads anyway. Every
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
    AdvancedCompressionParameters,
    AdvancedQuantizationParameters,
    AdvancedSmoothQuantParameters,
    GroupSizeFallbackMode,
)
from PIL import Image

from backend.runtime.blip import Blip, encode_images, ov_config
from backend.runtime.preprocess import pixel_values
from model_build.accuracy import TARGET_AGREEMENT, Control
from model_build.calibration import Sample

WEIGHT_MODES = ("auto", "int8_asym", "int8_sym", "int4_asym", "int4_sym")


@dataclass(frozen=True)
class Rung:
    """One weight compression of a part: NNCF's mode, and for INT4 the share of layers in INT4."""

    mode: str
    ratio: float | None = None

    @property
    def int4(self) -> bool:
        return self.mode.startswith("int4")

    def __str__(self) -> str:
        return self.mode if self.ratio is None else f"{self.mode} (ratio {self.ratio:g}, the rest INT8)"


# `auto`, under accuracy control: each weight-only part's compressions, tried in turn from the fastest
# (model_build/accuracy.py). The decoder's step reads all of its weights for a few tokens' work, so INT4
# can make it faster; whether it does depends on the CPU, so its rungs are timed on the build's CPU and
# ordered by that (`by_speed`). Between INT4 and INT8, NNCF's mixed precision: half the decoder's layers
# in INT4 (those whose weights lose least to it), the rest INT8.
AUTO_LADDERS: dict[str, tuple[Rung, ...]] = {
    "decoder": (Rung("int4_asym"), Rung("int4_asym", 0.5), Rung("int8_asym")),
}
PLAIN_AUTO = Rung("int8_asym")  # `auto` without accuracy control: nothing measures what INT4 would cost
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
    weights: str = "auto"  # the weight-only part's compression (the decoder)
    group_size: int | None = None  # INT4 only (NNCF default 128)
    ratio: float | None = None  # INT4 only: share of layers in INT4, the rest INT8 (NNCF default 1.0)
    target_agreement: float = TARGET_AGREEMENT  # what accuracy control holds (model_build/accuracy.py)
    accuracy_control: bool = True  # False: plain NNCF, the gate alone decides what is served
    # what NNCF runs the model in to collect its statistics (the FP16 reference stays f32)
    statistics_precision: str = field(default_factory=default_statistics_precision)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_MODES)}, not {self.weights!r}")
        int4 = self.weights.startswith("int4") or self.weights == "auto"
        if not int4 and (self.group_size is not None or self.ratio is not None):
            raise ValueError("group size and ratio apply to INT4 weight modes only")
        if self.weights == "auto" and self.ratio is not None:
            raise ValueError("a ratio applies to an INT4 weight mode: auto tries ratios 1 and 0.5 itself")
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

    PARTS = ("vision", "text_encoder")  # in this order: each needs the one before

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

    def dataset(self, part: str) -> tuple[nncf.Dataset, int, str]:
        """(the dataset, its number of items, what an item is)"""
        settings = self.blip.image_settings
        if part == "vision":
            images = [
                {"pixel_values": pixel_values([s.image], settings)} for s in self.samples[: self.subset_size]
            ]
            return nncf.Dataset(images), len(images), "images"
        if part == "text_encoder":
            embeds = encode_images(self._int8("vision"), [s.image for s, _ in self.chosen], settings)
            items = [(j, q) for j, (_, qs) in enumerate(self.chosen) for q in qs][: self.subset_size]

            def question(item: tuple[int, str]) -> dict[str, np.ndarray]:
                j, q = item
                ids, mask = self.blip.text_codec.encode([q])
                inputs = {"word_embeds": self.blip.embed_words(ids), "attention_mask": mask}
                return inputs | {"encoder_states": embeds[j : j + 1]}

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
    ladders = {name: weight_modes(name, settings) for name in weight_only}
    shipped: dict[str, list[tuple[str, Path]]] = {}
    for name, rungs in ladders.items():
        t0 = time.perf_counter()
        _log(f"{heads[name]} compressing weights ({', then '.join(map(str, rungs))})")
        shipped[name] = []
        for i, rung in enumerate(rungs):
            model = compress(core.read_model(fp16[name]), rung, settings.group_size, _ignored(settings))
            shipped[name].append((str(rung), _save(model, int8_dir / f"{name}.rung{i}.xml")))
        _log(f"{' ' * len(heads[name])} done in {time.perf_counter() - t0:.1f} s")
    written = [xml for rungs in shipped.values() for _, xml in rungs]
    chosen = {name: rungs[0][1] for name, rungs in shipped.items()}
    if ladders and settings.accuracy_control:
        speed_ms = {}
        if len(shipped.get("decoder", [])) > 1:
            shipped["decoder"], speed_ms["decoder"] = by_speed(control, shipped["decoder"])
        chosen = control.weight_only(
            {name: [*rungs, ("fp16", fp16[name])] for name, rungs in shipped.items()},
            speed_ms,
        )
    for name, xml in chosen.items():  # the INT8 build holds its own copy of each part, FP16 ones too
        if xml.parent == int8_dir:
            for suffix in (".xml", ".bin"):
                xml.with_suffix(suffix).replace(int8_dir / f"{name}{suffix}")
        else:
            _save(core.read_model(xml), int8_dir / f"{name}.xml")
    for xml in written:  # the rungs not taken
        xml.unlink(missing_ok=True)
        xml.with_suffix(".bin").unlink(missing_ok=True)
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


def compress(
    model: ov.Model, rung: Rung, group_size: int | None = None, ignored: nncf.IgnoredScope | None = None
) -> ov.Model:
    """A weight-only part's weights compressed as `rung` says (NNCF's compress_weights)."""
    return nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode(rung.mode),
        group_size=group_size if rung.int4 else None,
        ratio=rung.ratio,
        ignored_scope=ignored,
        # a layer whose width the group size does not divide (a small checkpoint's 96 channels) takes
        # the largest power of two that does, down to 32, or INT8, instead of failing
        advanced_parameters=AdvancedCompressionParameters(
            group_size_fallback_mode=GroupSizeFallbackMode.ADJUST
        )
        if rung.int4
        else None,
    )


SPEED_TOKENS, SPEED_RUNS = 10, 5
# a rung below INT8 must decode this much faster to be tried: one within the timing's noise would cost
# agreement for nothing (tiny-wide's INT4 measured 23 vs INT8 22 ms, or 24 vs 56 under load, held 100% of
# accuracy control's validation answers, then 98.95% of the held-out ones: the gate refused the build)
SPEED_GAIN = 0.9


def by_speed(
    control: Control, rungs: list[tuple[str, Path]]
) -> tuple[list[tuple[str, Path]], dict[str, float]]:
    """The decoder's rungs that decode at least 10% faster than the last one (INT8) on this CPU, fastest
    first, then INT8, and every rung's ms (median of SPEED_RUNS: 10 tokens for one image, then for four
    decoded together). INT4 is not faster everywhere: 25% faster than INT8 per step at batch 1 on a CPU
    with AVX-512 VNNI, 20% slower on one with AVX2 only (full-size, 2 cores), where unpacking 4-bit
    weights costs more than it saves in memory reads."""
    fp16 = control.fp16
    task = "caption" if "caption" in fp16.generation and fp16.captioner is fp16 else "answer"
    size = fp16.image_settings["width"], fp16.image_settings["height"]
    embeds = fp16.encode([Image.new("RGB", size)] * 4)
    tokens = {"min_new_tokens": SPEED_TOKENS, "max_new_tokens": SPEED_TOKENS}
    timed = []
    for rung, xml in rungs:
        blip = fp16.with_parts({"decoder": control.compile(xml, "decoder")})
        runs = []
        for i in range(SPEED_RUNS + 1):  # the first run allocates: not counted
            t0 = time.perf_counter()
            for n in (1, 4):
                if task == "caption":
                    blip.caption(embeds[:n], **tokens)
                else:
                    blip.answer(embeds[:n], [["what is it?"]] * n, **tokens)
            if i:
                runs.append((time.perf_counter() - t0) * 1000)
        timed.append((rung, xml, float(np.median(runs))))
    _log("      decoder on this CPU: " + ", ".join(f"{rung} {ms:.0f} ms" for rung, _, ms in timed))
    fastest_first = sorted(timed, key=lambda t: t[2])
    int8 = timed[-1]
    kept = [(rung, xml) for rung, xml, ms in fastest_first if ms <= SPEED_GAIN * int8[2] or rung == int8[0]]
    return kept, {rung: ms for rung, _, ms in timed}


def weight_modes(part: str, settings: QuantSettings) -> tuple[Rung, ...]:
    """The compressions tried for a weight-only part, fastest first."""
    if settings.weights != "auto":
        return (Rung(settings.weights, settings.ratio),)
    if not settings.accuracy_control:
        return (PLAIN_AUTO,)
    return AUTO_LADDERS.get(part, (PLAIN_AUTO,))


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
