"""One model directory, two checkpoints: answers and choices from a VQA checkpoint, captions from a
captioning one (`blip-build VQA --caption-model CAPTIONS`), each with its own vision encoder and gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from label_studio_server import data_uri
from templates import CAPTIONING

from backend.runtime.blip import Blip
from backend.runtime.manifest import ModelDirError
from backend.server.app import Settings, create_app
from model_build.__main__ import main as blip_build
from model_build.random_blip import make_random_blip

FIXED = """
<View>
  <Image name="image" value="$image"/>
  <TextArea name="caption" toName="image"/>
  <TextArea name="count" toName="image" question="how many objects are there?"/>
  <Choices name="shape" toName="image" question="what shape is on the left?">
    <Choice value="circle"/><Choice value="square"/><Choice value="triangle"/>
  </Choices>
</View>
"""


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> Path:
    """The bundled model answers, the wide one captions; both INT8, accuracy-controlled and gated."""
    out = tmp_path_factory.mktemp("paired") / "model"
    assert blip_build(["tiny", "--caption-model", "tiny-wide", "-o", str(out), "--subset-size", "100"]) == 0
    return out


def test_both_builds_are_in_the_directory_each_with_its_gate(paired: Path):
    manifest = json.loads((paired / "manifest.json").read_text())
    entry = manifest["caption_model"]
    assert entry["path"] == "caption" and entry["source"]["model"].endswith("checkpoint-wide")
    captions = json.loads((paired / "caption" / "manifest.json").read_text())
    assert captions["source"]["tasks"] == ["caption"]
    assert set(captions["parts"]["int8"]) == {"vision", "decoder"}  # no question encoder
    for build in (manifest, captions):
        assert build["report"]["accuracy_control"]["stages"]
        assert build["int8"]["gate"]["threshold"] == 0.99
    blip = Blip(paired)
    assert blip.captioner is not blip and blip.captioner.manifest.model_dir == paired / "caption"
    assert blip.model_version.count("+") == 1  # both builds named: a change to either shows


def test_predictions_route_each_ask_to_its_checkpoint(paired: Path, held_out):
    blip = Blip(paired)
    images = [s.image for s in held_out[:6]]
    client = create_app(paired, settings=Settings()).test_client()
    tasks = [{"id": i, "data": {"image": data_uri(im)}} for i, im in enumerate(images)]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": FIXED}).get_json()
    captions = blip.captioner.caption(images)  # the wide model's own vision encoder and decoder
    counts = [row[0] for row in blip.answer(images, [["how many objects are there?"]] * len(images))]
    for entry, caption, count in zip(reply["results"], captions, counts):
        by_name = {r["from_name"]: r for r in entry["result"]}
        assert by_name["caption"]["value"] == {"text": [caption.text]}
        assert by_name["caption"]["score"] == round(caption.score, 4)
        assert by_name["count"]["value"] == {"text": [count.text]}
        assert by_name["count"]["score"] == round(count.score, 4)
        assert by_name["shape"]["value"]["choices"][0] in ("circle", "square", "triangle")
        assert entry["model_version"] == blip.model_version


def test_each_image_goes_through_each_needed_vision_encoder_once(paired: Path, held_out, monkeypatch):
    from backend.annotate.images import ImageLoader
    from backend.annotate.labeling import plan
    from backend.annotate.predict import Predictor

    blip = Blip(paired)
    seen: dict[str, int] = {"answers": 0, "captions": 0}
    for name, model in (("answers", blip), ("captions", blip.captioner)):
        encode = model.encode

        def counting(images, name=name, encode=encode):
            if not isinstance(images, np.ndarray):  # embeddings pass through; images are encoded
                seen[name] += len(images)
            return encode(images)

        monkeypatch.setattr(model, "encode", counting)
    # 6 tasks over 3 distinct images
    uris = [data_uri(s.image) for s in held_out[:3]]
    tasks = [{"id": i, "data": {"image": uris[i % 3]}} for i in range(6)]
    Predictor(blip).predict(tasks, plan(FIXED, tuple(blip.tasks)), ImageLoader())
    assert seen == {"answers": 3, "captions": 3}
    seen.update(answers=0, captions=0)
    Predictor(blip).predict(tasks, plan(CAPTIONING.replace("$captioning", "$image")), ImageLoader())
    assert seen == {"answers": 0, "captions": 3}  # a captions-only project never runs the VQA encoder


def test_a_full_size_captioning_checkpoint_pairs_with_a_small_vqa_one(tmp_path: Path, held_out):
    """A random-weight checkpoint of blip-image-captioning-base's shape (384 px, 577 image tokens, 12 text
    heads, vocabulary 30524) captions next to the bundled 96 px VQA model."""
    checkpoint = make_random_blip(tmp_path / "ckpt", caption_only=True)
    out = tmp_path / "model"
    assert blip_build(["tiny", "--caption-model", str(checkpoint), "-o", str(out), "--no-int8"]) == 0
    blip = Blip(out)
    assert blip.captioner.image_settings["height"] == 384 and blip.image_settings["height"] == 96
    assert blip.captioner.manifest.data["text"]["heads"] == 12
    images = [s.image for s in held_out[:2]]
    captions = blip.caption(images, max_new_tokens=5, min_new_tokens=5)
    assert all(c.text.startswith("w") for c in captions)  # the random checkpoint's filler vocabulary
    assert blip.answer(images, [["how many objects are there?"]] * 2)[0][0].text in ("one", "two", "three")


def test_a_swapped_caption_model_is_refused(paired: Path, tiny_dir: Path, tmp_path: Path):
    copy = Path(shutil.copytree(paired, tmp_path / "copy"))
    shutil.rmtree(copy / "caption")
    shutil.copytree(tiny_dir, copy / "caption")  # a complete, intact build, but not the paired one
    with pytest.raises(ModelDirError, match=r"caption model .* is not the one this build paired"):
        Blip(copy)
