"""Explicit vs stateful self-attention cache for the exported decoder: median ms per decoding step.

    python bench/decoder_cache.py MODEL_DIR [--steps 20] [--repeats 7]

The decoder IR takes its cache as `past_kv` and returns it grown as `present_kv` (explicit). The
stateful variant is the same IR with OpenVINO's MakeStateful transformation pairing the two, so the
cache stays inside the infer request. Both attend to the states of an answer (8 question tokens)
and of a caption (all image tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import openvino as ov
from openvino._offline_transformations import apply_make_stateful_transformation

from backend.runtime.blip import ov_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()

    manifest = json.loads((args.model_dir / "manifest.json").read_text())
    text, image = manifest["text"], manifest["image"]
    n_image_tokens = (image["height"] // 16) * (image["width"] // 16) + 1
    layers, heads, head_size = text["layers"], text["heads"], text["head_size"]
    xml = args.model_dir / "fp16" / "decoder.xml"
    core = ov.Core()
    explicit_model = core.read_model(xml)
    width = explicit_model.input("encoder_states").get_partial_shape()[2].get_length()
    config = ov_config("CPU", None, None, "decoder")
    explicit = core.compile_model(explicit_model, "CPU", config)
    stateful_model = core.read_model(xml)
    apply_make_stateful_transformation(stateful_model, {"past_kv": "present_kv"})
    stateful = core.compile_model(stateful_model, "CPU", config)

    empty = np.zeros((layers, 2, 1, heads, 0, head_size), np.float32)
    ids = np.array([[manifest["tokens"]["decoder_start"]]], np.int64)
    rng = np.random.default_rng(0)

    def run_explicit(states: np.ndarray, mask: np.ndarray) -> None:
        request, past = explicit.create_infer_request(), empty
        for _ in range(args.steps):
            out = request.infer(
                {"input_ids": ids, "past_kv": past, "encoder_states": states, "cross_mask": mask},
                share_inputs=True,
            )
            past = out["present_kv"]

    def run_stateful(states: np.ndarray, mask: np.ndarray) -> None:
        request = stateful.create_infer_request()
        request.query_state()[0].state = ov.Tensor(empty)  # the default initial state has batch 0
        for _ in range(args.steps):
            request.infer({0: ids, 1: states, 2: mask}, share_inputs=True)

    print(f"{'cross tokens':>12} {'explicit ms/step':>17} {'stateful ms/step':>17}")
    for n_cross in (8, n_image_tokens):
        states = rng.standard_normal((1, n_cross, width)).astype(np.float32)
        mask = np.ones((1, n_cross), np.int64)
        medians = []
        for run in (run_explicit, run_stateful):
            run(states, mask)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                run(states, mask)
                times.append((time.perf_counter() - t0) * 1000 / args.steps)
            medians.append(statistics.median(times))
        print(f"{n_cross:>12} {medians[0]:>17.2f} {medians[1]:>17.2f}")


if __name__ == "__main__":
    main()
