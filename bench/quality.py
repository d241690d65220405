"""INT8 quality on the bundled test models: plain NNCF against accuracy control, next to PyTorch and FP16.

    python bench/quality.py [--models tiny tiny-wide tiny-outliers] [--scenes 500] [--build-args "..."]

(`make quality` runs it with the defaults; `--build-args` adds blip-build flags to every INT8 build.)

For each model, three builds from the documented command (`blip-build MODEL -o DIR`, 300 calibration
samples): FP16 (every build has it), INT8 with `--no-accuracy-control` (plain NNCF, as before accuracy
control existed) and the default INT8 (accuracy control at 0.99). Each answers every question of held-out
scenes the build never saw and captions them; PyTorch (transformers `generate`, batch 1) is the reference.
`tiny-outliers` is the bundled checkpoint with outliers added (model_build/tiny_blip/outliers.py): the
same function in float, hostile to INT8. Results go to bench/quality.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from backend.runtime.blip import Blip  # noqa: E402
from model_build.__main__ import main as blip_build  # noqa: E402
from model_build.tiny_blip import bundled  # noqa: E402
from model_build.tiny_blip.evaluate import answer, caption  # noqa: E402
from model_build.tiny_blip.outliers import add_outliers  # noqa: E402
from model_build.tiny_blip.synthetic import HELD_OUT_SEED, make_scenes  # noqa: E402

BUILDS = {"INT8, plain NNCF": ["--no-accuracy-control"], "INT8, accuracy control": []}


def pytorch_outputs(checkpoint: str, scenes: list) -> tuple[list[str], list[str]]:
    from transformers import AutoProcessor, BlipForQuestionAnswering

    model = BlipForQuestionAnswering.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    with torch.no_grad():
        answers = [answer(model, processor, s.image, qa.question) for s in scenes for qa in s.qa]
        captions = [caption(model, processor, s.image) for s in scenes]
    return answers, captions


def outputs(blip: Blip, scenes: list) -> tuple[list[str], list[str]]:
    images = [s.image for s in scenes]
    answers = blip.answer(images, [[qa.question for qa in s.qa] for s in scenes])
    return [a.text for row in answers for a in row], [c.text for c in blip.caption(images)]


def share(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def measure(checkpoint: str, work: Path, scenes: list, build_args: list[str]) -> dict:
    truth = [qa.answer for s in scenes for qa in s.qa]
    ref_answers, ref_captions = pytorch_outputs(checkpoint, scenes)
    rows: dict[str, dict] = {"PyTorch": {"accuracy": share(ref_answers, truth)}}

    def row(blip: Blip) -> dict:
        answers, captions = outputs(blip, scenes)
        return {
            "answers_equal": share(ref_answers, answers),
            "accuracy": share(answers, truth),
            "captions_equal": share(ref_captions, captions),
        }

    for name, flags in BUILDS.items():
        out = work / ("plain" if flags else "controlled")
        t0 = time.perf_counter()
        assert blip_build([checkpoint, "-o", str(out), "--force", *flags, *build_args]) == 0
        seconds = time.perf_counter() - t0
        if "FP16" not in rows:  # the same FP16 parts in every build
            rows["FP16"] = row(Blip(out, precision="fp16"))
        report = json.loads((out / "report.json").read_text())
        control = report["accuracy_control"] or {"stages": []}
        rows[name] = {
            **row(Blip(out, precision="int8")),
            "build_s": seconds,
            "served": report["gate"]["passed"],
            "reverted": [
                f"{s['part']}: " + ("the whole part" if s["kept_fp16"] else f"{len(s['reverted'])} op(s)")
                for s in control["stages"]
                if s["kept_fp16"] or s["reverted"]
            ],
            # what the weight-only parts shipped in: `auto` chooses among INT4, INT8 and FP16
            "weights": {s["part"]: s["weights"] for s in control["stages"] if s.get("weights")},
        }
    return {"questions": len(truth), "scenes": len(scenes), "rows": rows}


def table(results: dict) -> str:
    lines = [
        "| model | build | answers equal to PyTorch | exact-match accuracy | captions equal to PyTorch "
        "| served | put back in float | decoder weights | build s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, r in results["models"].items():
        for name, row in r["rows"].items():
            cells = [
                model,
                name,
                f"{row['answers_equal']:.1%}" if "answers_equal" in row else "(reference)",
                f"{row['accuracy']:.1%}",
                f"{row['captions_equal']:.1%}" if "captions_equal" in row else "(reference)",
                ("yes" if row["served"] else "NO: FP16 is") if "served" in row else "",
                ", ".join(row.get("reverted", [])) or ("nothing" if "served" in row else ""),
                row.get("weights", {}).get("decoder", ""),
                f"{row['build_s']:.0f}" if row.get("build_s") else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "tiny-wide", "tiny-outliers"])
    p.add_argument("--scenes", type=int, default=500, help="held-out scenes (about 5 questions each)")
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "quality")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "quality.json")
    p.add_argument("--build-args", default="", help="more blip-build flags for every INT8 build, one string")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    scenes = make_scenes(args.scenes, HELD_OUT_SEED)
    results = {"scenes": args.scenes, "build_args": args.build_args, "models": {}}
    for model in args.models:
        work = args.work / model
        outliers = model == "tiny-outliers"
        checkpoint = str(add_outliers(work / "checkpoint")) if outliers else bundled(model)
        results["models"][model] = measure(checkpoint, work, scenes, args.build_args.split())
        print(table({"models": {model: results["models"][model]}}), file=sys.stderr)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
