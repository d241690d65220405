"""The FP16 IR executed in f32 decodes exactly the tokens transformers' PyTorch `generate` decodes."""

from __future__ import annotations

import pytest
import torch

from model_build.reference import caption_ids
from model_build.tiny_blip import CHECKPOINT_DIR, WIDE_CHECKPOINT_DIR

N = 16  # scenes per parity check


@pytest.fixture(scope="module", params=[CHECKPOINT_DIR, WIDE_CHECKPOINT_DIR], ids=["tiny", "tiny-wide"])
def checkpoint(request):
    """Both bundled test models: other widths, head sizes, image sizes and token ids."""
    return request.param


@pytest.fixture(scope="module")
def blip(checkpoint, tiny_dir, tmp_path_factory):
    from backend.runtime.blip import Blip
    from model_build.export import build

    if checkpoint == CHECKPOINT_DIR:
        return Blip(tiny_dir)
    return Blip(build(str(checkpoint), tmp_path_factory.mktemp("parity") / "model", int8=False))


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, BlipForQuestionAnswering

    return BlipForQuestionAnswering.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(
        checkpoint
    )


def hf_caption_ids(hf, images, prompt_ids: list[int] | None = None, **generation) -> list[list[int]]:
    """transformers' own captioning call for a VQA checkpoint: its decoder on the image embeddings."""
    model, processor = hf
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    out = caption_ids(model, pixel_values, prompt_ids or [], **generation)
    start = 1 + len(prompt_ids or [])
    return [_strip(row[start:], model.config.text_config) for row in out.tolist()]


def hf_answer_ids(hf, images, questions: list[str], **generation) -> list[list[int]]:
    """transformers' BlipForQuestionAnswering.generate; questions of one call must tokenize to equal
    length (it attends to question padding, see DESIGN.md)."""
    model, processor = hf
    inputs = processor(images=images, text=questions, return_tensors="pt", padding=True)
    assert bool(inputs["attention_mask"].all()), "unequal question lengths in one transformers batch"
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, **generation)
    return [_strip(row[1:], model.config.text_config) for row in out.tolist()]


def _strip(tokens: list[int], tcfg) -> list[int]:
    """Generated tokens up to and including the first eos (transformers pads finished rows)."""
    if tcfg.sep_token_id in tokens:
        return tokens[: tokens.index(tcfg.sep_token_id) + 1]
    return tokens


def prompt_ids(blip, text: str) -> list[int]:
    return blip.text_codec.ids(text)[1:-1]


@pytest.mark.parametrize(
    "generation", [{}, {"num_beams": 3}, {"repetition_penalty": 1.5, "min_new_tokens": 4}]
)
def test_captions_match_transformers(blip, hf, held_out, generation):
    images = [s.image for s in held_out[:N]]
    ours = [g.tokens for g in blip.caption(images, **generation)]
    assert ours == [hf_caption_ids(hf, [im], max_new_tokens=20, **generation)[0] for im in images]
    # transformers batches captions correctly (no padding), so compare a whole batch too
    assert ours == hf_caption_ids(hf, images, max_new_tokens=20, **generation)


@pytest.mark.parametrize("generation", [{}, {"num_beams": 3}])
def test_a_cache_that_must_grow_decodes_the_same_tokens(blip, hf, held_out, monkeypatch, generation):
    # a decoding's cache starts at CACHE_TOKENS and doubles when full: from 2, a 16-token caption
    # after a prompt outgrows it three times
    import backend.runtime.blip as blip_module

    monkeypatch.setattr(blip_module, "CACHE_TOKENS", 2)
    images = [s.image for s in held_out[:4]]
    ids = prompt_ids(blip, held_out[0].caption.split()[0])
    settings = {"min_new_tokens": 16, "max_new_tokens": 20, **generation}
    ours = [
        g.tokens[len(ids) :] for g in blip.caption(images, prompt=held_out[0].caption.split()[0], **settings)
    ]
    assert ours == [hf_caption_ids(hf, [im], ids, **settings)[0] for im in images]
    assert all(len(t) >= 16 for t in ours)


def test_caption_prompt_matches_transformers(blip, hf, held_out):
    images = [s.image for s in held_out[:N]]
    prompt = held_out[0].caption.split()[0]  # a real first word of a caption
    ids = prompt_ids(blip, prompt)
    ours = blip.caption(images, prompt=prompt)
    assert [g.tokens[len(ids) :] for g in ours] == hf_caption_ids(hf, images, ids, max_new_tokens=20)
    assert all(g.text.startswith(prompt) for g in ours)


@pytest.mark.parametrize(
    "generation", [{}, {"num_beams": 3}, {"repetition_penalty": 1.5, "min_new_tokens": 2}]
)
def test_answers_match_transformers_at_batch_1(blip, hf, held_out, generation):
    scenes = held_out[:N]
    ours = blip.answer(
        [s.image for s in scenes], [[qa.question for qa in s.qa] for s in scenes], **generation
    )
    for scene, answers in zip(scenes, ours):
        for qa, got in zip(scene.qa, answers):
            assert (
                got.tokens
                == hf_answer_ids(hf, [scene.image], [qa.question], max_new_tokens=10, **generation)[0]
            )


@pytest.mark.parametrize("generation", [{}, {"num_beams": 3}])
def test_answers_match_transformers_in_equal_length_batches(blip, hf, held_out, generation):
    # group questions by token count, so that transformers' batches have no padding
    groups: dict[int, list[tuple]] = {}
    for scene in held_out[: 4 * N]:
        for qa in scene.qa:
            groups.setdefault(len(blip.text_codec.ids(qa.question)), []).append((scene.image, qa.question))
    batches = [g[:8] for g in groups.values() if len(g) >= 2]
    assert len(batches) >= 2
    for batch in batches:
        images, questions = zip(*batch)
        ours = [a[0].tokens for a in blip.answer(list(images), [[q] for q in questions], **generation)]
        assert ours == hf_answer_ids(hf, list(images), list(questions), max_new_tokens=10, **generation)


def test_padded_batches_answer_like_batch_1(blip, held_out):
    scenes = held_out[:N]
    questions = [[qa.question for qa in s.qa] for s in scenes]
    batched = blip.answer([s.image for s in scenes], questions)
    for scene, qs, answers in zip(scenes, questions, batched):
        for q, got in zip(qs, answers):
            alone = blip.answer([scene.image], [[q]])[0][0]
            assert got.tokens == alone.tokens
            assert got.score == pytest.approx(alone.score, abs=1e-4)


def test_image_embeddings_are_reused_across_asks(blip, held_out):
    scene = held_out[0]
    embeds = blip.encode([scene.image])
    from_images = blip.answer([scene.image], [[qa.question for qa in scene.qa]])
    from_embeds = blip.answer(embeds, [[qa.question for qa in scene.qa]])
    assert [a.tokens for a in from_images[0]] == [a.tokens for a in from_embeds[0]]
    assert blip.caption(embeds)[0].tokens == blip.caption([scene.image])[0].tokens


@pytest.mark.parametrize("generation", [{}, {"repetition_penalty": 1.5, "min_new_tokens": 2}])
def test_caption_and_answers_decoded_together_match_transformers(blip, hf, held_out, generation):
    # one image's caption and answers share a decoder batch (each row attending to its own part of
    # the image's and questions' embeddings, with its own lengths): each must be what it is alone
    for scene in held_out[:N]:
        questions = [qa.question for qa in scene.qa]
        captions, answers = blip.caption_and_answer(
            [scene.image], [questions], caption=generation, answer=generation
        )
        assert captions[0].tokens == hf_caption_ids(hf, [scene.image], max_new_tokens=20, **generation)[0]
        for q, got in zip(questions, answers[0]):
            assert got.tokens == hf_answer_ids(hf, [scene.image], [q], max_new_tokens=10, **generation)[0]
        alone = blip.caption([scene.image], **generation)[0]
        assert captions[0].score == pytest.approx(alone.score, abs=1e-4)
