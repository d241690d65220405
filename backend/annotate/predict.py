"""Label Studio tasks + the config's asks -> batched BLIP calls -> one prediction entry per task.

Every entry is either `{"result": [...], "score", "model_version"}` or, for a task that could not be
predicted, `[]`: Label Studio stores nothing for `[]` and tries the task again on the next retrieval,
whereas `{"result": []}` would be stored and block retries (see DESIGN.md). The reason is logged with
the task id.

A `/predict` call is cut into chunks of CHUNK tasks (bounded memory); in each chunk every image is
fetched once and encoded once by each vision encoder it needs (a paired caption model has its own),
all captions with the same prompt are one call, all generated answers are one call and choices are
ranked in one call per (question, candidates); a request about one image decodes its caption and
answers together.

With an EmbeddingCache (backend/annotate/cache.py), an image whose embeddings are kept is neither
downloaded again (when its URL provably still holds the same file) nor encoded again: a follow-up
question typed while labeling (`interactive()`, backend/annotate/interactive.py) costs only the question
and its answer.
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
from PIL import Image

from backend.annotate import interactive
from backend.annotate.cache import EmbeddingCache
from backend.annotate.images import ImageError, ImageLoader, Source
from backend.annotate.labeling import Ask, Plan
from backend.runtime.blip import Blip, Generated
from backend.runtime.preprocess import resized

log = logging.getLogger(__name__)

# tasks whose images are held and encoded together: a 64-task request peaked at 1133 MiB in chunks of 32,
# 1017 in chunks of 16 (full-size INT8, bench/load.py), as fast (captions go 8, answers 16 at a time)
CHUNK = 16
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
class _Image:
    """One distinct image of a chunk: decoded and resized to each vision encoder's input size (`sized`,
    by Blip.encoder_key), or only known by its digest when the cache holds what every vision encoder
    needs of it (`kept`, by Blip.encoder_key)."""

    sized: dict[str, Image.Image] = field(default_factory=dict)  # empty when not downloaded again
    digest: str | None = None  # None without a cache
    kept: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Work:
    """One chunk's tasks on their way through the model."""

    tasks: Sequence[dict[str, Any]]
    failed: dict[int, str] = field(default_factory=dict)  # task index -> why
    image_of: dict[tuple[int, str], int] = field(default_factory=dict)  # (task, image field) -> image
    images: list[_Image] = field(default_factory=list)

    def single(self, i: int) -> _Work:
        """Task i alone, with the images already loaded."""
        return _Work(
            [self.tasks[i]],
            {0: self.failed[i]} if i in self.failed else {},
            {(0, f): k for (j, f), k in self.image_of.items() if j == i},
            self.images,
        )


class Predictor:
    """Turns tasks into predictions with one Blip; `lock` serialises inference within the process.
    `cache` (off by default) keeps what the vision encoders made of recent images."""

    def __init__(self, blip: Blip, chunk: int = CHUNK, cache: EmbeddingCache | None = None) -> None:
        self.blip = blip
        self.chunk = max(1, chunk)
        self.model_version = blip.model_version
        self.cache = cache if cache is not None else EmbeddingCache(0)
        self.asked = interactive.Asked()
        # one inference at a time: OpenVINO already uses every core for one call, and THREADS>1
        # gunicorn threads running models side by side would only oversubscribe them
        self.lock = threading.Lock()
        self.counts = {"images_encoded": 0, "images_fetched": 0, "images_kept": 0}
        self._count_lock = threading.Lock()

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.counts[name] += n

    def predict(self, tasks: Sequence[dict[str, Any]], plan: Plan, loader: ImageLoader) -> Outcome:
        if not plan.asks:
            # one line per request, not per task
            log.warning("%d task(s) get no prediction: %s", len(tasks), plan.why_nothing())
            return Outcome([[] for _ in tasks], failed=len(tasks))
        if all(a.question_box is not None for a in plan.asks):
            log.info(
                "%d task(s) get no prediction: this labeling config's controls only answer questions typed "
                "while labeling (question boxes %s)",
                len(tasks),
                ", ".join(plan.boxes),
            )
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

    def _load_images(
        self,
        work: _Work,
        plan: Plan,
        loader: ImageLoader,
        needs: dict[str, tuple[Blip, ...]] | None = None,
    ) -> None:
        """Each distinct image of the chunk, fetched once, or not at all when the cache holds the
        embeddings `needs` lists for its image field (default: every vision encoder the plan's asks of
        that field use) and its URL still holds the same file."""
        if needs is None:
            needs = self._needs(plan.asks)
        fields = sorted(needs)
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
            url = task["data"].get(f, task["data"].get(UNDEFINED))
            models = {m.encoder_key: m for _, g in wanted[key] for m in needs[g]}
            try:
                return self._fetch(loader, url, _task_id(task), models)
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

    def _needs(self, asks: Sequence[Ask]) -> dict[str, tuple[Blip, ...]]:
        """Image field -> the Blips whose vision encoder its asks use."""
        needs: dict[str, dict[str, Blip]] = defaultdict(dict)
        for ask in asks:
            model = self.blip.captioner if ask.kind == "caption" else self.blip
            needs[ask.image_field][model.encoder_key] = model
        return {f: tuple(m.values()) for f, m in needs.items()}

    def _fetch(self, loader: ImageLoader, url: Any, task_id: Any, models: dict[str, Blip]) -> _Image:
        cache = self.cache
        if not cache.enabled:
            image = loader.load(url, task_id=task_id)
            self._count("images_fetched")
            return _Image(_sized(image, models))
        key = loader.key(url)
        known: Source | None = cache.source(key)
        kept: dict[str, np.ndarray] = {}
        if known is not None:
            for name in models:
                array = cache.get(name, known.digest)
                if array is None:
                    break
                kept[name] = array
            else:  # every embedding is kept: is the file behind the URL still that one?
                fetched = loader.fetch(url, task_id, known)
                if fetched.data is None:
                    self._count("images_kept")
                    return _Image({}, known.digest, kept)
                return self._fetched(loader, key, fetched.data, fetched.source, models)
        fetched = loader.fetch(url, task_id)
        assert fetched.data is not None
        return self._fetched(loader, key, fetched.data, fetched.source, models)

    def _fetched(
        self, loader: ImageLoader, key: Any, data: bytes, source: Source, models: dict[str, Blip]
    ) -> _Image:
        self._count("images_fetched")
        image = loader.decode(data)  # an undecodable file is not remembered
        self.cache.remember(key, source)
        kept = {}
        for name in models:  # the same bytes under another URL, or a server that ignored If-None-Match
            array = self.cache.get(name, source.digest)
            if array is not None:
                kept[name] = array
        return _Image(_sized(image, models), source.digest, kept)

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
            encoded = {key: self._encode(work, model, images) for key, (model, images) in needs.items()}

            def embeds(model: Blip, images: Sequence[int]) -> np.ndarray:
                return _rows(encoded[id(model)], images)

            captioner = blip.captioner
            images = list(answers)
            questions = [list(answers[img]) for img in images]
            captioned: dict[str | None, list[Generated]] = {}
            answered: list[list[Generated]] = []
            if captioner is blip and list(captions) == [None] and list(captions[None]) == images:
                # the same images captioned and asked: Blip decodes one image's caption and answers together
                captioned[None], answered = blip.caption_and_answer(embeds(blip, images), questions)
            else:
                for prompt, by_image in captions.items():
                    captioned[prompt] = captioner.caption(embeds(captioner, list(by_image)), prompt)
                if answers:
                    answered = blip.answer(embeds(blip, images), questions)
            for prompt, by_image in captions.items():
                for pairs, gen in zip(by_image.values(), captioned[prompt]):
                    for i, ask in pairs:
                        if gen.text:
                            results[i].append((order[ask], _textarea(ask, gen.text, gen.score)))
            if answers:
                for img, qs, gens in zip(images, questions, answered):
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

    def _encode(self, work: _Work, model: Blip, images: set[int]) -> dict[int, tuple[np.ndarray, int]]:
        """Image -> (an array of embeddings, its row) through `model`'s vision encoder: each image once,
        or not at all when the cache keeps its embeddings (the new ones are kept)."""
        name = model.encoder_key
        out: dict[int, tuple[np.ndarray, int]] = {}
        todo = []
        for img in sorted(images):
            entry = work.images[img]
            array = entry.kept.get(name)
            if array is None and entry.digest is not None:
                array = self.cache.get(name, entry.digest)
            if array is not None:
                out[img] = (array, 0)
            else:
                todo.append(img)
        if todo:
            array = model.encode([work.images[k].sized[name] for k in todo])
            self._count("images_encoded", len(todo))
            for r, img in enumerate(todo):
                out[img] = (array, r)
                digest = work.images[img].digest
                if digest is not None and self.cache.enabled:
                    # a copy: a view would keep the whole batch's array alive
                    own = array[r : r + 1] if len(todo) == 1 else array[r : r + 1].copy()
                    self.cache.put(name, digest, own)
                    work.images[img].kept[name] = own
        return out

    # -- interactive -----------------------------------------------------------------------------

    def interactive(
        self, tasks: Sequence[dict[str, Any]], plan: Plan, context: dict[str, Any], loader: ImageLoader
    ) -> Outcome:
        """One reply per task to an interactive request (backend/annotate/interactive.py): the question
        boxes' results unchanged and BLIP's answers, continued captions and ranked choices, with scores
        and origin "prediction". Anything wrong gives the task an empty reply and a log line."""
        entries: list[Entry] = []
        for task in tasks:
            try:
                entry = self._interactive(task, plan, context, loader)
            except Exception:
                log.exception("task %s: interactive request failed", _task_id(task))
                entry = None
            entries.append(entry or self.empty_reply())
        predicted = sum(1 for e in entries if e["result"])
        return Outcome(entries, predicted=predicted, failed=len(entries) - predicted)

    def empty_reply(self) -> dict[str, Any]:
        """An interactive reply with nothing in it (nothing is stored for interactive requests)."""
        return {"result": [], "score": 0.0, "model_version": self.model_version}

    def _interactive(
        self, task: dict[str, Any], plan: Plan, context: dict[str, Any], loader: ImageLoader
    ) -> dict[str, Any] | None:
        task_id = _task_id(task)
        request = interactive.read(context, plan, task_id, self.asked)
        for note in request.notes:
            log.info("task %s: interactive: %s", task_id, note)
        if request.questions and "answer" not in self.blip.tasks:
            log.warning("task %s: interactive: this model only captions; questions are not answered", task_id)
            request.questions.clear()
        if request.empty:
            log.info("task %s: interactive request: nothing to ask BLIP", task_id)
            return None
        needs: dict[str, dict[str, Blip]] = defaultdict(dict)
        for q in request.questions:
            needs[q.image_field][self.blip.encoder_key] = self.blip
        for c in request.captions:
            needs[c.ask.image_field][self.blip.captioner.encoder_key] = self.blip.captioner
        work = _Work([task])
        self._load_images(work, plan, loader, {f: tuple(m.values()) for f, m in needs.items()})
        if 0 in work.failed:
            log.warning("task %s: interactive: no answer: %s", task_id, work.failed[0])
            return None
        results: list[dict[str, Any]] = []
        with self.lock:
            for q in request.questions:
                img = work.image_of[(0, q.image_field)]
                embeds = _rows(self._encode(work, self.blip, {img}), [img])
                texts = [i for i in q.into if i.ask.type == "textarea"]
                gen = self.blip.answer(embeds, [[q.text]])[0][0] if texts else None
                if gen is not None and not gen.text:
                    log.info("task %s: interactive: BLIP has no answer to %r", task_id, q.text)
                elif gen is not None:
                    for i in texts:
                        kept = list(i.keep or ())
                        results.append(_textarea(i.ask, gen.text, gen.score, kept, origin=True))
                for i in q.into:
                    if i.ask.type == "choices":
                        ranked = self.blip.rank(embeds, q.text, i.ask.candidates)[0]
                        results.append({**_choices(i.ask, ranked.scores), "origin": "prediction"})
            captioner = self.blip.captioner
            for c in request.captions:
                img = work.image_of[(0, c.ask.image_field)]
                embeds = _rows(self._encode(work, captioner, {img}), [img])
                gen = captioner.caption(embeds, c.prompt)[0]
                results.append(_textarea(c.ask, gen.text, gen.score, list(c.keep), origin=True))
        for box, question in request.asked:
            self.asked.remember(task_id, box, question)
        if not results:
            return None
        score = float(np.mean([r["score"] for r in results]))
        return {
            "result": [*request.echo, *results],
            "score": round(score, 4),
            "model_version": self.model_version,
        }


def _sized(image: Image.Image, models: dict[str, Blip]) -> dict[str, Image.Image]:
    """The decoded image at the input size of each vision encoder in `models`, resized now: a chunk holds
    up to CHUNK images until they are encoded, and a 12 MP photo takes 36 MB decoded, 0.4 MB at 384 x 384
    (Blip.encode resizes them the same way: the pixel values are the same)."""
    by_size: dict[tuple[int, int, int], Image.Image] = {}
    out = {}
    for name, model in models.items():
        s = model.image_settings
        key = (s["width"], s["height"], s["resample"])
        if key not in by_size:
            by_size[key] = resized(image, s)
        out[name] = by_size[key]
    return out


def _rows(encoded: dict[int, tuple[np.ndarray, int]], images: Sequence[int]) -> np.ndarray:
    """The embeddings of `images`, in that order, as one array."""
    arrays = {id(encoded[img][0]) for img in images}
    if len(arrays) == 1:  # one batch (as without a cache): one fancy-indexing copy
        array = encoded[images[0]][0]
        return array[[encoded[img][1] for img in images]]
    return np.concatenate([encoded[img][0][encoded[img][1] : encoded[img][1] + 1] for img in images])


def _textarea(
    ask: Ask, text: str, score: float, keep: list[str] | None = None, origin: bool = False
) -> dict[str, Any]:
    result = {
        "from_name": ask.from_name,
        "to_name": ask.to_name,
        "type": "textarea",
        "value": {"text": [*(keep or []), text]},
        "score": round(float(score), 4),
    }
    if origin:  # interactive replies: what BLIP wrote, so the next request leaves it alone
        result["origin"] = "prediction"
    return result


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
