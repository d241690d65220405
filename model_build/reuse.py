"""`blip-build --skip-if-built`: recognise a model directory that already holds the requested build.

Every completed build records in manifest.json, under "build", what it was built from: the source as
named and its resolved revision (the hub commit, or a hash of a local checkpoint folder's files), the
INT8 settings and calibration source, and the tool versions. The record is written last, so an
interrupted build never passes for a complete one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

from backend.runtime.manifest import FORMAT, MANIFEST, ModelDirError, load_manifest

TOOLS = ("blip-openvino-labeler", "openvino", "nncf", "torch", "transformers")


def folder_digest(folder: Path, contents: bool = True, suffixes: set[str] | None = None) -> str:
    """sha256 over a folder's files (relative path, and content or only size); hidden entries skipped."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        if suffixes is not None and path.suffix.lower() not in suffixes:
            continue
        digest.update(f"{rel.as_posix()}\0{path.stat().st_size}\0".encode())
        if contents:
            with path.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _file_digest(path: str | None) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else path


def resolve_revision(source: str, revision: str | None) -> str | None:
    """What `source` at `revision` is now: "sha256:..." of a local folder's files or a hub commit.

    None when that cannot be told (the hub unreachable and nothing cached, a missing folder).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            return "sha256:" + folder_digest(path)
        except OSError:
            return None  # unreadable files: the build reports them
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        return None  # a path that is not a folder: the build reports it
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache

        try:
            return HfApi().model_info(source, revision=revision, timeout=20).sha
        except Exception:  # unreachable hub, offline mode: what a previous download cached
            cached = try_to_load_from_cache(source, "config.json", revision=revision)
            return Path(cached).parent.name if isinstance(cached, str) else None
    except ImportError:
        return None


def requested(args: argparse.Namespace, source: str, quant: dict[str, Any]) -> dict[str, Any]:
    """The build `args` ask for, as recorded in the manifest (`source`: the checkpoint folder or hub id)."""
    from model_build.tiny_blip import bundled

    int8 = None
    if not args.no_int8:
        if args.project is not None:
            calibration = {"project": args.project, "label_studio_url": args.label_studio_url}
        elif args.calibration_export:
            calibration = {
                "export": _file_digest(args.calibration_export),
                "label_config": _file_digest(args.label_config),
                "label_studio_url": args.label_studio_url,
            }
        elif args.calibration_images:
            folder = Path(args.calibration_images)
            from model_build.calibration import IMAGE_SUFFIXES

            calibration = {
                "images": str(folder),
                # names and sizes: adding, removing or replacing images is noticed without reading them
                "listing": folder_digest(folder, contents=False, suffixes=IMAGE_SUFFIXES)
                if folder.is_dir()
                else None,
                "questions": _file_digest(args.calibration_questions),
            }
        else:
            calibration = {"synthetic": True}
        calibration["seed"] = args.seed
        int8 = {**quant, "min_agreement": args.min_agreement, "calibration": calibration}
    return {
        "format": FORMAT,
        "source": args.source,
        "revision": args.revision,
        "resolved": resolve_revision(source, args.revision),
        "int8": int8,
        "caption_model": None
        if args.caption_model is None
        else {
            "source": args.caption_model,
            "revision": args.caption_revision,
            "resolved": resolve_revision(bundled(args.caption_model), args.caption_revision),
        },
        "tools": {p: version(p) for p in TOOLS},
    }


def recorded(out: str | Path) -> tuple[dict[str, Any] | None, str]:
    """(the manifest of a complete, intact model directory, "") or (None, why it is not one)."""
    try:
        manifest = load_manifest(out, verify_hashes=True).data
    except ModelDirError as e:
        return None, str(e)
    if not isinstance(manifest.get("build"), dict):
        return None, f"{out} holds no record of a completed build"
    return manifest, ""


def builds(out: str | Path, manifest: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, manifest) of the build in `out` and of its paired caption model, if any."""
    found = [(Path(out), manifest)]
    if manifest.get("caption_model"):
        sub = Path(out) / manifest["caption_model"]["path"]
        found.append((sub, json.loads((sub / MANIFEST).read_text())))
    return found


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between a recorded build and the requested one; [] means up to date.

    Revisions are compared resolved (so `main` and the commit it points at are the same build); when
    the requested one cannot be resolved now (hub unreachable), as requested.
    """
    skip = {"resolved"} if wanted.get("resolved") is None else {"revision"}
    diffs = []
    for key in sorted((stored.keys() | wanted.keys()) - skip):
        old, new = stored.get(key), wanted.get(key)
        if key == "caption_model" and isinstance(old, dict) and isinstance(new, dict):
            diffs += [f"caption model {d}" for d in differences(old, new)]  # its revision alike
        elif old != new:
            diffs.append(f"{key}: {_short(old)} -> {_short(new)}")
    return diffs


def record(out: str | Path, wanted: dict[str, Any]) -> None:
    """Mark the build in `out` as complete and made from `wanted`."""
    path = Path(out) / MANIFEST
    manifest = json.loads(path.read_text())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**manifest, "build": wanted}, indent=2) + "\n")
    tmp.replace(path)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."
