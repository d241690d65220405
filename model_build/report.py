"""FP16 vs INT8, side by side: file sizes, latency on the same device and threads, agreement."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from backend.runtime.blip import Blip
from model_build.calibration import Sample
from model_build.quantize import agreement, exact_match


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
    """How often INT8 says what FP16 says on images calibration did not see."""
    images = [s.image for s in held_out]
    e16, e8 = fp16.encode(images), int8.encode(images)
    c16, c8 = fp16.caption(e16), int8.caption(e8)
    result: dict[str, Any] = {
        "images": len(images),
        "caption_token_agreement": agreement([c.tokens for c in c16], [c.tokens for c in c8]),
        "caption_exact_match": exact_match([c.text for c in c16], [c.text for c in c8]),
    }
    if "answer" in fp16.tasks:
        questions = [s.questions for s in held_out]
        a16 = [a.text for row in fp16.answer(e16, questions) for a in row]
        a8 = [a.text for row in int8.answer(e8, questions) for a in row]
        result.update({"questions": len(a16), "answer_agreement": exact_match(a16, a8)})
    return result


def gate_value(agreements: dict[str, Any]) -> float:
    """The number --min-agreement is compared with: the weaker of answer and caption-token agreement."""
    keys = [k for k in ("answer_agreement", "caption_token_agreement") if k in agreements]
    return min(agreements[k] for k in keys)


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
    agr = report["agreement"]
    lines.append("")
    held = f"{agr['images']} held-out images"
    if "answer_agreement" in agr:
        held += f", {agr['questions']} questions"
        lines.append(f"answers identical to FP16:       {agr['answer_agreement']:.1%}")
    lines.append(f"caption tokens identical:        {agr['caption_token_agreement']:.1%}")
    lines.append(f"captions identical:              {agr['caption_exact_match']:.1%}   ({held})")
    gate = report["gate"]
    verdict = "INT8 will be served" if gate["passed"] else "INT8 NOT served (FP16 will be)"
    lines.append(
        f"gate: agreement {gate['value']:.1%} vs --min-agreement {gate['min_agreement']:.1%}: {verdict}"
    )
    return "\n".join(lines)
