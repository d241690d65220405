"""f32 or bf16 execution on CPU, FP16 and INT8 builds: speed on a full-size model, accuracy on the tiny one.

    python bench/inference_precision.py FULL_MODEL_DIR [--tiny TINY_MODEL_DIR] [--repeats 7]

OpenVINO runs an FP16 IR in bf16 by default on CPUs with bf16 instructions; `Blip` asks for a
precision explicitly (`inference_precision`). This measures, for each build precision and hint:
median ms of the vision encoder (1 image), a caption (20 new tokens, forced) and an answer (10
new tokens, forced) on FULL_MODEL_DIR (random weights with the real shapes, see
model_build/random_blip.py), and held-out answer and caption accuracy of the tiny test model
(a model directory with fp16 and int8 builds), which tells whether bf16 changes what the model says.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from backend.runtime.blip import Blip
from model_build.report import median_ms

HINTS = ("f32", "bf16")


def speed(model_dir: Path, precision: str, hint: str, repeats: int) -> dict[str, float]:
    blip = Blip(model_dir, precision=precision, inference_precision=hint)
    side = blip.image_settings["height"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8))
    embeds = blip.encode([image])
    return {
        "vision_ms": median_ms(lambda: blip.encode([image]), repeats),
        "caption_ms": median_ms(lambda: blip.caption(embeds, min_new_tokens=20, max_new_tokens=20), repeats),
        "answer_ms": median_ms(
            lambda: blip.answer(embeds, [["what is in the picture?"]], min_new_tokens=10, max_new_tokens=10),
            repeats,
        ),
    }


def accuracy(model_dir: Path, precision: str, hint: str, scenes: list) -> dict[str, float]:
    blip = Blip(model_dir, precision=precision, inference_precision=hint)
    images = [s.image for s in scenes]
    captions = blip.caption(images)
    answers = blip.answer(images, [[qa.question for qa in s.qa] for s in scenes])
    right = [a.text == qa.answer for s, row in zip(scenes, answers) for qa, a in zip(s.qa, row)]
    return {
        "answers": sum(right) / len(right),
        "captions": sum(c.text == s.caption for c, s in zip(captions, scenes)) / len(scenes),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--tiny", type=Path, help="tiny test model directory with fp16 and int8 builds")
    p.add_argument("--scenes", type=int, default=500)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()

    scenes = []
    if args.tiny:
        from model_build.tiny_blip.synthetic import HELD_OUT_SEED, make_scenes

        scenes = make_scenes(args.scenes, HELD_OUT_SEED)
    header = f"{'build':<6} {'hint':<5} {'vision ms':>9} {'caption ms':>10} {'answer ms':>9}"
    print(header + (f" {'answers':>8} {'captions':>8}" if scenes else ""))
    for precision in ("fp16", "int8"):
        for hint in HINTS:
            s = speed(args.model_dir, precision, hint, args.repeats)
            line = f"{precision:<6} {hint:<5} {s['vision_ms']:>9.0f} {s['caption_ms']:>10.0f}"
            line += f" {s['answer_ms']:>9.0f}"
            if scenes:
                a = accuracy(args.tiny, precision, hint, scenes)
                line += f" {a['answers']:>8.1%} {a['captions']:>8.1%}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
