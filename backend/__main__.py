"""`blip-backend ask`: caption images and answer questions from the command line.
`blip-backend serve`: run the Label Studio ML backend under gunicorn.
`blip-backend prelabel`: predict a whole Label Studio project through its API (resumable; Ray optional)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from backend.runtime.env import positive_int
from backend.runtime.manifest import ModelDirError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip-backend", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="caption images and answer questions about them")
    ask.add_argument("images", nargs="+", type=Path, help="image files")
    ask.add_argument("-q", "--question", action="append", default=[], help="a question (repeatable)")
    ask.add_argument(
        "-c",
        "--choices",
        help="comma-separated candidate answers: pick one per question instead of generating",
    )
    ask.add_argument("--prompt", help="caption prefix to continue, e.g. 'a picture of'")
    ask.add_argument("--no-caption", action="store_true", help="only answer the questions")
    ask.add_argument("--beams", type=int, help="beam search width (default: the model's)")
    ask.add_argument("--model-dir", default=os.environ.get("MODEL_DIR"), help="model directory [$MODEL_DIR]")
    ask.add_argument(
        "--device", default=os.environ.get("DEVICE", "CPU"), help="OpenVINO device [$DEVICE or CPU]"
    )
    serve = sub.add_parser(
        "serve",
        help="serve the Label Studio ML backend with gunicorn",
        description="Runs gunicorn on backend.server.wsgi:app. The model directory comes from $MODEL_DIR; "
        "see README.md for LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY, BASIC_AUTH_USER/PASS, DEVICE, LOG_LEVEL.",
    )
    serve.add_argument(
        "--host", default=os.environ.get("HOST", "0.0.0.0"), help="bind address [$HOST or 0.0.0.0]"
    )
    serve.add_argument("--port", type=int, default=positive_int("PORT") or 9090, help="[$PORT or 9090]")
    serve.add_argument(
        "--workers",
        type=int,
        default=positive_int("WORKERS") or 1,
        help="processes, each with its own model copy [$WORKERS or 1]",
    )
    serve.add_argument(
        "--threads",
        type=int,
        default=positive_int("THREADS") or 4,
        help="request threads per worker; inference is serialised [$THREADS or 4]",
    )
    serve.add_argument(
        "--model-dir", default=os.environ.get("MODEL_DIR"), help="model directory [$MODEL_DIR]"
    )
    from backend.prelabel import cli as prelabel

    prelabel.add_arguments(
        sub.add_parser(
            "prelabel",
            help="predict a whole Label Studio project (or view) through its API, resumably",
            description=prelabel.__doc__.split("\n\n")[0],
        )
    )
    return p


# gunicorn settings; bench/load.py and tests/test_load.py measure them under load and SIGTERM.
#
# --timeout is not a request timeout with threaded workers: the worker's main thread reports to the
# master every second while request threads run, however long a /predict takes (a 600-task request
# under a 1 s --timeout completes, tests/test_load.py), and the reports start once the worker has booted
# (gunicorn 27: a 5 s boot under a 1 s --timeout is not killed), so loading a large model is not
# limited either. It restarts a worker whose main loop has stalled this long (a deadlock, a C call
# holding the GIL): such a worker answers nothing, /health included. /predict itself is not cut short:
# Label Studio stops waiting after its own ML_TIMEOUT_PREDICT and retries unpredicted tasks at the next
# retrieval, while killing the worker would lose every other request in flight and cost a model load.
WATCHDOG_S = 60
# On SIGTERM (docker stop, systemd, Ctrl-C is SIGINT: immediate) the worker stops accepting, new
# connections are refused (backend/server/worker.py), and requests in flight get this long to finish.
# Label Studio waits at most ML_TIMEOUT_PREDICT (100 s by default) for a /predict: any request it still
# waits for at the signal either ends within 100 s or is abandoned by Label Studio by then (its tasks
# stay unpredicted and are retried at the next retrieval), so nothing is lost that it would not retry.
# (A container runtime's own stop timeout must be at least this long, or it kills the process first.)
GRACEFUL_S = 100
# No --max-requests: restarting a worker reloads the model (seconds to minutes, during which that
# worker answers nothing) and bench/load.py measures no growth of the worker's memory from one round of
# requests to the next that a restart would undo.


def gunicorn_argv(args: argparse.Namespace) -> list[str]:
    host = f"[{args.host}]" if ":" in args.host else args.host
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"{host}:{args.port}",
        "--workers",
        str(args.workers),
        # gthread with a lane of its own for /health, /setup, /metrics and /webhook, so they are answered
        # while every request thread waits on a /predict
        "--worker-class",
        "backend.server.worker.Worker",
        "--threads",
        str(args.threads),
        "--timeout",
        str(WATCHDOG_S),
        "--graceful-timeout",
        str(GRACEFUL_S),
        "--log-level",
        os.environ.get("LOG_LEVEL", "info").lower(),
        # no --preload: OpenVINO's thread pools don't survive fork, each worker loads the model itself
        *_no_control_socket(),
        "backend.server.wsgi:app",
    ]


def _no_control_socket() -> list[str]:
    # gunicorn >= 25 opens a control socket at a fixed path under $HOME: two backends on one host
    # would fight over it, and a read-only home breaks start-up; we don't use it
    from gunicorn import config

    return ["--no-control-socket"] if hasattr(config, "ControlSocketDisable") else []


def serve(args: argparse.Namespace) -> int:
    if not args.model_dir:
        print("blip-backend: error: no model directory: pass --model-dir or set MODEL_DIR", file=sys.stderr)
        return 2
    from backend.runtime.manifest import load_manifest

    try:
        load_manifest(args.model_dir, verify_hashes=False)  # fail here, not in every worker
    except ModelDirError as e:
        print(f"blip-backend: error: {e}", file=sys.stderr)
        return 2
    os.environ["MODEL_DIR"] = str(Path(args.model_dir).resolve())
    argv = gunicorn_argv(args)
    os.execv(argv[0], argv)
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    try:
        p = parser()
    except ValueError as e:  # PORT, WORKERS or THREADS set to something else than a number
        print(f"blip-backend: error: {e}", file=sys.stderr)
        return 2
    args = p.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "prelabel":
        from backend.prelabel import cli as prelabel

        return prelabel.main(args)
    if not args.model_dir:
        print(
            "blip-backend: error: no model directory: pass --model-dir or set MODEL_DIR "
            "(`blip-build tiny -o models/tiny` builds the bundled test model)",
            file=sys.stderr,
        )
        return 2
    from PIL import Image

    from backend.runtime.blip import Blip

    try:
        blip = Blip(args.model_dir, device=args.device)
    except ModelDirError as e:
        print(f"blip-backend: error: {e}", file=sys.stderr)
        return 2
    images = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        except OSError as e:
            print(f"blip-backend: error: {path}: {e}", file=sys.stderr)
            return 2
    overrides = {"num_beams": args.beams} if args.beams else {}
    embeds = blip.encode(images)
    captions = None
    if not args.no_caption:  # a paired caption model has its own vision encoder
        captioner = blip.captioner
        seen = embeds if captioner is blip else captioner.encode(images)
        captions = captioner.caption(seen, args.prompt, **overrides)
    if args.choices:
        choices = [c.strip() for c in args.choices.split(",") if c.strip()]
        ranked = [blip.rank(embeds, q, choices) for q in args.question]
        answers = [[r[i] for r in ranked] for i in range(len(images))] if ranked else []
    else:
        answers = blip.answer(embeds, [args.question] * len(images), **overrides) if args.question else []
    for i, path in enumerate(args.images):
        print(path)
        if captions:
            print(f"  caption: {captions[i].text}  ({captions[i].score:.2f})")
        for q, a in zip(args.question, answers[i] if answers else []):
            print(f"  {q} -> {a.text}  ({a.score:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
