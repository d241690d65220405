"""A warmed-up model gives back its IR weight files' pages, and nothing it answers changes. How much of
the files OpenVINO reads again later depends on the model (on a full-size INT8 build, 17 of 363 MB:
embedding rows looked up); bench/memory.py measures that and the rest of a worker's memory. Photos a
request brings are held at the model's input size, not the camera's."""

from __future__ import annotations

import base64
import gc
import io
import sys
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest
from label_studio_server import data_uri
from PIL import Image
from templates import CAPTIONING

from backend.runtime.blip import Blip
from backend.runtime.memory import status_mib
from backend.server.app import Settings, create_app
from model_build.tiny_blip.synthetic import HELD_OUT_SEED, make_scenes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def weight_files(model_dir: Path, blip: Blip) -> list[Path]:
    parts = blip.manifest.data["parts"][blip.precision].values()
    return [model_dir / f["path"] for part in parts for f in part["files"] if f["path"].endswith(".bin")]


def resident_kib(files: list[Path]) -> int:
    """This process's resident KiB of its mappings of `files`."""
    wanted, total, counting = {str(f.resolve()) for f in files}, 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            counting = len(fields) >= 6 and fields[5] in wanted
        elif counting and fields[0] == "Rss:":
            total += int(fields[1])
    return total


def outputs(blip: Blip, scenes) -> tuple:
    images = [s.image for s in scenes]
    questions = [[qa.question for qa in s.qa] for s in scenes]
    return (
        [c.text for c in blip.caption(images)],
        [[a.text for a in answers] for answers in blip.answer(images, questions)],
        [r.text for r in blip.rank(images, "what shape is on the left?", ["circle", "square", "triangle"])],
    )


def test_warm_up_gives_back_the_weight_files_and_changes_no_answer(tiny_dir: Path, held_out) -> None:
    scenes = held_out[:12]
    cold = Blip(tiny_dir)
    files = weight_files(tiny_dir, cold)
    expected = outputs(cold, scenes)
    size_kib = sum(f.stat().st_size for f in files) >> 10
    assert resident_kib(files) > size_kib // 2, "a model that has run holds its weight files' pages"

    warm = Blip(tiny_dir)
    released = warm.warm_up()
    assert released >= size_kib << 10
    assert resident_kib(files) < size_kib // 20
    assert outputs(warm, scenes) == expected  # new batch sizes and question lengths after the release


def test_camera_photos_are_held_at_the_models_input_size(blip: Blip) -> None:
    """A /predict of 16 12-MP photos (36 MB each decoded) holds each at the vision encoder's input size
    until it is encoded, instead of all 16 at full size (576 MB), and predicts what the model makes of
    the whole photo."""
    photos = []
    for scene in make_scenes(16, HELD_OUT_SEED):
        buf = io.BytesIO()
        scene.image.resize((4032, 3024), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        photos.append(buf.getvalue())
    tasks = [
        {"id": i, "data": {"captioning": "data:image/jpeg;base64," + base64.b64encode(p).decode()}}
        for i, p in enumerate(photos)
    ]
    client = create_app(blip=blip, settings=Settings()).test_client()
    body = {"tasks": tasks, "label_config": CAPTIONING, "project": "1"}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak from here on
    before = status_mib("VmRSS")
    response = client.post("/predict", json=body)
    grew_mib = round(status_mib("VmHWM") - before)
    assert response.status_code == 200
    got = [entry["result"][0]["value"]["text"][0] for entry in response.get_json()["results"]]
    # measured: ~240 MiB (four photos decoded at a time, FETCH_THREADS); 865 MiB when all 16 were held
    # at full size until the vision encoder ran
    assert grew_mib < 320, f"the request's peak was {grew_mib} MiB over the RSS before it"
    expected = blip.caption([Image.open(io.BytesIO(p)) for p in photos])
    assert got == [c.text for c in expected]


def test_a_worker_keeps_nothing_of_the_data_uris_it_served(blip: Blip) -> None:
    """Tasks that carry their image inline (data URIs, MBs each): once answered, the worker holds the
    image's embeddings (EMBEDDING_CACHE_MB) and its digest, not the URI. Python 3.11's urlsplit keeps the
    last 128 URLs it split, and the cache remembered each URL it fetched: a worker grew by every data URI
    it was sent."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)
    client = create_app(blip=blip, settings=Settings()).test_client()

    def request(n: int) -> None:
        tasks = []
        for i in range(12):
            pixels[0, 0] = (n, i, 0)  # a new image each time: nothing is found in a cache
            tasks.append({"id": i, "data": {"captioning": data_uri(Image.fromarray(pixels))}})
        body = {"tasks": tasks, "label_config": CAPTIONING, "project": "1"}
        response = client.post("/predict", json=body)
        assert response.status_code == 200 and all(e["result"] for e in response.get_json()["results"])

    tracemalloc.start()
    try:
        request(0)
        gc.collect()  # Flask's test client leaves each request body in a reference cycle
        held = tracemalloc.get_traced_memory()[0]
        for n in range(1, 9):
            request(n)
        gc.collect()
        grew = tracemalloc.get_traced_memory()[0] - held
    finally:
        tracemalloc.stop()
    uri_bytes = len(data_uri(Image.fromarray(pixels)))
    # 96 URIs of ~400 KB were served; their tiny-model embeddings take ~25 KB each
    assert grew < 8 * uri_bytes, f"grew by {grew >> 10} KiB over 96 tasks of {uri_bytes >> 10} KiB"


def test_a_dropped_model_is_freed_at_once(tiny_dir: Path) -> None:
    """No reference cycle holds a Blip or the copies accuracy control makes of it: their compiled parts go
    when the last reference does, not at a later garbage collection, which ran OpenVINO's destructors at
    random points (once, a segfault inside NNCF)."""
    gc.disable()
    try:
        blip = Blip(tiny_dir)
        copy = blip.with_parts({})
        refs = [weakref.ref(blip), weakref.ref(copy)]
        del blip, copy
        assert [r() for r in refs] == [None, None]
    finally:
        gc.enable()
