"""Accuracy-controlled INT8: each part quantized so that the whole pipeline still says what FP16 says.

The quantity held is the gate value (model_build/agreement.py) measured through the whole pipeline
(vision -> question encoder -> decoder) on a validation slice of the user's calibration data, which the
final held-out gate does not see. Each stage keeps it at or above `aim(target)`, a quarter of the
disagreement the target allows, so that the held-out gate, on other images, still clears the target.
In pipeline order:

1. The weight-only part (the decoder) is compressed and measured with the encoders in FP16, down a
   ladder from its fastest compression to FP16 (INT4, half INT4, INT8, FP16; see
   model_build/quantize.py): while the pipeline misses the aim, it goes down to the first rung that
   holds it (with more weight-only parts, the one whose FP16 restores the most agreement goes first).
2. The vision encoder, then the question encoder's two parts, go through NNCF's
   `quantize_with_accuracy_control`, whose validation function runs the whole pipeline with the
   candidate part plugged in. When plain INT8 already reaches the aim this costs two validations.
   Otherwise NNCF ranks groups of quantized operations by how much putting each back in float restores
   agreement (on the RANKING_IMAGES worst images), reverts the best one, validates, and repeats, at most
   MAX_REVERTS times.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import nncf
import openvino as ov
from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters
from nncf.quantization.algorithms.accuracy_control.algorithm import QuantizationAccuracyRestorer

from backend.runtime.blip import Blip, ov_config
from model_build.agreement import Encoded, Measured, Reference
from model_build.calibration import Sample

TARGET_AGREEMENT = 0.99
MAX_REVERTS = 20  # operations NNCF may put back in float per part; each costs one full validation
RANKING_IMAGES = 24  # validation images each candidate revert is ranked on (the worst ones)
PROFILE_RUNS = 10
COMPUTE_NODES = ("FullyConnected", "Convolution", "MatMul")  # where the reverted operations' time goes


def aim(target: float) -> float:
    """What each stage holds on the validation slice: a quarter of the disagreement the target allows
    (99.75% for 0.99). A slice of 60 images asks ~300 questions: one changed answer moves agreement by
    a third of a point, and the held-out slice the gate measures is as coarse. Halfway (99.5%) left a
    test model at 99.6% on validation and 98.95% on held-out images; a quarter leaves room for both
    slices' noise."""
    return 1.0 - (1.0 - target) / 4


@dataclass
class Stage:
    part: str
    method: str  # "accuracy control" | "weight compression"
    plain: float | None = None  # the pipeline's agreement with this part quantized as is
    final: float | None = None  # ... after accuracy control
    reverted: list[dict[str, Any]] = field(default_factory=list)  # operations put back in float
    kept_fp16: bool = False  # the whole part stays FP16
    weights: str | None = None  # weight-only parts: the compression shipped ("int4_asym", ..., "fp16")
    speed_ms: dict[str, float] = field(default_factory=dict)  # the decoder's rungs timed on the build's CPU
    validations: int = 0
    seconds: float = 0.0


class Control:
    """Validates candidate parts through the whole pipeline; collects what each stage did."""

    def __init__(self, fp16: Blip, validation: Sequence[Sample], target: float) -> None:
        self.fp16, self.validation = fp16, validation
        self.target, self.aim = target, aim(target)
        self.fixed: dict[str, ov.CompiledModel] = {}  # parts decided so far, in the pipeline
        self.stages: list[Stage] = []

    @cached_property
    def reference(self) -> Reference:
        """FP16's outputs on the validation slice: computed when first needed (a plain build never
        does), ~70 s for the default 60 images of the full-size model."""
        t0 = time.perf_counter()
        reference = Reference(self.fp16, self.validation)
        _log(f"      FP16 on {len(self.validation)} validation images in {time.perf_counter() - t0:.1f} s")
        return reference

    def compile(self, model: ov.Model | Path, part: str | None = None) -> ov.CompiledModel:
        return ov.Core().compile_model(model, "CPU", ov_config("CPU", None, None, part))

    def measure(self, parts: dict[str, ov.CompiledModel], idx: Sequence[int] | None = None) -> Measured:
        """The pipeline: FP16, with the parts decided so far and `parts` swapped in."""
        blip = self.fp16.with_parts({**self.fixed, **parts})
        vision = self._vision if "vision" in self.fixed and "vision" not in parts else None
        return self.reference.measure(blip, idx, vision)

    def fix(self, part: str, compiled: ov.CompiledModel) -> None:
        self.fixed[part] = compiled
        if part == "vision":  # the question encoder's stage re-decodes answers only
            self._vision: Encoded = self.reference.encoded(self.fp16.with_parts(self.fixed))

    # -- weight-only parts ---------------------------------------------------------------------

    def weight_only(
        self, ladders: dict[str, list[tuple[str, Path]]], speed_ms: dict[str, dict[str, float]] | None = None
    ) -> dict[str, Path]:
        """Chooses each weight-only part's compression: `ladders[part]` lists (mode, xml) from the
        fastest to FP16. Every part starts on its first rung; while the pipeline misses the aim, the part
        whose FP16 restores the most agreement goes down its ladder to the first rung that holds the aim
        (FP16 at worst). Returns part -> the xml to ship.
        `speed_ms`: what each rung's speed was measured at, for the report."""
        t0 = time.perf_counter()
        stages = {p: Stage(p, "weight compression") for p in ladders}
        rung = dict.fromkeys(ladders, 0)
        last = {p: len(r) - 1 for p, r in ladders.items()}  # each ladder's FP16 rung
        compiled: dict[tuple[str, int], ov.CompiledModel] = {}

        def candidates(at: dict[str, int]) -> dict[str, ov.CompiledModel]:
            chosen = {}
            for p, i in at.items():
                if i < last[p]:  # the last rung is FP16: the pipeline's own part
                    if (p, i) not in compiled:
                        compiled[p, i] = self.compile(ladders[p][i][1], p)
                    chosen[p] = compiled[p, i]
            return chosen

        def named(at: dict[str, int]) -> str:
            return ", ".join(f"{p} {ladders[p][i][0]}" for p, i in at.items())

        value = self.measure(candidates(rung)).value
        for stage in stages.values():
            stage.plain = value
        validations = 1
        _log(f"      weight-only parts ({named(rung)}): agreement {value:.1%} (aim {self.aim:.1%})")
        while value < self.aim and any(rung[p] < last[p] for p in ladders):
            # which part costs the agreement: each compressed part in FP16 in turn, the others as they are
            fp16 = {p: {**rung, p: last[p]} for p in ladders if rung[p] < last[p]}
            without = {p: self.measure(candidates(at)).value for p, at in fp16.items()}
            validations += len(without)
            # on a tie, the part with more rungs left: its next rung may hold the aim at a lower cost
            culprit = max(without, key=lambda p: (without[p], last[p] - rung[p]))
            each = ", ".join(f"{p} in FP16 {v:.1%}" for p, v in without.items())
            _log(f"      {each}: {culprit} costs the most")
            # its rungs below, in order, down to the first that holds the aim (FP16, measured above)
            for i in range(rung[culprit] + 1, last[culprit] + 1):
                at = {**rung, culprit: i}
                got = without[culprit] if i == last[culprit] else self.measure(candidates(at)).value
                validations += i < last[culprit]
                _log(f"      {named({culprit: i})}: agreement {got:.1%}")
                if got >= self.aim or i == last[culprit]:
                    rung, value = at, got
                    break
        for p, c in candidates(rung).items():
            self.fix(p, c)
        for p, stage in stages.items():
            stage.weights = ladders[p][rung[p]][0]
            stage.speed_ms = (speed_ms or {}).get(p, {})
            stage.kept_fp16 = rung[p] == last[p]
            stage.final, stage.validations = value, validations
            stage.seconds = time.perf_counter() - t0
        self.stages += stages.values()
        return {p: ladders[p][i][1] for p, i in rung.items()}

    # -- fully quantized parts -----------------------------------------------------------------

    def quantize(
        self,
        part: str,
        model: ov.Model,
        dataset: nncf.Dataset,
        subset_size: int,
        quantize_kwargs: dict[str, Any],
    ) -> ov.Model:
        """`nncf.quantize_with_accuracy_control` of `part`, validated through the whole pipeline."""
        t0 = time.perf_counter()
        stage = Stage(part, "accuracy control")
        n = len(self.validation)
        plain: list[float] = []

        def validate(compiled: ov.CompiledModel, items: Any) -> tuple[float, list[float]]:
            idx = list(items)  # NNCF learns the dataset's size from the items iterated
            measured = self.measure({part: compiled}, idx)
            stage.validations += 1
            # NNCF's calls: a one-item probe, the part in FP16, plainly quantized, then ranking and reverts
            if stage.validations == 3:
                plain.append(measured.value)
                _log(f"      {part} INT8: agreement {measured.value:.1%} (aim {self.aim:.1%})")
                if measured.value < self.aim:
                    _log(f"      {part}: ranking operations to put back in float")
            elif stage.validations > 3 and stage.validations % 20 == 0:
                _log(f"      {part}: {stage.validations} validations")
            # clipped at the aim: NNCF (max_drop 0) stops as soon as the pipeline reaches it
            return min(measured.value, self.aim), [min(v, self.aim) for v in measured.per_image]

        with _restorer() as restorer:
            model = nncf.quantize_with_accuracy_control(
                model,
                dataset,
                nncf.Dataset(list(range(n))),
                validate,
                max_drop=0.0,
                subset_size=subset_size,
                **quantize_kwargs,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=MAX_REVERTS, ranking_subset_size=min(RANKING_IMAGES, n)
                ),
            )
        compiled = self.compile(model)
        stage.plain = plain[0] if plain else None
        stage.final = self.measure({part: compiled}).value if restorer.changed else stage.plain
        stage.reverted = [{"operation": name} for name in restorer.reverted]
        if restorer.changed:
            n_ops = len(restorer.reverted)
            _log(f"      {part}: {n_ops} operation(s) put back in float, agreement {stage.final:.1%}")
            stage.reverted = profile(model, dataset, restorer.reverted)
        stage.seconds = time.perf_counter() - t0
        self.stages.append(stage)
        self.fix(part, compiled)
        return model

    def report(self) -> dict[str, Any]:
        reached = all(s.final is not None and s.final >= self.aim for s in self.stages)
        return {
            "target": self.target,
            "aim": self.aim,
            "validation_images": len(self.validation),
            "reached": reached,
            "stages": [asdict(s) for s in self.stages],
        }


class _Restored:
    def __init__(self) -> None:
        self.reverted: list[str] = []  # operations put back in float (or quantizers removed)
        self.changed = False


@contextmanager
def _restorer() -> Iterator[_Restored]:
    """NNCF's accuracy restorer, corrected for SmoothQuant, reporting which operations it reverted.

    NNCF 3.4.0 puts a reverted operation's original weight W back but leaves SmoothQuant's scaling of its
    input (x/s, compensated by W*s) in place, so the "float" operation computes (x/s)*W: wrong, not float
    (reverting every operation of a smoothed model does not give the float model back). Keeping the
    smoothed weight W*s, and restoring only biases (undoing bias correction), makes a reverted operation
    exact in float; tests/test_accuracy_control.py checks it. NNCF only logs which operations it reverted,
    so its report is read on the way.
    """
    cls = QuantizationAccuracyRestorer
    original_collect = cls.__dict__["_collect_original_biases_and_weights"]
    original_report = cls.__dict__["_print_report"]
    restored = _Restored()

    def biases_only(initial_graph: Any, quantized_graph: Any, initial_model: Any, backend: Any) -> None:
        for node in initial_graph.get_all_nodes():
            if backend.is_node_with_bias(node, initial_graph):
                quantized_graph.get_node_by_name(node.node_name).attributes["original_bias"] = (
                    backend.get_bias_value(node, initial_graph, initial_model)
                )

    def keep_report(report: Any, max_num_iterations: int) -> None:
        # a group is the operations that go back to float with its quantizers; a quantizer of an input
        # no quantized operation reads (e.g. an attention product's) reverts no operation: named itself
        for group in report.removed_groups:
            nodes = group.operations or group.quantizers
            restored.reverted += [node.node_name for node in nodes]
        restored.changed = bool(report.removed_groups)
        original_report.__func__(report, max_num_iterations)

    cls._collect_original_biases_and_weights = staticmethod(biases_only)
    cls._print_report = staticmethod(keep_report)
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.WARNING)  # its INFO lines repeat what the build prints
    try:
        yield restored
    finally:
        cls._collect_original_biases_and_weights = original_collect
        cls._print_report = original_report
        nncf_log.setLevel(level)


def profile(model: ov.Model, dataset: nncf.Dataset, reverted: Sequence[str]) -> list[dict[str, Any]]:
    """What each reverted operation costs: its time in float, next to its INT8 twins' (the same operation
    in other layers, e.g. layers.3.mlp.fc2 for layers.1.mlp.fc2), from OpenVINO's per-node profile.
    OpenVINO fuses an operation with its bias and renames it (.../aten::linear/MatMul becomes
    .../aten::linear/Add), so operations are matched by the module path before the last "/"."""
    compiled = ov.Core().compile_model(model, "CPU", {**ov_config("CPU", None, None), "PERF_COUNT": True})
    request = compiled.create_infer_request()
    inputs = next(iter(dataset.get_inference_data()))
    times: dict[str, list[float]] = {}
    int8: set[str] = set()
    for _ in range(PROFILE_RUNS):
        request.infer(inputs)
        for p in request.get_profiling_info():
            if p.node_type in COMPUTE_NODES:
                key = p.node_name.rpartition("/")[0]
                times.setdefault(key, []).append(p.real_time.total_seconds() * 1e6)
                if "i8" in p.exec_type.lower():
                    int8.add(key)
    us = {key: statistics.median(t) for key, t in times.items()}
    out = []
    for name in reverted:
        key = name.rpartition("/")[0]
        entry: dict[str, Any] = {"operation": name, "float_us": None, "int8_twin_us": None}
        if key in us:
            entry["float_us"] = round(us[key], 1)
            twins = [t for k, t in us.items() if k in int8 and _shape_of_name(k) == _shape_of_name(key)]
            if twins:
                entry["int8_twin_us"] = round(statistics.median(twins), 1)
        out.append(entry)
    return out


def _shape_of_name(name: str) -> str:
    return "".join("#" if c.isdigit() else c for c in name)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
