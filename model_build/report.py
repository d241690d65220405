"""FP16 vs INT8, side by side: file sizes, latency on the same device and threads, agreement."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from backend.runtime.blip import Blip
from model_build.agreement import Reference
from model_build.calibration import Sample


def sizes(manifest: dict[str, Any]) -> dict[str, dict[str, float]]:
    out = {}
    for part in manifest["parts"]["fp16"]:
        fp16 = sum(f["bytes"] for f in manifest["parts"]["fp16"][part]["files"])
        int8 = sum(f["bytes"] for f in manifest["parts"]["int8"][part]["files"])
        out[part] = {"fp16_bytes": fp16, "int8_bytes": int8, "ratio": fp16 / int8}
    return out


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first inferences pay for memory allocation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def latency(blips: dict[str, Blip], sample: Sample, repeats: int = 5) -> dict[str, dict[str, float]]:
    """Median ms for one image: caption (vision + decoding) and one answer (vision + encoder + decoding)."""
    out: dict[str, dict[str, float]] = {}
    for precision, blip in blips.items():
        out[precision] = {"caption_ms": median_ms(lambda b=blip: b.caption([sample.image]), repeats)}
        if "answer" in blip.tasks and sample.questions:
            question = [[sample.questions[0]]]
            out[precision]["answer_ms"] = median_ms(
                lambda b=blip, q=question: b.answer([sample.image], q), repeats
            )
    return out


def compare(fp16: Blip, int8: Blip, held_out: list[Sample]) -> dict[str, Any]:
    """How often INT8 says what FP16 says on images neither calibration nor accuracy control saw."""
    return Reference(fp16, held_out).measure(int8).shares


def table(report: dict[str, Any]) -> str:
    lines = [f"{'part':<16}{'FP16 MiB':>10}{'INT8 MiB':>10}{'ratio':>8}"]
    for part, s in report["sizes"].items():
        lines.append(
            f"{part:<16}{s['fp16_bytes'] / 2**20:>10.1f}{s['int8_bytes'] / 2**20:>10.1f}{s['ratio']:>7.2f}x"
        )
    lat = report["latency"]
    lines.append("")
    lines.append(f"{'median, 1 image':<20}{'FP16 ms':>10}{'INT8 ms':>10}{'speed-up':>10}")
    for key, label in (("caption_ms", "caption"), ("answer_ms", "answer (1 question)")):
        if key in lat["fp16"]:
            a, b = lat["fp16"][key], lat["int8"][key]
            lines.append(f"{label:<20}{a:>10.1f}{b:>10.1f}{a / b:>9.2f}x")
    control = report["accuracy_control"]
    lines += ["", *(control_lines(control) if control else ["accuracy control: off"])]
    agr = report["agreement"]
    lines.append("")
    held = f"{agr['images']} held-out images"
    if "answer_agreement" in agr:
        held += f", {agr['questions']} questions"
        lines.append(f"answers identical to FP16:       {agr['answer_agreement']:.1%}")
    lines.append(f"caption tokens identical:        {agr['caption_token_agreement']:.1%}")
    lines.append(f"captions identical:              {agr['caption_exact_match']:.1%}   ({held})")
    gate = report["gate"]
    if gate["passed"]:
        verdict = "INT8 will be served"
    else:
        verdict = "INT8 MISSED IT AND WILL NOT BE SERVED: FP16 WILL BE (PRECISION=int8 forces INT8)"
    lines.append(f"gate: agreement {gate['value']:.2%} vs {gate['by']} {gate['threshold']:.2%}: {verdict}")
    return "\n".join(lines)


def control_lines(control: dict[str, Any]) -> list[str]:
    """Accuracy control, part by part: agreement as quantized and as shipped, what went back to float."""
    lines = [
        f"accuracy control (aim {control['aim']:.1%} on {control['validation_images']} validation images):",
        f"  {'part':<16}{'plain':>8}{'shipped':>9}  put back in float",
    ]
    for stage in control["stages"]:
        if stage["kept_fp16"]:
            what = "the whole part (FP16)"
        elif stage.get("weights"):
            what = f"nothing; weights {stage['weights']}"
        elif stage["reverted"]:
            what = f"{len(stage['reverted'])} operation(s)"
        else:
            what = "nothing"
        plain = "" if stage["plain"] is None else f"{stage['plain']:.1%}"
        final = "" if stage["final"] is None else f"{stage['final']:.1%}"
        lines.append(f"  {stage['part']:<16}{plain:>8}{final:>9}  {what}")
        if stage.get("speed_ms"):
            timed = ", ".join(f"{rung} {ms:.0f} ms" for rung, ms in stage["speed_ms"].items())
            lines.append(f"    10 tokens for 1 + 4 images on this CPU: {timed}")
        for op in stage["reverted"]:
            cost = "  (fused with other operations: no time of its own)"
            if op.get("float_us") is not None:
                cost = f"  {op['float_us']:.0f} us in float"
                if op.get("int8_twin_us") is not None:
                    cost += f" (its INT8 twins: {op['int8_twin_us']:.0f} us)"
            lines.append(f"    {op['operation']}{cost}")
    if not control["reached"]:
        lines.append("  ACCURACY CONTROL DID NOT REACH THE AIM")
    return lines
