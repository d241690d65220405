"""Held-out scenes a model gets entirely right: what the tests that check exact outputs use."""

from __future__ import annotations

from backend.runtime.blip import Blip
from model_build.tiny_blip.synthetic import Scene


def fully_right(blip: Blip, pool: list[Scene]) -> list[Scene]:
    """The scenes of `pool` whose caption, every generated and every ranked answer `blip` gets right."""
    images = [s.image for s in pool]
    captions = blip.caption(images)
    answers = blip.answer(images, [[qa.question for qa in s.qa] for s in pool])
    return [
        s
        for s, c, a in zip(pool, captions, answers)
        if c.text == s.caption
        and all(x.text == qa.answer for x, qa in zip(a, s.qa))
        and all(blip.rank([s.image], qa.question, qa.candidates)[0].text == qa.answer for qa in s.qa)
    ]
