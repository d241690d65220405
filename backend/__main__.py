"""`blip-backend ask`: caption images and answer questions from the command line.
`blip-backend serve`: run the Label Studio ML backend under gunicorn.
`blip-backend prelabel`: predict a whole Label Studio project through its API (resumable; Ray optional)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    serve.add_argument("--port", type=int, default=_env_int("PORT", 9090), help="[$PORT or 9090]")
    serve.add_argument(
        "--workers",
        type=int,
        default=_env_int("WORKERS", 1),
        help="processes, each with its own model copy [$WORKERS or 1]",
    )
    serve.add_argument(
        "--threads",
        type=int,
        default=_env_int("THREADS", 4),
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


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


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
        "--threads",
        str(args.threads),
        # predictions of a large batch legitimately take minutes; Label Studio has its own timeout
        "--timeout",
        "0",
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
    args = parser().parse_args(argv)
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
