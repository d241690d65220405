"""Predict a whole Label Studio project (or a saved view, or filtered tasks) through its API, resumably.

`blip-backend prelabel`'s arguments and exit codes; the run itself is backend/prelabel/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from backend.annotate.fetch import ENV as ALLOWED_IMAGE_HOSTS
from backend.annotate.fetch import FetchPolicy
from backend.prelabel.job import Job, PrelabelError, RayOptions
from backend.runtime.manifest import ModelDirError, load_manifest


def resolve_precision(model_dir: str | Path, precision: str | None) -> str:
    """What `serve` serves without PRECISION: INT8 if built and its agreement gate passed, else FP16."""
    return precision or load_manifest(model_dir, verify_hashes=False).served_precision


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--view", type=int, help="only the tasks of this saved Data Manager view (tab) id")
    scope.add_argument(
        "--filter",
        help="only tasks matching these Data Manager filters (JSON), e.g. "
        '\'{"conjunction": "and", "items": [{"filter": "filter:tasks:total_annotations", '
        '"operator": "equal", "type": "Number", "value": 0}]}\'',
    )
    p.add_argument("--model-dir", default=env("MODEL_DIR"), help="model directory [$MODEL_DIR]")
    p.add_argument("--precision", default=env("PRECISION"), help="fp16 or int8 [$PRECISION, else as `serve`]")
    p.add_argument("--device", default=env("DEVICE", "CPU"), help="OpenVINO device [$DEVICE or CPU]")
    p.add_argument(
        "--url",
        default=env("LABEL_STUDIO_URL") or env("LABEL_STUDIO_HOST"),
        help="Label Studio URL [$LABEL_STUDIO_URL]",
    )
    p.add_argument(
        "--api-key",
        default=env("LABEL_STUDIO_API_KEY") or env("LABEL_STUDIO_ACCESS_TOKEN"),
        help="legacy token or personal access token [$LABEL_STUDIO_API_KEY]",
    )
    p.add_argument("--batch", type=int, default=16, help="tasks predicted together (default 16)")
    p.add_argument("--writers", type=int, default=4, help="parallel POSTs per worker (default 4)")
    p.add_argument("--retries", type=int, default=8, help="attempts per request after the first (default 8)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in s, doubled each time (1)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per Label Studio request (60)")
    p.add_argument(
        "--progress-every", type=float, default=10.0, help="s between progress lines off a TTY (10)"
    )
    p.add_argument("--report", type=Path, help="write the counts and all failed tasks here (JSON)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every task failure as it happens")
    ray = p.add_argument_group("Ray (pip install 'blip-openvino-labeler[ray]')")
    ray.add_argument(
        "--ray-address",
        default=None,
        help="fan out over this Ray cluster (host:port of the head, ray://..., or 'auto' for the local one)",
    )
    ray.add_argument("--ray-actors", type=int, help="model copies (default: one per node)")
    ray.add_argument("--ray-cpus-per-actor", type=int, help="CPUs per actor (default: the smallest node's)")


def main(args: argparse.Namespace) -> int:
    # imported here, not at the top: building the command line's parser stays fast
    from backend.prelabel.api import describe
    from backend.prelabel.run import EXIT_USAGE, Scope, run, summary

    def fail(message: str) -> int:
        print(f"blip-backend prelabel: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    if not args.model_dir:
        return fail("no model directory: pass --model-dir or set MODEL_DIR")
    if not args.url:
        return fail("no Label Studio URL: pass --url or set LABEL_STUDIO_URL")
    if not args.api_key:
        return fail("no API key: pass --api-key or set LABEL_STUDIO_API_KEY")
    if args.batch < 1 or args.writers < 1 or args.retries < 0:
        return fail("--batch and --writers must be at least 1, --retries at least 0")
    try:
        # checked here, once; every worker (Ray actors included) applies the driver's value
        allowed = os.environ.get(ALLOWED_IMAGE_HOSTS, "")
        FetchPolicy.parse(allowed)
    except ValueError as e:
        return fail(str(e))
    model_dir = str(Path(args.model_dir).resolve())  # Ray workers run elsewhere
    try:
        precision = resolve_precision(model_dir, args.precision)
    except ModelDirError as e:
        return fail(str(e))
    job = Job(
        url=args.url.rstrip("/"),
        api_key=args.api_key,
        project=args.project,
        label_config="",
        model_dir=model_dir,
        precision=precision,
        device=args.device,
        threads=int(os.environ["INFERENCE_THREADS"]) if os.environ.get("INFERENCE_THREADS") else None,
        inference_precision=os.environ.get("INFERENCE_PRECISION") or None,
        allowed_image_hosts=allowed,
        batch=args.batch,
        writers=args.writers,
        retries=args.retries,
        backoff=args.backoff,
        timeout=args.timeout,
        verbose=args.verbose,
    )
    ray = None
    if args.ray_address:
        ray = RayOptions(args.ray_address, args.ray_actors, args.ray_cpus_per_actor)
    try:
        report = run(job, Scope(args.view, args.filter), ray, progress_every=args.progress_every)
    except (PrelabelError, ModelDirError) as e:
        return fail(str(e))
    except Exception as e:
        from label_studio_sdk.core.api_error import ApiError

        if isinstance(e, ApiError):  # not transient: 401, 403, 404 ...
            return fail(f"Label Studio at {job.url}: {describe(e)}")
        raise
    print(summary(report))
    if args.report:
        data = asdict(report)
        data["failed"] = {str(k): v for k, v in report.failed.items()}
        args.report.write_text(json.dumps(data, indent=2) + "\n")
    return report.exit_code
