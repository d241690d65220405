"""`blip-build SOURCE -o MODEL_DIR`: export a BLIP checkpoint to OpenVINO, FP16 and NNCF INT8."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from backend.runtime.manifest import ModelDirError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blip-build",
        description="Convert a BLIP checkpoint (Hugging Face hub id or local folder) into an OpenVINO model "
        "directory for the backend: FP16, plus INT8 calibrated on your own images.",
    )
    p.add_argument(
        "source",
        help="hub id (e.g. Salesforce/blip-vqa-base) or checkpoint folder; 'tiny' for the bundled test model",
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
        default="int8_asym",
        choices=["int8_asym", "int8_sym", "int4_asym", "int4_sym"],
        help="decoder weight compression (default int8_asym)",
    )
    q.add_argument("--group-size", type=int, help="INT4 group size (default 128)")
    q.add_argument(
        "--ratio", type=float, help="INT4: share of decoder layers in INT4, the rest INT8 (default 1.0)"
    )
    q.add_argument(
        "--min-agreement",
        type=float,
        default=0.0,
        help="fail (exit 3) and serve FP16 if INT8 agrees with FP16 on fewer held-out asks than this (0-1)",
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
    from model_build.quantize import QuantSettings
    from model_build.source import BuildError
    from model_build.tiny_blip import CHECKPOINT_DIR

    source = str(CHECKPOINT_DIR) if args.source == "tiny" else args.source
    try:
        data = calibration_source(args)
    except OSError as e:
        parser().error(f"cannot read {e.filename}: {e.strerror}")
    try:
        quant = QuantSettings(
            subset_size=args.subset_size,
            smooth_quant_alpha=args.smooth_quant_alpha,
            ignored_scope=tuple(args.ignore),
            weights=args.weights,
            group_size=args.group_size,
            ratio=args.ratio,
        )
    except ValueError as e:
        parser().error(str(e))
    wanted = reuse.requested(args, source, quant.describe())
    if args.skip_if_built:
        manifest, why = reuse.recorded(args.output)
        diffs = reuse.differences(manifest["build"], wanted) if manifest else [why]
        if not diffs:
            print(f"model directory {args.output} is up to date ({_describe(wanted)}): nothing to do")
            gate = (manifest.get("int8") or {}).get("gate")
            if gate and not gate["passed"]:
                print(
                    f"blip-build: INT8 agreed with FP16 on {gate['value']:.1%} of held-out asks, below "
                    f"--min-agreement {gate['min_agreement']:.1%}; {args.output} serves FP16",
                    file=sys.stderr,
                )
                return 3
            return 0
        if Path(args.output).exists():
            print(f"blip-build: (re)building {args.output}: {'; '.join(diffs)}", file=sys.stderr)
    # a hub revision is built at the commit it resolved to, the one recorded
    resolved = wanted["resolved"]
    revision = resolved if resolved and not resolved.startswith("sha256:") else args.revision
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


def _describe(wanted: dict) -> str:
    revision = wanted["resolved"] or wanted["revision"] or "default revision"
    return f"{wanted['source']} @ {revision[:19]}, " + ("FP16 + INT8" if wanted["int8"] else "FP16 only")


if __name__ == "__main__":
    sys.exit(main())
