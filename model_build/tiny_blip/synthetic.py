"""Synthetic shape scenes with captions and closed-vocabulary questions for the tiny BLIP.

Each scene is a 96x96 RGB image on a plain, slightly noisy light background with one to three flat
shapes, each in its own column (left, middle, right) of a 3x3 grid of 32px cells, at a random row.
Everything the text mentions can be read off the image unambiguously, so a small model can reach
near-perfect accuracy and tests can use exact match.

Only stdlib, numpy and PIL are imported here: the serving side and the calibration code import this
module and must not pull in torch or transformers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
QUESTION_TYPES = ("colour", "count", "shape", "yesno", "position")
TRAIN_SEED = 0
HELD_OUT_SEED = 1

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "middle", "right")
COUNTS = ("one", "two", "three")
YES_NO = ("yes", "no")

CANDIDATES: dict[str, tuple[str, ...]] = {
    "colour": COLOURS,
    "count": COUNTS,
    "shape": SHAPES,
    "yesno": YES_NO,
    "position": POSITIONS,
}

# Hues far apart so that the per-object jitter below can never make two colours look alike.
_RGB = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 70, 215),
    "yellow": (230, 200, 30),
}
_PLURAL = {shape: shape + "s" for shape in SHAPES}
_POSITION_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}

_CELL = IMAGE_SIZE // len(POSITIONS)
_MIN_SIZE, _MAX_SIZE = 20, 27
# Cell centres fall on corners of BLIP's 16px patch grid, so every object covers the same 2x2 patches
# of its cell whatever its size; that keeps a ~1M-parameter ViT's job small.
_JITTER = 2
_COLOUR_JITTER = 18
_NOISE_STD = 4.0
# Uniformly random colour/shape pairs almost never repeat; repeats are forced now and then so that
# counts of two and three (and plural captions) are common enough to learn.
_REPEAT_PROB = 0.3
_OBJECT_COUNT_WEIGHTS = (0.25, 0.35, 0.4)

# Every word and punctuation token the captions and questions can contain (lower case). The tokenizer
# vocabulary is built from this; train.py checks that no generated text falls outside it.
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {
            *COLOURS,
            *SHAPES,
            *_PLURAL.values(),
            *POSITIONS,
            *COUNTS,
            *YES_NO,
            *("a", "and", "any", "are", "colour", "how", "in", "is", "many", "object", "objects", "of"),
            *("on", "part", "picture", "shape", "the", "there", "what", "where", "which"),
            "?",
            ",",
        }
    )
)


@dataclass(frozen=True)
class QA:
    """One question about a scene with its one-word answer."""

    kind: str  # one of QUESTION_TYPES
    question: str
    answer: str  # one lower-case word, always in candidates
    candidates: tuple[str, ...]  # the closed answer set of this kind


@dataclass(frozen=True)
class Scene:
    """A rendered image, its canonical caption and questions about it."""

    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    caption: str
    qa: tuple[QA, ...]


@dataclass(frozen=True)
class _Object:
    column: int  # index into POSITIONS
    colour: str
    shape: str

    @property
    def position(self) -> str:
        return POSITIONS[self.column]


def _sample_objects(rng: random.Random) -> list[_Object]:
    n = rng.choices((1, 2, 3), weights=_OBJECT_COUNT_WEIGHTS)[0]
    columns = sorted(rng.sample(range(len(POSITIONS)), n))
    pairs: list[tuple[str, str]] = []
    for _ in range(n):
        if pairs and rng.random() < _REPEAT_PROB:
            pairs.append(rng.choice(pairs))
        else:
            pairs.append((rng.choice(COLOURS), rng.choice(SHAPES)))
    # Repeats are drawn from earlier objects; shuffling keeps them from always sitting to the right.
    rng.shuffle(pairs)
    return [_Object(column, colour, shape) for column, (colour, shape) in zip(columns, pairs, strict=True)]


def _render(objects: list[_Object], rng: random.Random) -> Image.Image:
    background = tuple(rng.randint(205, 245) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        size = rng.randint(_MIN_SIZE, _MAX_SIZE)
        half = size / 2
        cx = _CELL * obj.column + _CELL / 2 + rng.uniform(-_JITTER, _JITTER)
        cy = _CELL * rng.randrange(len(POSITIONS)) + _CELL / 2 + rng.uniform(-_JITTER, _JITTER)
        fill = tuple(
            min(255, max(0, c + rng.randint(-_COLOUR_JITTER, _COLOUR_JITTER))) for c in _RGB[obj.colour]
        )
        box = (cx - half, cy - half, cx + half, cy + half)
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, _NOISE_STD, (IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _noun_phrase(colour: str, shape: str, count: int) -> str:
    if count == 1:
        return f"a {colour} {shape}"
    return f"{COUNTS[count - 1]} {colour} {_PLURAL[shape]}"


def _caption(objects: list[_Object]) -> str:
    # Identical objects are grouped; groups are listed by their leftmost member so the caption is a
    # function of the scene alone.
    groups: dict[tuple[str, str], int] = {}
    for obj in sorted(objects, key=lambda o: o.column):
        key = (obj.colour, obj.shape)
        groups[key] = groups.get(key, 0) + 1
    phrases = [_noun_phrase(colour, shape, count) for (colour, shape), count in groups.items()]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _unique(objects: list[_Object], key) -> list[_Object]:
    values = [key(o) for o in objects]
    return [o for o, v in zip(objects, values, strict=True) if values.count(v) == 1]


def _colour_question(objects: list[_Object], rng: random.Random) -> QA:
    target = rng.choice(objects)
    templates = [f"what colour is the object {_POSITION_PHRASE[target.position]}?"]
    templates.append(f"what colour is the {target.shape} {_POSITION_PHRASE[target.position]}?")
    if target in _unique(objects, lambda o: o.shape):
        templates.append(f"what colour is the {target.shape}?")
    return QA("colour", rng.choice(templates), target.colour, COLOURS)


def _shape_question(objects: list[_Object], rng: random.Random) -> QA:
    target = rng.choice(objects)
    templates = [f"what shape is {_POSITION_PHRASE[target.position]}?"]
    if target in _unique(objects, lambda o: o.colour):
        templates.append(f"what shape is the {target.colour} object?")
    return QA("shape", rng.choice(templates), target.shape, SHAPES)


def _count_question(objects: list[_Object], rng: random.Random) -> QA:
    template = rng.randrange(3)
    if template == 0:
        shape = rng.choice(objects).shape
        question = f"how many {_PLURAL[shape]} are there?"
        count = sum(o.shape == shape for o in objects)
    elif template == 1:
        colour = rng.choice(objects).colour
        question = f"how many {colour} objects are there?"
        count = sum(o.colour == colour for o in objects)
    else:
        question = "how many objects are there?"
        count = len(objects)
    return QA("count", question, COUNTS[count - 1], COUNTS)


def _yesno_question(objects: list[_Object], rng: random.Random) -> QA:
    answer = rng.choice(YES_NO)
    present_shapes = {o.shape for o in objects}
    if rng.random() < 0.25 and (answer == "yes" or len(present_shapes) < len(SHAPES)):
        pool = sorted(present_shapes) if answer == "yes" else [s for s in SHAPES if s not in present_shapes]
        return QA("yesno", f"are there any {_PLURAL[rng.choice(pool)]}?", answer, YES_NO)
    present = {(o.colour, o.shape) for o in objects}
    if answer == "yes":
        colour, shape = rng.choice(sorted(present))
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        # Near misses (right colour or right shape, wrong pairing) make "no" require binding colour to
        # shape instead of spotting a single attribute.
        near = [(c, s) for c, s in absent if any(c == pc or s == ps for pc, ps in present)]
        colour, shape = rng.choice(near if near and rng.random() < 0.7 else absent)
    suffix = rng.choice(("", " in the picture"))
    return QA("yesno", f"is there a {colour} {shape}{suffix}?", answer, YES_NO)


def _position_question(objects: list[_Object], rng: random.Random) -> QA | None:
    unique = _unique(objects, lambda o: (o.colour, o.shape))
    if not unique:
        return None  # every object has a twin, so "where is the ..." would be ambiguous
    target = rng.choice(unique)
    names = [f"{target.colour} {target.shape}"]
    if target in _unique(objects, lambda o: o.colour):
        names.append(f"{target.colour} object")
    if target in _unique(objects, lambda o: o.shape):
        names.append(target.shape)
    name = rng.choice(names)
    question = rng.choice((f"where is the {name}?", f"which part of the picture is the {name} in?"))
    return QA("position", question, target.position, POSITIONS)


def make_scene(rng: random.Random) -> Scene:
    """Draw one random scene; all randomness comes from ``rng``."""
    objects = _sample_objects(rng)
    image = _render(objects, rng)
    questions = [
        _colour_question(objects, rng),
        _count_question(objects, rng),
        _shape_question(objects, rng),
        _yesno_question(objects, rng),
        _position_question(objects, rng),
    ]
    return Scene(image=image, caption=_caption(objects), qa=tuple(q for q in questions if q is not None))


def make_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes, identical for the same ``(n, seed)``; a longer list extends a shorter one."""
    rng = random.Random(seed)
    return [make_scene(rng) for _ in range(n)]
