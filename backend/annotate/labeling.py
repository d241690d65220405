"""A Label Studio labeling config -> the "asks" BLIP can fill in, one per control it predicts.

Conventions (custom attributes on control tags; Label Studio keeps them):

- `<TextArea toName="<an Image>"/>` without `question` -> a caption of that image; `prompt="a picture of"`
  makes the caption continue that text.
- `question="what colour is the circle?"` on a TextArea -> the generated answer; on a Choices -> the
  choice BLIP finds most likely (ranked over each Choice's `value`; the result holds its `alias` when
  it has one, as Label Studio does). With `choice="multiple"`, every choice whose share of the
  probability is at least `threshold` (default DEFAULT_THRESHOLD), and always the top one.
- `question="$field"` -> the question is the task's `data[field]`.
- A control whose toName is a `<Text value="$field"/>` (the stock Visual Question Answering template)
  answers the question that Text shows, i.e. the task's `data[field]`.
- The image asked about is the control's toName when it is an Image, else the `image="<name>"`
  attribute, else the first Image of the config.
- `predict="false"` on a control: the backend leaves it alone.
- `question="#ask"` on a TextArea or Choices, where `ask` is a TextArea of the config: the question is
  what the annotator types into `ask` while labeling (interactive mode, backend/annotate/interactive.py);
  `ask` itself is then a question box, never captioned, and retrievals leave these controls empty.

Limits: a config is parsed without a DTD, entities or network access and may be MAX_CONFIG_CHARS long;
at most MAX_QUESTIONS controls ask questions (the rest are skipped, and logged once per config), and a
question longer than MAX_QUESTION_CHARS is cut there (logged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from lxml import etree

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.25  # choice shares sum to 1, so at most 4 choices pass by default
SUPPORTED = ("TextArea", "Choices")
# Label Studio's own templates are a few KB and large taxonomies a few hundred; `plan` caches 64 configs
MAX_CONFIG_CHARS = 1_000_000
# each question is one more decoder run per image (~0.1 s at full size on 2 cores); Label Studio's
# templates ask 1-3, and 16 per task keeps a task within a couple of seconds
MAX_QUESTIONS = 16
# BLIP's questions are a few words (VQA's average under 10); this bounds tokenizing a task's field
MAX_QUESTION_CHARS = 1000


@dataclass(frozen=True)
class Ask:
    """One control to fill in for every task."""

    from_name: str
    to_name: str
    type: str  # "textarea" | "choices": the result type Label Studio expects
    image_field: str  # task.data key holding the image URL
    kind: str  # "caption" | "answer" | "rank"
    prompt: str | None = None
    question: str | None = None  # a fixed question ...
    question_field: str | None = None  # ... or the task.data key holding it ...
    question_box: str | None = None  # ... or the TextArea the annotator types it into (interactive only)
    candidates: tuple[str, ...] = ()  # Choice values, ranked by BLIP
    labels: tuple[str, ...] = ()  # what the result stores for each candidate (alias or value)
    multiple: bool = False
    threshold: float = DEFAULT_THRESHOLD

    def question_for(self, data: dict[str, Any]) -> str | None:
        """The question for one task, or None when the task has none for this control."""
        if self.question_box is not None:
            return None  # asked only while labeling
        if self.question_field is None:
            return self.question
        value = data.get(self.question_field)
        if not isinstance(value, str) or not value.strip():
            return None
        return _cut(value.strip(), f"{self.from_name}'s question (task data {self.question_field!r})")


@dataclass(frozen=True)
class Plan:
    asks: tuple[Ask, ...]
    skipped: tuple[str, ...] = field(default=())  # "control: why", for the log
    boxes: tuple[str, ...] = ()  # TextAreas the annotator types questions into (`question="#box"`)

    def ask(self, name: str) -> Ask | None:
        return next((a for a in self.asks if a.from_name == name), None)

    def receivers(self, box: str) -> tuple[Ask, ...]:
        return tuple(a for a in self.asks if a.question_box == box)

    def why_nothing(self) -> str:
        if self.skipped:
            return "nothing to predict in this labeling config: " + "; ".join(self.skipped)
        return "nothing to predict in this labeling config: it has no TextArea or Choices control"


class ConfigError(ValueError):
    """The labeling config cannot be parsed."""


@lru_cache(maxsize=64)
def plan(label_config: str, tasks: tuple[str, ...] = ("caption", "answer")) -> Plan:
    """The asks of `label_config` that a model able to do `tasks` can fill in (cached per config)."""
    config = Config.parse(label_config)
    images = [o for o in config.objects if o.tag == "Image"]
    textareas = {c.name for c in config.controls if c.tag == "TextArea"}
    # question boxes: TextAreas another control takes its question from (question="#name")
    refs = (c.attr.get("question", "").strip() for c in config.controls)
    boxes = {ref[1:].strip() for ref in refs if ref.startswith("#")} & textareas
    asks, skipped, dropped = [], [], []
    for control in config.controls:
        if control.name in boxes:
            continue  # typed into while labeling, not predicted
        try:
            ask = _ask(control, config, images, tasks, textareas)
        except _Skip as why:
            skipped.append(f"{control.tag} {control.name!r}: {why}")
            continue
        if ask.kind != "caption" and sum(a.kind != "caption" for a in asks) >= MAX_QUESTIONS:
            dropped.append(ask.from_name)
            skipped.append(f"{control.tag} {control.name!r}: more than {MAX_QUESTIONS} questions per task")
            continue
        asks.append(ask)
    if dropped:
        log.warning(
            "the labeling config asks %d questions per task; only the first %d are predicted, not: %s",
            MAX_QUESTIONS + len(dropped),
            MAX_QUESTIONS,
            ", ".join(dropped),
        )
    used = {a.question_box for a in asks}
    return Plan(tuple(asks), tuple(skipped), tuple(sorted(b for b in boxes if b in used)))


@dataclass(frozen=True)
class Tag:
    """A tag of a labeling config that names something: an object (`value="$field"`: Image, Text, ...) or
    a control (`toName`: TextArea, Choices, ...), classified as Label Studio does."""

    tag: str
    name: str
    attr: dict[str, str]
    to_name: tuple[str, ...] = ()  # controls: the objects they label
    # Choices: (what a result stores: the Choice's alias, else its value; the Choice's attributes)
    choices: tuple[tuple[str, dict[str, str]], ...] = ()

    @property
    def value(self) -> str | None:
        return self.attr.get("value")


@dataclass(frozen=True)
class Config:
    objects: tuple[Tag, ...]
    controls: tuple[Tag, ...]

    def object(self, name: str) -> Tag | None:
        return next((o for o in self.objects if o.name == name), None)

    @classmethod
    def parse(cls, label_config: str) -> Config:
        """The config's objects and controls. Refuses a config that is too long, declares a DTD (Label
        Studio's configs have none; a DTD is how entity bombs and external entities get in) or is not XML.
        """
        if not isinstance(label_config, str):
            raise ConfigError(f"the labeling config is a {type(label_config).__name__}, not XML text")
        if len(label_config) > MAX_CONFIG_CHARS:
            raise ConfigError(
                f"the labeling config is {len(label_config)} characters long, "
                f"more than the {MAX_CONFIG_CHARS} allowed"
            )
        # refused before any parsing, so neither the cost nor the message depends on the libxml2 version
        if "<!DOCTYPE" in label_config.upper():
            raise ConfigError(_NO_DTD)
        # no entity expansion, no DTD loading, no network, no huge-tree mode (a parser per call: lxml's
        # parsers are not to be shared between threads)
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
        try:
            root = etree.fromstring(label_config.encode(), parser)
        except etree.XMLSyntaxError as e:
            raise ConfigError(f"cannot parse the labeling config: {e}") from None
        if root.getroottree().docinfo.doctype:
            raise ConfigError(_NO_DTD)
        objects, controls = [], []
        for el in root.iter(tag=etree.Element):  # elements only: no comments or processing instructions
            attr = dict(el.attrib)
            name = attr.get("name")
            if not name:
                continue
            if attr.get("toName") and el.tag != "Filter":  # Label Studio's rule: a Filter is not a control
                choices: dict[str, dict[str, str]] = {}  # one per label, as Label Studio keeps them
                for c in el.iter("Choice"):
                    label = c.get("alias") or c.get("value")
                    if label is not None and _owner(c) is el:
                        choices.setdefault(label, dict(c.attrib))
                to_name = tuple(n.strip() for n in attr["toName"].split(","))
                controls.append(Tag(el.tag, name, attr, to_name, tuple(choices.items())))
            elif attr.get("value") or attr.get("valueList"):
                objects.append(Tag(el.tag, name, attr))
        return cls(tuple(objects), tuple(controls))


def _owner(choice: etree._Element) -> etree._Element | None:
    """The control a Choice belongs to: its closest ancestor that is a control (Choices may nest Views)."""
    parent = choice.getparent()
    while parent is not None and not (parent.get("name") and parent.get("toName")):
        parent = parent.getparent()
    return parent


_NO_DTD = "the labeling config has a <!DOCTYPE> (entity declarations); labeling configs need none"


class _Skip(Exception):
    pass


def _ask(control: Tag, config: Config, images: list[Tag], tasks: tuple[str, ...], textareas: set[str]) -> Ask:
    attr = control.attr
    if attr.get("predict", "true").strip().lower() in ("false", "no", "0", "off"):
        raise _Skip('opted out with predict="false"')
    if control.tag not in SUPPORTED:
        raise _Skip(f"{control.tag} is not predicted (only {' and '.join(SUPPORTED)} are)")
    if not control.to_name:
        raise _Skip("no toName")
    to_name = control.to_name[0]
    target = config.object(to_name)
    if target is None:
        raise _Skip(f"toName {to_name!r} is not an object tag of this config")
    if attr.get("perRegion", "").lower() == "true":
        raise _Skip("perRegion controls describe regions, which this backend does not draw")

    # the image asked about
    if target.tag == "Image":
        image = target
    elif attr.get("image"):
        image = next((o for o in images if o.name == attr["image"]), None)
        if image is None:
            raise _Skip(f"image={attr['image']!r} is not an Image of this config")
    elif images:
        image = images[0]
    else:
        raise _Skip("the config has no Image to ask about")
    image_field = _field(image.value)
    if image_field is None:
        raise _Skip(f"Image {image.name!r} has value={image.value!r}, not a $field of the task")

    # the question: an attribute, an attribute naming a task field or a question box, or the Text the
    # control points at
    question = question_field = question_box = None
    if attr.get("question", "").strip().startswith("#"):
        question_box = attr["question"].strip()[1:].strip()
        if question_box not in textareas:
            raise _Skip(f"question={attr['question']!r}: the config has no TextArea named {question_box!r}")
        if question_box == control.name:
            raise _Skip(f"question={attr['question']!r} names the control itself")
    elif attr.get("question", "").strip():
        q = attr["question"].strip()
        question_field = _field(q)
        question = None if question_field else _cut(q, f"{control.name}'s question")
    elif target.tag != "Image":
        question_field = _field(getattr(target, "value", None) or "")
        if question_field is None:
            raise _Skip(f"toName {to_name!r} is a {target.tag} without a $field to read a question from")

    common = {"from_name": control.name, "to_name": to_name, "image_field": image_field}
    asks_question = question is not None or question_field is not None or question_box is not None
    if asks_question and "answer" not in tasks:
        raise _Skip("this model only captions; it cannot answer questions")

    if control.tag == "TextArea":
        if not asks_question:
            prompt = attr.get("prompt", "").strip() or None
            return Ask(type="textarea", kind="caption", prompt=prompt, **common)
        return Ask(
            type="textarea",
            kind="answer",
            question=question,
            question_field=question_field,
            question_box=question_box,
            **common,
        )

    # Choices
    if not asks_question:
        raise _Skip('Choices on an Image need a question="..." attribute to rank the choices by')
    if attr.get("value", "").startswith("$"):
        raise _Skip("choices taken from task data (value=$...) are not supported")
    candidates, labels = [], []
    for label, choice in control.choices:
        value = (choice.get("value") or label or "").strip()
        if value:
            candidates.append(value)
            labels.append(label)
    if not candidates:
        raise _Skip("no Choice to pick from")
    try:
        threshold = float(attr.get("threshold", DEFAULT_THRESHOLD))
    except ValueError:
        raise _Skip(f"threshold={attr['threshold']!r} is not a number") from None
    return Ask(
        type="choices",
        kind="rank",
        question=question,
        question_field=question_field,
        question_box=question_box,
        candidates=tuple(candidates),
        labels=tuple(labels),
        multiple=attr.get("choice", "single").lower() == "multiple",
        threshold=threshold,
        **common,
    )


def _cut(question: str, what: str) -> str:
    if len(question) <= MAX_QUESTION_CHARS:
        return question
    log.warning(
        "%s is %d characters long; only its first %d are asked: %.80r...",
        what,
        len(question),
        MAX_QUESTION_CHARS,
        question,
    )
    return question[:MAX_QUESTION_CHARS]


def _field(value: str | None) -> str | None:
    """`$name` -> `name`; anything else (a literal) -> None."""
    if value and value.startswith("$") and len(value) > 1:
        return value[1:]
    return None
