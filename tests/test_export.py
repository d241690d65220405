"""blip-build on the other checkpoint kinds: caption-only BLIP, and full-size blip-vqa-base shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForQuestionAnswering

from backend.runtime.blip import Blip
from model_build.export import build
from model_build.random_blip import make_random_blip
from model_build.tiny_blip import CHECKPOINT_DIR


def test_build_prints_a_line_per_stage(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "model_build", "tiny", "-o", str(tmp_path / "m"), "--no-int8"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for stage in ("[1/3] loading", "[2/3] exporting", "1/3 vision", "3/3 decoder", "[3/3]", "done in"):
        assert stage in result.stderr
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    for entry in manifest["parts"]["fp16"].values():
        for f in entry["files"]:
            assert (tmp_path / "m" / f["path"]).stat().st_size == f["bytes"]


@pytest.fixture(scope="module")
def caption_only(tmp_path_factory) -> tuple[Path, BlipForConditionalGeneration]:
    """The tiny checkpoint's vision encoder and decoder as a BlipForConditionalGeneration checkpoint."""
    vqa = BlipForQuestionAnswering.from_pretrained(CHECKPOINT_DIR)
    model = BlipForConditionalGeneration(vqa.config).eval()
    model.vision_model.load_state_dict(vqa.vision_model.state_dict())
    model.text_decoder.load_state_dict(vqa.text_decoder.state_dict())
    folder = tmp_path_factory.mktemp("captioner") / "ckpt"
    model.save_pretrained(folder)
    AutoProcessor.from_pretrained(CHECKPOINT_DIR).save_pretrained(folder)
    return folder, model


def test_caption_only_checkpoint(caption_only, blip, held_out, tmp_path: Path):
    folder, model = caption_only
    captioner = Blip(build(str(folder), tmp_path / "m", int8=False))
    assert captioner.tasks == ["caption"]
    assert "text_encoder" not in captioner.manifest.data["parts"]["fp16"]
    processor = AutoProcessor.from_pretrained(folder)
    images = [s.image for s in held_out[:8]]
    with torch.no_grad():
        expected = model.generate(**processor(images=images, return_tensors="pt"), max_new_tokens=20)
    ours = captioner.caption(images)
    assert [g.text for g in ours] == processor.batch_decode(expected, skip_special_tokens=True)
    # the same weights as the bundled VQA checkpoint, so the same captions as its build
    assert [g.tokens for g in ours] == [g.tokens for g in blip.caption(images)]
    with pytest.raises(ValueError, match="cannot answer"):
        captioner.answer(images, [["what colour is the circle?"]] * len(images))


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("full")
    checkpoint = make_random_blip(root / "ckpt")
    return checkpoint, build(str(checkpoint), root / "model", int8=False)


def test_full_size_random_blip_exports_and_decodes(full_size):
    checkpoint, model_dir = full_size
    config = json.loads((checkpoint / "config.json").read_text())["text_config"]
    blip = Blip(model_dir)
    manifest = blip.manifest.data
    # token ids and shapes come from the checkpoint, whatever they are
    assert manifest["tokens"] == {
        "decoder_start": config["bos_token_id"],
        "eos": config["sep_token_id"],
        "pad": config["pad_token_id"],
    }
    assert manifest["text"]["heads"] == config["num_attention_heads"]
    assert manifest["image"]["height"] == 384
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    embeds = blip.encode([image, image])
    assert embeds.shape == (2, 577, 768)
    captions = blip.caption(embeds, min_new_tokens=3, max_new_tokens=3)
    answers = blip.answer(embeds, [["w5 w6 w7"], ["w8"]], min_new_tokens=3, max_new_tokens=3)
    assert [len(c.tokens) for c in captions] == [3, 3]
    assert [len(a[0].tokens) for a in answers] == [3, 3]
    # every part's weights are stored in fp16, like the fp16 checkpoint they came from
    size = sum(f["bytes"] for p in manifest["parts"]["fp16"].values() for f in p["files"])
    assert size < 1.1 * (checkpoint / "model.safetensors").stat().st_size
