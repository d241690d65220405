"""`blip-build SOURCE -o MODEL_DIR`: export a BLIP checkpoint to OpenVINO, FP16 and NNCF INT8."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from backend.runtime.manifest import ModelDirError

if TYPE_CHECKING:
    from model_build.quantize import QuantSettings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blip-build",
        description="Convert a BLIP checkpoint (Hugging Face hub id or local folder) into an OpenVINO model "
        "directory for the backend: FP16, plus INT8 calibrated on your own images.",
    )
    p.add_argument(
        "source",
        help="hub id (e.g. Salesforce/blip-vqa-base) or checkpoint folder; 'tiny' or 'tiny-wide' for the "
        "bundled test models",
    )
    p.add_argument("-o", "--output", required=True, help="model directory to write")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--force", action="store_true", help="replace an existing build in the output folder")
    p.add_argument(
        "--skip-if-built",
        action="store_true",
        help="do nothing when the output folder already holds a complete build of the same source, "
        "revision and settings (with --force, replace any other build)",
    )
    p.add_argument("--no-int8", action="store_true", help="FP16 only")
    p.add_argument(
        "--caption-model",
        metavar="SOURCE",
        help="a captioning checkpoint (e.g. Salesforce/blip-image-captioning-base) built alike into "
        "OUTPUT/caption: captions come from it, answers and choices from SOURCE",
    )
    p.add_argument("--caption-revision", help="hub revision of --caption-model")

    cal = p.add_argument_group("INT8 calibration data (default: built-in synthetic shapes, test model only)")
    cal.add_argument(
        "--calibration-images", metavar="DIR", help="a folder of your images (searched recursively)"
    )
    cal.add_argument(
        "--calibration-questions",
        metavar="FILE",
        help='questions: plain lines asked of every image, or JSONL {"image": path, "questions": [...]}',
    )
    cal.add_argument("--calibration-export", metavar="JSON", help="a Label Studio JSON export of your tasks")
    cal.add_argument(
        "--label-config", metavar="XML", help="the project's labeling config, for --calibration-export"
    )
    cal.add_argument("--project", type=int, help="a live Label Studio project id (with the URL and API key)")
    cal.add_argument(
        "--label-studio-url",
        default=os.environ.get("LABEL_STUDIO_URL"),
        help="Label Studio URL, for --project or /data/upload URLs in an export [$LABEL_STUDIO_URL]",
    )
    cal.add_argument(
        "--label-studio-api-key",
        default=os.environ.get("LABEL_STUDIO_API_KEY"),
        help="legacy token or personal access token [$LABEL_STUDIO_API_KEY]",
    )
    cal.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    q = p.add_argument_group("INT8 settings")
    q.add_argument("--subset-size", type=int, default=300, help="calibration samples (default 300)")
    q.add_argument(
        "--smooth-quant-alpha",
        type=float,
        default=0.95,
        help="SmoothQuant alpha for MatMuls; negative disables",
    )
    q.add_argument("--ignore", action="append", default=[], metavar="REGEX", help="keep matching nodes in FP")
    q.add_argument(
        "--weights",
        default="auto",
        choices=["auto", "int8_asym", "int8_sym", "int4_asym", "int4_sym"],  # quantize.WEIGHT_MODES
        help="weight compression of the decoder (default auto: under accuracy control the "
        "decoder in INT4 if the pipeline holds the aim, else half INT4, else INT8, else FP16; INT8 "
        "without it)",
    )
    q.add_argument("--group-size", type=int, help="INT4 group size (default 128)")
    q.add_argument(
        "--ratio", type=float, help="INT4: share of the decoder's layers in INT4, the rest INT8 (default 1.0)"
    )
    q.add_argument(
        "--target-agreement",
        type=float,
        default=0.99,
        help="accuracy control: INT8 must answer and caption like FP16 this often (the weaker of answer and "
        "caption-token agreement), with operations put back in float until it does; below it on the held-out "
        "slice, FP16 is served (default 0.99)",
    )
    q.add_argument(
        "--no-accuracy-control",
        action="store_true",
        help="quantize every part plainly (faster build); the held-out gate still decides what is served",
    )
    q.add_argument(
        "--statistics-precision",
        choices=["f32", "bf16"],
        help="what NNCF runs the model in to collect its statistics (default bf16 on CPUs with bf16 "
        "instructions, 1.5x faster; f32 elsewhere)",
    )
    q.add_argument(
        "--min-agreement",
        type=float,
        help="serve INT8 from this agreement on instead of the target, and fail (exit 3) below it",
    )
    return p


def calibration_source(args: argparse.Namespace) -> Callable[[int], object]:
    """The calibration data the flags ask for, as a function of the number of samples wanted."""
    from model_build import calibration

    seed = args.seed
    chosen = [
        f for f in ("calibration_images", "calibration_export", "project") if getattr(args, f) is not None
    ]
    if len(chosen) > 1:
        parser().error(
            "give one calibration source: " + ", ".join("--" + c.replace("_", "-") for c in chosen)
        )
    if args.calibration_images:
        return lambda n: calibration.from_folder(args.calibration_images, n, seed, args.calibration_questions)
    if args.calibration_export:
        config = Path(args.label_config).read_text() if args.label_config else None
        url, key = args.label_studio_url, args.label_studio_api_key
        return lambda n: calibration.from_label_studio_export(
            args.calibration_export, n, seed, config, url, key
        )
    if args.project is not None:
        if not (args.label_studio_url and args.label_studio_api_key):
            parser().error(
                "--project needs --label-studio-url and --label-studio-api-key (or their env variables)"
            )
        url, key = args.label_studio_url, args.label_studio_api_key
        return lambda n: calibration.from_label_studio_project(url, key, args.project, n, seed)
    return lambda n: calibration.synthetic(n, seed)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # imported late so that --help answers without loading torch
    from model_build import calibration, reuse
    from model_build.export import QualityGateError, build
    from model_build.source import BuildError
    from model_build.tiny_blip import bundled

    source = bundled(args.source)
    caption_source = bundled(args.caption_model) if args.caption_model else None
    try:
        data = calibration_source(args)
    except OSError as e:
        parser().error(f"cannot read {e.filename}: {e.strerror}")
    try:
        quant = quant_settings(args)
    except ValueError as e:
        parser().error(str(e))
    wanted = reuse.requested(args, source, quant.describe())
    if args.skip_if_built:
        manifest, why = reuse.recorded(args.output)
        diffs = reuse.differences(manifest["build"], wanted) if manifest else [why]
        if not diffs:
            print(f"model directory {args.output} is up to date ({_describe(wanted)}): nothing to do")
            missed = False
            for where, built in reuse.builds(args.output, manifest):
                gate = (built.get("int8") or {}).get("gate")
                if gate and not gate["passed"]:
                    missed = True
                    print(
                        f"blip-build: INT8 agreed with FP16 on {gate['value']:.1%} of held-out asks, below "
                        f"{gate['by']} {gate['threshold']:.1%}; {where} serves FP16",
                        file=sys.stderr,
                    )
            return 3 if missed and args.min_agreement is not None else 0
        if Path(args.output).exists():
            print(f"blip-build: (re)building {args.output}: {'; '.join(diffs)}", file=sys.stderr)
    # a hub revision is built at the commit it resolved to, the one recorded
    revision = pinned(wanted["resolved"], args.revision)
    caption = wanted["caption_model"] or {}
    try:
        build(
            source,
            args.output,
            revision=revision,
            force=args.force,
            int8=not args.no_int8,
            calibration=data,
            quant=quant,
            min_agreement=args.min_agreement,
            caption_model=caption_source,
            caption_revision=pinned(caption.get("resolved"), args.caption_revision),
        )
    except QualityGateError as e:
        reuse.record(args.output, wanted)  # complete, with INT8 marked not to be served
        print(f"blip-build: {e}", file=sys.stderr)
        return 3
    except (BuildError, ModelDirError, calibration.CalibrationError) as e:
        print(f"blip-build: error: {e}", file=sys.stderr)
        return 2
    reuse.record(args.output, wanted)
    return 0


def quant_settings(args: argparse.Namespace) -> QuantSettings:
    from model_build.quantize import QuantSettings

    precision = {"statistics_precision": args.statistics_precision} if args.statistics_precision else {}
    return QuantSettings(
        **precision,
        subset_size=args.subset_size,
        smooth_quant_alpha=args.smooth_quant_alpha,
        ignored_scope=tuple(args.ignore),
        weights=args.weights,
        group_size=args.group_size,
        ratio=args.ratio,
        target_agreement=args.target_agreement,
        accuracy_control=not args.no_accuracy_control,
    )


def pinned(resolved: str | None, asked: str | None) -> str | None:
    """The hub commit a requested revision resolved to (local folders resolve to a hash: as asked)."""
    return resolved if resolved and not resolved.startswith("sha256:") else asked


def _describe(wanted: dict) -> str:
    revision = wanted["resolved"] or wanted["revision"] or "default revision"
    return f"{wanted['source']} @ {revision[:19]}, " + ("FP16 + INT8" if wanted["int8"] else "FP16 only")


if __name__ == "__main__":
    sys.exit(main())
