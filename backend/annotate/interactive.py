"""Label Studio's interactive requests: what the annotator typed -> what to ask BLIP.

With a model connection's *Interactive preannotations* on and *Auto-Annotation* switched on in the
labeling screen, submitting text in a TextArea (Enter, or Shift+Enter in a multi-line one) makes Label
Studio call /predict with that one task and `params.context = {"result": [...]}`: the current results of
every control on the same object (`toName`) as the TextArea, each with `from_name`, `value` and `origin`
("manual", "prediction", or "prediction-changed" once an annotator edits a predicted text). The reply's
first entry is shown at once: its results replace those controls' values; nothing is stored as a
prediction. (label-studio 1.23.2: DataManager's `regionFinishedDrawing` handler, `mlInteractive` API
call, the annotation store's `setSuggestions`; `POST /api/ml/{id}/interactive-annotating` from the API.)

Conventions (labeling.py reads the attributes):

- A question box: a TextArea that another control names with `question="#box"`. The last text in it is
  the question; the controls naming it get the answer (a TextArea the generated answer, a Choices the
  ranked choice) and the box comes back unchanged. A question this process already answered for the
  same task and box is not asked again when another control of the object is submitted (that would undo
  an annotator's change to a Choices, which Label Studio still marks "prediction"), unless one of its
  receivers on the same object is empty.
- Any TextArea BLIP fills (a caption, or an answer to a question="..." / the stock VQA template's Text):
  typed text ending in "?" is a question about the image; the reply keeps the TextArea's texts and adds
  BLIP's answer after them.
- A caption TextArea: other typed text is the start of a caption; the reply replaces it with the caption
  BLIP continues from it.

Only annotator input counts: a TextArea whose result has `origin` "prediction" holds what BLIP wrote (the
reply marks its own results so) and is left alone. Every problem (a malformed context, an empty or
overlong question, a model that cannot answer) is a log line and an empty reply, never an error.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from backend.annotate.labeling import MAX_QUESTION_CHARS, Ask, Plan

REMEMBERED = 10_000  # (task, question box) pairs whose last answered question is remembered


@dataclass(frozen=True)
class Into:
    """A control an answer goes into; a TextArea keeps `keep` before it (the "?" convention)."""

    ask: Ask
    keep: tuple[str, ...] | None = None  # None: the answer replaces the control's value


@dataclass
class Question:
    text: str
    image_field: str
    into: list[Into]


@dataclass(frozen=True)
class Continuation:
    ask: Ask
    keep: tuple[str, ...]  # earlier texts of the TextArea, kept
    prompt: str


@dataclass
class Request:
    """What one interactive request asks of BLIP for one task."""

    questions: list[Question] = field(default_factory=list)
    captions: list[Continuation] = field(default_factory=list)
    echo: list[dict[str, Any]] = field(
        default_factory=list
    )  # question boxes' results, sent back as they were
    notes: list[str] = field(default_factory=list)  # what was not done, and why (logged)
    asked: list[tuple[str, str]] = field(default_factory=list)  # (box, question), remembered once answered

    @property
    def empty(self) -> bool:
        return not self.questions and not self.captions

    def image_fields(self) -> set[str]:
        return {q.image_field for q in self.questions} | {c.ask.image_field for c in self.captions}


class Asked:
    """The question last answered per (task, question box), bounded: so that submitting another control
    of the same object does not ask it again."""

    def __init__(self, size: int = REMEMBERED) -> None:
        self._last: OrderedDict[tuple[Any, str], str] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def same(self, task: Any, box: str, question: str) -> bool:
        with self._lock:
            return self._last.get((task, box)) == question

    def remember(self, task: Any, box: str, question: str) -> None:
        with self._lock:
            self._last[(task, box)] = question
            self._last.move_to_end((task, box))
            while len(self._last) > self._size:
                self._last.popitem(last=False)


def is_interactive(params: Any) -> bool:
    """Label Studio sends `params.context` null for retrievals and an object for interactive requests."""
    return isinstance(params, dict) and isinstance(params.get("context"), dict)


def read(context: Any, plan: Plan, task_id: Any, asked: Asked) -> Request:
    """The annotator's input in `context` -> what to ask BLIP (or, in `notes`, why nothing)."""
    request = Request()
    items = context.get("result") if isinstance(context, dict) else None
    if not isinstance(items, list):
        request.notes.append(f"the context has no result list ({_short(context)})")
        return request
    current: dict[str, dict[str, Any]] = {}  # from_name -> its result in the context
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("from_name"), str):
            current.setdefault(item["from_name"], item)

    for box in plan.boxes:
        item = current.get(box)
        if item is None:
            continue
        texts = _texts(item)
        if texts is None:
            request.notes.append(f"{box}: its value is not a list of texts ({_short(item.get('value'))})")
            continue
        question = _question(texts[-1] if texts else "", box, request.notes)
        if question is None:
            continue
        receivers = plan.receivers(box)
        to_name = item.get("to_name")
        empty = any(r.from_name not in current for r in receivers if r.to_name == to_name)
        if asked.same(task_id, box, question) and not empty:
            request.notes.append(f"{box}: {question!r} was answered already")
            continue
        request.asked.append((box, question))
        request.echo.append(item)
        for image_field in sorted({r.image_field for r in receivers}):
            into = [Into(r) for r in receivers if r.image_field == image_field]
            request.questions.append(Question(question, image_field, into))

    for name, item in current.items():
        ask = plan.ask(name)
        if ask is None or ask.type != "textarea" or item.get("origin") == "prediction":
            continue  # not ours, a question box (done above), or what BLIP wrote
        texts = _texts(item)
        if not texts:
            if texts is None:
                value = _short(item.get("value"))
                request.notes.append(f"{name}: its value is not a list of texts ({value})")
            continue
        last = texts[-1].strip()
        if last.endswith("?"):
            question = _question(last, name, request.notes)
            if question is not None:
                request.questions.append(Question(question, ask.image_field, [Into(ask, tuple(texts))]))
        elif ask.kind == "caption" and last:
            request.captions.append(Continuation(ask, tuple(texts[:-1]), last))
        # other typed text in an answer TextArea is the annotator's own answer: left alone
    return request


def _texts(item: dict[str, Any]) -> list[str] | None:
    value = item.get("value")
    texts = value.get("text") if isinstance(value, dict) else None
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return None
    return texts


def _question(text: str, where: str, notes: list[str]) -> str | None:
    question = text.strip()
    if not question.rstrip("?").strip():
        notes.append(f"{where}: empty question {text!r}")
        return None
    if len(question) > MAX_QUESTION_CHARS:
        notes.append(f"{where}: a question of {len(question)} characters (at most {MAX_QUESTION_CHARS})")
        return None
    return question


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
