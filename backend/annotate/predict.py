"""Label Studio tasks + the config's asks -> batched BLIP calls -> one prediction entry per task.

Every entry is either `{"result": [...], "score", "model_version"}` or, for a task that could not be
predicted, `[]`: Label Studio stores nothing for `[]` and tries the task again on the next retrieval,
whereas `{"result": []}` would be stored and block retries (see DESIGN.md). The reason is logged with
the task id.

A `/predict` call is cut into chunks of CHUNK tasks (bounded memory); in each chunk every image is
fetched once and encoded once by each vision encoder it needs (a paired caption model has its own),
all captions with the same prompt are one call, all generated answers are one call and choices are
ranked in one call per (question, candidates).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import is_cloud_storage_uri

from backend.annotate.images import ImageError, ImageLoader
from backend.annotate.labeling import Ask, Plan
from backend.runtime.blip import Blip

log = logging.getLogger(__name__)

CHUNK = 32  # tasks whose images are held and encoded together
FETCH_THREADS = 4  # parallel downloads; they wait on the network, not the CPU

# Label Studio's key for a file imported before the config named its field; it renames it on import,
# but tasks created by older versions or other tools may still carry it
UNDEFINED = "$undefined$"

Entry = dict[str, Any] | list  # a task's prediction, or [] when it failed


@dataclass
class Outcome:
    """What one /predict produced, for the metrics."""

    entries: list[Entry]
    predicted: int = 0
    failed: int = 0


@dataclass
class _Work:
    """One chunk's tasks on their way through the model."""

    tasks: Sequence[dict[str, Any]]
    failed: dict[int, str] = field(default_factory=dict)  # task index -> why
    image_of: dict[tuple[int, str], int] = field(default_factory=dict)  # (task, image field) -> image
    images: list = field(default_factory=list)

    def single(self, i: int) -> _Work:
        """Task i alone, with the images already loaded."""
        return _Work(
            [self.tasks[i]],
            {0: self.failed[i]} if i in self.failed else {},
            {(0, f): k for (j, f), k in self.image_of.items() if j == i},
            self.images,
        )


class Predictor:
    """Turns tasks into predictions with one Blip; `lock` serialises inference within the process."""

    def __init__(self, blip: Blip, chunk: int = CHUNK) -> None:
        self.blip = blip
        self.chunk = max(1, chunk)
        self.model_version = blip.model_version
        # one inference at a time: OpenVINO already uses every core for one call, and THREADS>1
        # gunicorn threads running models side by side would only oversubscribe them
        self.lock = threading.Lock()

    def predict(self, tasks: Sequence[dict[str, Any]], plan: Plan, loader: ImageLoader) -> Outcome:
        if not plan.asks:
            # one line per request, not per task
            log.warning("%d task(s) get no prediction: %s", len(tasks), plan.why_nothing())
            return Outcome([[] for _ in tasks], failed=len(tasks))
        entries: list[Entry] = []
        for start in range(0, len(tasks), self.chunk):
            entries.extend(self._chunk(tasks[start : start + self.chunk], plan, loader))
        predicted = sum(1 for e in entries if e != [])
        return Outcome(entries, predicted=predicted, failed=len(entries) - predicted)

    # -- one chunk -------------------------------------------------------------------------------

    def _chunk(self, tasks: Sequence[dict[str, Any]], plan: Plan, loader: ImageLoader) -> list[Entry]:
        work = _Work(tasks)
        self._load_images(work, plan, loader)
        return self._finish(work, plan)

    def _finish(self, work: _Work, plan: Plan) -> list[Entry]:
        tasks = work.tasks
        try:
            results = self._infer(work, plan)
        except Exception:
            if len(tasks) == 1:
                log.exception("task %s: inference failed", _task_id(tasks[0]))
                return [[]]
            # isolate whatever broke the batch: the other tasks still get their predictions
            log.exception("inference failed for a batch of %d tasks; retrying them one by one", len(tasks))
            return [entry for i in range(len(tasks)) for entry in self._finish(work.single(i), plan)]
        entries: list[Entry] = []
        for i, task in enumerate(tasks):
            if i in work.failed:
                log.warning("task %s: no prediction: %s", _task_id(task), work.failed[i])
                entries.append([])
                continue
            result = results.get(i, [])
            if not result:
                log.warning(
                    "task %s: no prediction: no control had anything to predict (its data lacks the "
                    "questions, or the model generated empty text)",
                    _task_id(task),
                )
                entries.append([])
                continue
            score = float(np.mean([r["score"] for r in result]))
            entries.append({"result": result, "score": round(score, 4), "model_version": self.model_version})
        return entries

    def _load_images(self, work: _Work, plan: Plan, loader: ImageLoader) -> None:
        fields = sorted({ask.image_field for ask in plan.asks})
        wanted: dict[tuple[str, Any], list[tuple[int, str]]] = defaultdict(list)
        for i, task in enumerate(work.tasks):
            data = task.get("data") if isinstance(task, dict) else None
            if not isinstance(data, dict):
                work.failed[i] = "the task has no data"
                continue
            for f in fields:
                if f not in data and not (len(fields) == 1 and UNDEFINED in data):
                    work.failed[i] = f"its data has no {f!r} field (the config's Image reads ${f})"
                    break
            else:
                for f in fields:
                    url = data.get(f, data.get(UNDEFINED))
                    # one download per distinct URL; cloud URIs are presigned per task, so keyed by it
                    owner = _task_id(task) if is_cloud_storage_uri(url) else None
                    wanted[(url if isinstance(url, str) else repr(url), owner)].append((i, f))
        if not wanted:
            return
        keys = list(wanted)

        def fetch(key: tuple[str, Any]) -> Any:
            i, f = wanted[key][0]
            task = work.tasks[i]
            try:
                return loader.load(task["data"].get(f, task["data"].get(UNDEFINED)), task_id=_task_id(task))
            except ImageError as e:
                return e
            except Exception as e:  # never let one image take the batch down
                log.exception("task %s: unexpected error loading its image", _task_id(task))
                return ImageError(f"{type(e).__name__}: {e}")

        with ThreadPoolExecutor(min(FETCH_THREADS, len(keys))) as pool:
            loaded = list(pool.map(fetch, keys))
        for key, image in zip(keys, loaded):
            if isinstance(image, ImageError):
                for i, f in wanted[key]:
                    work.failed.setdefault(i, f"image ${f}: {image}")
                continue
            work.images.append(image)
            for i, f in wanted[key]:
                work.image_of[(i, f)] = len(work.images) - 1

    def _infer(self, work: _Work, plan: Plan) -> dict[int, list[dict[str, Any]]]:
        blip = self.blip
        live = [i for i in range(len(work.tasks)) if i not in work.failed]
        # each grouping maps an image to the (task, ask) pairs that want the same output for it, so an
        # image shared by several tasks is captioned/asked once
        captions: dict[str | None, dict[int, list]] = defaultdict(lambda: defaultdict(list))  # by prompt
        answers: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))  # image -> question
        ranks: dict[tuple[str, tuple[str, ...]], dict[int, list]] = defaultdict(lambda: defaultdict(list))
        for i in live:
            task = work.tasks[i]
            for ask in plan.asks:
                image = work.image_of[(i, ask.image_field)]
                if ask.kind == "caption":
                    captions[ask.prompt][image].append((i, ask))
                    continue
                question = ask.question_for(task["data"])
                if question is None:
                    continue  # e.g. the VQA template's q3 when this task has two questions
                if blip.text_codec.too_long(question):
                    log.warning(
                        "task %s: %s's question is longer than the model's %d tokens; "
                        "its end is cut off: %.80r...",
                        _task_id(task),
                        ask.from_name,
                        blip.text_codec.max_length,
                        question,
                    )
                if ask.kind == "answer":
                    answers[image][question].append((i, ask))
                else:
                    ranks[(question, ask.candidates)][image].append((i, ask))

        results: dict[int, list[tuple[int, dict[str, Any]]]] = defaultdict(list)  # task -> (ask no., result)
        order = {ask: n for n, ask in enumerate(plan.asks)}
        # which images each vision encoder must see: captions may come from a paired caption model
        needs: dict[int, tuple[Blip, set[int]]] = {}
        for model, groups in ((blip.captioner, captions.values()), (blip, (answers, *ranks.values()))):
            images = {img for group in groups for img in group}
            if images:
                needs.setdefault(id(model), (model, set()))[1].update(images)
        if not needs:
            return {}
        with self.lock:
            encoded = {}  # each image through each needed vision encoder once
            for key, (model, images) in needs.items():
                used = sorted(images)
                row = {img: r for r, img in enumerate(used)}
                encoded[key] = (model.encode([work.images[k] for k in used]), row)

            def embeds(model: Blip, images: Sequence[int]) -> np.ndarray:
                array, row = encoded[id(model)]
                return array[[row[img] for img in images]]

            captioner = blip.captioner
            for prompt, by_image in captions.items():
                got = captioner.caption(embeds(captioner, list(by_image)), prompt)
                for pairs, gen in zip(by_image.values(), got):
                    for i, ask in pairs:
                        if gen.text:
                            results[i].append((order[ask], _textarea(ask, gen.text, gen.score)))
            if answers:
                images = list(answers)
                questions = [list(answers[img]) for img in images]
                got = blip.answer(embeds(blip, images), questions)
                for img, qs, gens in zip(images, questions, got):
                    for q, gen in zip(qs, gens):
                        for i, ask in answers[img][q]:
                            if gen.text:
                                results[i].append((order[ask], _textarea(ask, gen.text, gen.score)))
            for (question, candidates), by_image in ranks.items():
                got = blip.rank(embeds(blip, list(by_image)), question, candidates)
                for pairs, ranked in zip(by_image.values(), got):
                    for i, ask in pairs:
                        results[i].append((order[ask], _choices(ask, ranked.scores)))
        return {i: [r for _, r in sorted(rs, key=lambda x: x[0])] for i, rs in results.items()}


def _textarea(ask: Ask, text: str, score: float) -> dict[str, Any]:
    return {
        "from_name": ask.from_name,
        "to_name": ask.to_name,
        "type": "textarea",
        "value": {"text": [text]},
        "score": round(float(score), 4),
    }


def _choices(ask: Ask, scores: dict[str, float]) -> dict[str, Any]:
    shares = [scores[c] for c in ask.candidates]
    best = int(np.argmax(shares))
    picked = [best]
    if ask.multiple:
        picked = [j for j, s in enumerate(shares) if s >= ask.threshold or j == best]
    return {
        "from_name": ask.from_name,
        "to_name": ask.to_name,
        "type": "choices",
        "value": {"choices": [ask.labels[j] for j in picked]},
        # the probability that the answer is among the picked choices
        "score": round(min(1.0, float(sum(shares[j] for j in picked))), 4),
    }


def _task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, dict) else None
