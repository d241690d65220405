"""Calibration data for INT8: the user's own images (and questions), sampled deterministically.

NNCF needs no labels, only inputs that look like what the model will see when it pre-labels: a
few hundred of the project's own images, with the project's own questions. Sources:

- a folder of images, optionally with a questions file: plain lines (each asked of every image)
  or JSONL lines `{"image": "relative/path.jpg", "questions": ["...", ...]}`;
- a Label Studio JSON export, or a live Label Studio project: each task's image, and the questions
  its labeling config asks of it (fixed `question="..."` attributes and questions in task data);
- the built-in synthetic scenes, which only make sense for the bundled test model (with a warning).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Used when a source has images but no questions: the text encoder still needs realistic inputs.
GENERIC_QUESTIONS = (
    "what is in the picture?",
    "how many people are there?",
    "what color is it?",
    "is there a dog?",
    "where is this?",
)


@dataclass
class Sample:
    image: Image.Image
    questions: list[str]
    origin: str


@dataclass
class Calibration:
    samples: list[Sample]
    skipped: dict[str, str] = field(default_factory=dict)  # origin -> why it could not be used
    source: str = ""
    warning: str | None = None


class CalibrationError(Exception):
    """The calibration source is unusable (missing, empty, every image broken)."""


def sample_paths(paths: list[str], n: int, seed: int) -> list[str]:
    """A deterministic sample of n items (all of them, shuffled, if there are fewer)."""
    paths = sorted(paths)
    random.Random(seed).shuffle(paths)
    return paths[:n]


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def from_folder(
    folder: str | Path, n: int, seed: int = 0, questions_file: str | Path | None = None
) -> Calibration:
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: no such folder of calibration images")
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise CalibrationError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    per_image, everywhere = _read_questions(questions_file) if questions_file else ({}, [])
    # the whole shuffled list, so that broken images are replaced by the next ones
    order = sample_paths([p.relative_to(folder).as_posix() for p in files], len(files), seed)
    return _load(((folder / rel, per_image.get(rel, everywhere)) for rel in order), f"folder {folder}", n)


def from_label_studio_export(
    path: str | Path,
    n: int,
    seed: int = 0,
    label_config: str | None = None,
    url: str | None = None,
    api_key: str | None = None,
) -> Calibration:
    """Tasks of a Label Studio JSON export; image URLs are fetched like the backend fetches them."""
    path = Path(path)
    try:
        tasks = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CalibrationError(f"{path}: not a readable Label Studio JSON export: {e}") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "data" in t for t in tasks):
        raise CalibrationError(f"{path}: expected a JSON list of tasks with a 'data' field (Export > JSON)")
    return _from_tasks(tasks, f"Label Studio export {path}", n, seed, label_config, url, api_key, path.parent)


def from_label_studio_project(url: str, api_key: str, project: int, n: int, seed: int = 0) -> Calibration:
    """Tasks and labeling config of a live project, through label-studio-sdk."""
    from label_studio_sdk.client import LabelStudio

    client = LabelStudio(base_url=url, api_key=api_key)
    try:
        config = client.projects.get(id=project).label_config
        tasks = [{"id": t.id, "data": t.data} for t in client.tasks.list(project=project, fields="all")]
    except Exception as e:  # the SDK raises its own ApiError, httpx errors, ...
        raise CalibrationError(f"cannot read project {project} from {url}: {type(e).__name__}: {e}") from None
    return _from_tasks(tasks, f"Label Studio project {project} at {url}", n, seed, config, url, api_key, None)


def _from_tasks(
    tasks: list[dict],
    source: str,
    n: int,
    seed: int,
    label_config: str | None,
    url: str | None,
    api_key: str | None,
    base: Path | None,
) -> Calibration:
    from backend.annotate.images import ImageError, ImageLoader
    from backend.annotate.labeling import ConfigError, plan

    try:
        asks = plan(label_config).asks if label_config else ()
    except ConfigError as e:
        raise CalibrationError(f"{source}: {e}") from None
    try:
        loader = ImageLoader(url, api_key)  # the backend's fetch policy: ALLOWED_IMAGE_HOSTS, ...
    except ValueError as e:  # a malformed ALLOWED_IMAGE_HOSTS
        raise CalibrationError(str(e)) from None
    order = list(range(len(tasks)))
    random.Random(seed).shuffle(order)
    calibration = Calibration([], source=source)
    for i in order:
        if len(calibration.samples) == n:
            break
        task = tasks[i]
        data = task["data"]
        field_name = asks[0].image_field if asks else _image_field(data)
        origin = f"task {task.get('id', i)}"
        value = data.get(field_name) if field_name else None
        try:
            local = _local_file(base, value)
            image = open_rgb(local) if local else loader.load(value, task.get("id"))
        except (ImageError, OSError, Image.DecompressionBombError, ValueError) as e:
            calibration.skipped[origin] = f"{type(e).__name__}: {e}"
            continue
        questions = [q for a in asks if a.kind != "caption" and (q := a.question_for(data))]
        calibration.samples.append(Sample(image, questions, origin))
    if not calibration.samples:
        raise CalibrationError(f"{source}: none of the {len(calibration.skipped)} tasks had a readable image")
    return calibration


def _local_file(base: Path | None, value: object) -> Path | None:
    """An export's image given as a path relative to the export file, if it is one: inside the export's
    folder once symlinks and ".." are resolved, as the backend's fetch policy keeps Local Storage files
    under LOCAL_FILES_DOCUMENT_ROOT (an export holds what anyone who can import tasks wrote). Anything
    else goes to the ImageLoader, which reads no bare paths."""
    if base is None or not isinstance(value, str) or "://" in value or value.startswith(("data:", "/data/")):
        return None
    root = base.resolve()
    path = (root / value).resolve()
    return path if path.is_relative_to(root) and path.is_file() else None


def _image_field(data: dict) -> str | None:
    """Without a labeling config: the first data field that looks like an image."""
    for key, value in data.items():
        if isinstance(value, str) and (
            value.startswith(("data:image/", "/data/upload/", "/data/local-files/", "s3://", "gs://"))
            or Path(value.split("?")[0]).suffix.lower() in IMAGE_SUFFIXES
        ):
            return key
    return None


def synthetic(n: int, seed: int = 0) -> Calibration:
    from model_build.tiny_blip.synthetic import make_scenes

    scenes = make_scenes(n, seed + 1000)  # away from the tiny model's training and held-out seeds
    samples = [Sample(s.image, [qa.question for qa in s.qa], f"synthetic:{i}") for i, s in enumerate(scenes)]
    return Calibration(
        samples,
        source="built-in synthetic shapes",
        warning="calibrating on synthetic shapes: fine for the bundled test model, poor for real "
        "checkpoints. Calibrate on a few hundred of your own images (--calibration-images DIR) "
        "for an INT8 build that answers like FP16 on your data.",
    )


def _read_questions(path: str | Path) -> tuple[dict[str, list[str]], list[str]]:
    """JSONL image -> questions, or plain lines asked of every image."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read the questions file: {e.strerror}") from None
    if lines and lines[0].startswith("{"):
        per_image: dict[str, list[str]] = {}
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                qs = row.get("questions") or [row["question"]]
                per_image[Path(row["image"]).as_posix()] = [str(q) for q in qs]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CalibrationError(
                    f'{path}:{i}: expected {{"image": "...", "questions": ["...", ...]}}'
                ) from None
        return per_image, []
    return {}, lines


def _load(items: Iterable[tuple[Path, list[str]]], source: str, n: int) -> Calibration:
    calibration = Calibration([], source=source)
    for path, questions in items:
        if len(calibration.samples) == n:
            break
        try:
            image = open_rgb(path)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
            calibration.skipped[str(path)] = f"{type(e).__name__}: {e}"
            continue
        calibration.samples.append(Sample(image, list(questions), str(path)))
    if not calibration.samples:
        raise CalibrationError(f"{source}: none of the {len(calibration.skipped)} images could be read")
    return calibration


def with_questions(calibration: Calibration) -> Calibration:
    """Give every sample at least one question (generic ones, if the source had none)."""
    if any(s.questions for s in calibration.samples):
        asked = [q for s in calibration.samples for q in s.questions]
    else:
        asked = list(GENERIC_QUESTIONS)
        print(
            "calibration: no questions given; using generic ones. Pass your project's questions "
            "(--calibration-questions) for a better text-encoder calibration.",
            file=sys.stderr,
        )
    rng = random.Random(0)
    for s in calibration.samples:
        if not s.questions:
            s.questions = [rng.choice(asked)]
    return calibration
