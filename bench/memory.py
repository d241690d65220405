"""Where a serving worker's memory goes: RSS and peak after each step of a worker's life.

    .venv/bin/python bench/memory.py .cache/bench/model            # a model directory (INT8 if served)
    .venv/bin/python bench/memory.py DIR --tasks 16 --requests 4 --env MALLOC_ARENA_MAX=2

Runs the backend's Flask app in a fresh process (what a gunicorn worker runs, without gunicorn) and
reports, step by step: the imports, each compiled part, the warm-up (Blip.warm_up: every part runs once,
then the weight files' pages go back), then /predict requests of --tasks new images
(caption + 3 questions each, bench/run.py's config). For every step: RSS after it, its peak (VmHWM,
reset before the step through /proc/self/clear_refs), and how much of the RSS is anonymous memory
(OpenVINO's weights and buffers, numpy, Python) and how much is mapped files (libraries, IR weights).
`--env NAME=VALUE` sets the environment of the measured process (allocator settings, the backend's own
variables), so settings can be compared side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon and RssFile of this process, MiB."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0): each step's peak is its own
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(
    model_dir: str, n_tasks: int, n_requests: int, precision: str | None, photo_size: tuple[int, int] | None
) -> list[dict]:
    """Runs in the measured process; returns one row per step."""
    steps: list[dict] = []

    def step(name: str) -> None:
        steps.append({"step": name, **status()})
        reset_peak()

    reset_peak()
    step("python")
    import numpy  # noqa: F401
    import openvino

    step("import numpy, openvino")
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from backend.server.app import Settings, create_app

    step("import the backend (flask, label-studio-sdk, ...)")

    compile_model = openvino.Core.compile_model

    def compile_and_report(core, xml, *args, **kwargs):  # one step per compiled part
        compiled = compile_model(core, xml, *args, **kwargs)
        step(f"compile {Path(str(xml)).stem}")
        return compiled

    from backend.runtime.blip import Blip

    warm_up = Blip.warm_up

    def warm_up_and_report(blip: Blip) -> int:
        released = warm_up(blip)
        step(f"warmed up (weight files given back: {released >> 20} MiB)")
        return released

    openvino.Core.compile_model, Blip.warm_up = compile_and_report, warm_up_and_report
    settings = Settings.from_env()
    settings.model_dir, settings.precision = model_dir, precision
    app = create_app(settings=settings)
    openvino.Core.compile_model, Blip.warm_up = compile_model, warm_up
    blip = app.config["predictor"].blip
    step("app ready")

    from workload import TASK_CONFIG, data_uri, photo, random_image

    side = blip.image_settings["height"]
    client = app.test_client()

    def image(seed: int) -> str:
        if photo_size:
            return data_uri(photo(*photo_size, seed), "JPEG")
        return data_uri(random_image(side, seed))

    for k in range(n_requests):
        images = [image(1000 + k * n_tasks + i) for i in range(n_tasks)]
        body = {
            "tasks": [{"id": i, "data": {"image": image}} for i, image in enumerate(images)],
            "label_config": TASK_CONFIG,
            "project": "1.0",
        }
        step(f"request body {k + 1} built")
        r = client.post("/predict", json=body)
        assert r.status_code == 200 and all(len(x["result"]) == 4 for x in r.json["results"]), r.json
        step(f"/predict {k + 1}: {n_tasks} tasks")
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--tasks", type=int, default=16, help="tasks per /predict")
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--precision", help="int8 or fp16 (default: what the build serves)")
    p.add_argument("--photo", metavar="WxH", help="JPEG photos of this size as images (4032x3024)")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the measured process")
    p.add_argument("--out", type=Path, help="write the rows as JSON")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.inner:
        size = tuple(int(x) for x in args.photo.split("x")) if args.photo else None
        rows = measure(args.model_dir, args.tasks, args.requests, args.precision, size)
        print(json.dumps(rows))
        return 0

    env = dict(os.environ)
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    cmd = [sys.executable, __file__, args.model_dir, "--inner", "--tasks", str(args.tasks)]
    cmd += ["--requests", str(args.requests)] + (["--precision", args.precision] if args.precision else [])
    cmd += ["--photo", args.photo] if args.photo else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.stderr.write(out.stderr)
        return out.returncode
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    images = f"{args.photo} JPEG photos" if args.photo else "images of the model's size"
    print(f"{args.model_dir}  {' '.join(args.env) or '(default environment)'}  {args.tasks} tasks, {images}")
    print(f"{'step':<52} {'RSS':>7} {'peak':>7} {'anon':>7} {'files':>7}   MiB")
    previous = 0.0
    for row in rows:
        delta = row["VmRSS"] - previous
        previous = row["VmRSS"]
        print(
            f"{row['step']:<52} {row['VmRSS']:7.0f} {row['VmHWM']:7.0f} {row['RssAnon']:7.0f} "
            f"{row['RssFile']:7.0f}   {delta:+.0f}"
        )
    print(f"peak over the run: {max(r['VmHWM'] for r in rows):.0f} MiB")
    if args.out:
        args.out.write_text(json.dumps({"env": args.env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
