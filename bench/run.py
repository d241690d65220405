"""Speed, side by side in one run: PyTorch eager, the OpenVINO notebook's INT8 pipeline, this project.

    make bench                                  # = .venv/bin/python bench/run.py
    .venv/bin/python bench/run.py --checkpoint ./blip-vqa-base   # a real checkpoint folder instead

Without --checkpoint the model is a random-weight BLIP with blip-vqa-base's architecture
(model_build/random_blip.py; the Hugging Face hub is out of reach here): it says nothing about
quality, everything about speed. Every contender gets the same image, the same questions and the
same generation lengths (20 new tokens per caption, 10 per answer, forced: random weights would
otherwise stop at arbitrary points), on the same number of threads; times are medians over
--repeats runs after a warm-up.

Contenders: (1) "pytorch": transformers PyTorch eager, written as a user would: a caption from the
decoder on the image embeddings, each question through `BlipForQuestionAnswering.generate`;
(2) "notebook": the OpenVINO notebook's INT8 pipeline as its users run it (bench/notebook_faithful.py:
its own export, NNCF calls and default compile settings, transformers' `generate` on the decoder IR);
(3) "notebook_style": the notebook's pipeline shape (three IRs, cross-attention recomputed at every
token, the image encoded again for every call) built from this project's NNCF encoders and compile
settings, with a numpy decoding loop (bench/notebook_style.py): between (2) and (4), it shows how much
of the gap is the pipeline's shape; (4) this project FP16 and (5) INT8 (backend.runtime.blip.Blip with
its defaults). Workloads: vision encoder; caption; one question; a pre-labeling task (caption + 3
questions about one image); 16 such tasks through the real backend (`/predict` under gunicorn) as
tasks/s with the serving process's peak RSS; a question typed while labeling (interactive /predict),
first and follow-up about one image; and the build itself (export + INT8 on 300 calibration
samples). Results are printed and written to --out as JSON, with the machine (CPU model and flags).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import machine  # noqa: E402
from workload import ANSWER_TOKENS, ASK_CONFIG, CAPTION_TOKENS, QUESTIONS, TASK_CONFIG, data_uri, random_image  # noqa: E402

from backend.runtime.blip import Blip  # noqa: E402
from model_build.calibration import synthetic  # noqa: E402
from model_build.export import build  # noqa: E402
from model_build.quantize import QuantSettings  # noqa: E402
from model_build.reference import caption_ids  # noqa: E402
from model_build.report import median_ms  # noqa: E402

CONTENDERS = ("pytorch", "notebook", "notebook_style", "fp16", "int8")
WORKLOADS = ("vision", "caption", "question", "task")


def side_by_side(contenders: dict[str, dict[str, Callable[[], object]]], repeats: int) -> dict:
    """workload -> contender -> median ms. Contenders take turns within each repeat, so a change in
    the machine's load during the run touches all of them alike instead of skewing one column."""
    ms: dict[str, dict[str, float]] = {}
    for w in WORKLOADS:
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for workloads in contenders.values():
            workloads[w]()  # warm-up: first inference compiles kernels and allocates
        for _ in range(repeats):
            for name, workloads in contenders.items():
                t0 = time.perf_counter()
                workloads[w]()
                times[name].append((time.perf_counter() - t0) * 1000)
        ms[w] = {name: statistics.median(t) for name, t in times.items()}
        log(f"{w:<9} " + "  ".join(f"{name} {v:.1f} ms" for name, v in ms[w].items()))
    return ms


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- contenders: name -> workload -> callable ------------------------------------------------------


def pytorch_workloads(checkpoint: Path, image: Image.Image, threads: int) -> dict[str, Callable[[], object]]:
    from transformers import AutoProcessor, BlipForQuestionAnswering

    torch.set_num_threads(threads)
    model = BlipForQuestionAnswering.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    forced = {"do_sample": False, "num_beams": 1}

    @torch.no_grad()
    def vision():
        return model.vision_model(pixel_values=pixels).last_hidden_state

    def caption():
        return caption_ids(
            model, pixels, min_new_tokens=CAPTION_TOKENS, max_new_tokens=CAPTION_TOKENS, num_beams=1
        )

    @torch.no_grad()
    def question(q: str = QUESTIONS[0]):
        inputs = processor(images=[image], text=[q], return_tensors="pt")
        return model.generate(**inputs, min_new_tokens=ANSWER_TOKENS, max_new_tokens=ANSWER_TOKENS, **forced)

    def task():
        caption()
        for q in QUESTIONS:
            question(q)

    return {"vision": vision, "caption": caption, "question": question, "task": task}


def faithful_workloads(notebook, image: Image.Image) -> dict[str, Callable[[], object]]:
    """The notebook as its demo calls it: every caption and answer from the image, through BlipProcessor."""
    caption = {"min_new_tokens": CAPTION_TOKENS, "max_new_tokens": CAPTION_TOKENS}
    answer = {"min_new_tokens": ANSWER_TOKENS, "max_new_tokens": ANSWER_TOKENS}

    def task():
        notebook.caption(image, **caption)
        for q in QUESTIONS:
            notebook.answer(image, q, **answer)

    return {
        "vision": lambda: notebook.encode(image),
        "caption": lambda: notebook.caption(image, **caption),
        "question": lambda: notebook.answer(image, QUESTIONS[0], **answer),
        "task": task,
    }


def notebook_workloads(pipeline, image: Image.Image) -> dict[str, Callable[[], object]]:
    def task():
        pipeline.caption(image, CAPTION_TOKENS)
        for q in QUESTIONS:
            pipeline.answer(image, q, ANSWER_TOKENS)

    return {
        "vision": lambda: pipeline.encode(image),
        "caption": lambda: pipeline.caption(image, CAPTION_TOKENS),
        "question": lambda: pipeline.answer(image, QUESTIONS[0], ANSWER_TOKENS),
        "task": task,
    }


def project_workloads(blip: Blip, image: Image.Image) -> dict[str, Callable[[], object]]:
    caption = {"min_new_tokens": CAPTION_TOKENS, "max_new_tokens": CAPTION_TOKENS}
    answer = {"min_new_tokens": ANSWER_TOKENS, "max_new_tokens": ANSWER_TOKENS}

    def task():
        # as /predict runs a one-task request: one vision call, the caption and answers decoded together
        blip.caption_and_answer([image], [list(QUESTIONS)], caption=caption, answer=answer)

    return {
        "vision": lambda: blip.encode([image]),
        "caption": lambda: blip.caption([image], **caption),
        "question": lambda: blip.answer([image], [[QUESTIONS[0]]], **answer),
        "task": task,
    }


# -- the real backend ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process and its children, the model-holding worker included."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    peak = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
    return peak / 1024


def backend_throughput(
    model_dir: Path, precision: str, side: int, threads: int, repeats: int, n_tasks: int
) -> dict[str, float]:
    """tasks/s of POST /predict (caption + 3 questions per task) under gunicorn, and its peak RSS."""
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "PRECISION": precision,
        "INFERENCE_THREADS": str(threads),
    }
    exe = Path(sys.executable).with_name("blip-backend")
    cmd = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"the backend did not start: {' '.join(cmd)}")

        # a different image per task, and new images for every request: the backend keeps recent images'
        # embeddings (EMBEDDING_CACHE_MB), and a repeated request would measure its cache
        def body(k: int) -> dict:
            images = [data_uri(random_image(side, seed=k * n_tasks + i)) for i in range(n_tasks)]
            tasks = [{"id": i, "data": {"image": image}} for i, image in enumerate(images)]
            return {"tasks": tasks, "label_config": TASK_CONFIG, "project": "1.0"}

        bodies = iter([body(k) for k in range(repeats + 1)])  # the warm-up's, then one per repeat

        def predict():
            r = requests.post(f"{url}/predict", json=next(bodies), timeout=600)
            r.raise_for_status()
            results = r.json()["results"]
            assert len(results) == n_tasks and all(len(x["result"]) == 4 for x in results), results[:1]

        seconds = median_ms(predict, repeats) / 1000
        result = {"tasks_per_s": n_tasks / seconds, "peak_rss_mib": peak_rss_mib(proc.pid)}
        if precision == "int8":
            result["interactive"] = interactive_latency(url, side, repeats)
        return result
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def interactive_latency(url: str, side: int, repeats: int) -> dict[str, float]:
    """Median ms of an interactive /predict (a question typed while labeling): the first question about
    an image (download, vision encoder, the question encoder, the answer) and a follow-up
    about the same image (the embedding cache skips all but the question and its answer)."""

    def ask(image: str, question: str) -> float:
        body = {
            "tasks": [{"id": 1, "data": {"image": image}}],
            "label_config": ASK_CONFIG,
            "project": "1.0",
            "params": {"context": {"result": [_typed(question)]}},
        }
        t0 = time.perf_counter()
        r = requests.post(f"{url}/predict", json=body, timeout=120)
        ms = (time.perf_counter() - t0) * 1000
        r.raise_for_status()
        (entry,) = r.json()["results"]
        assert any(x["from_name"] == "answer" for x in entry["result"]), entry
        return ms

    ask(data_uri(random_image(side, seed=1000)), QUESTIONS[0])  # warm-up
    first, follow_up = [], []
    for i in range(repeats):
        image = data_uri(random_image(side, seed=1001 + i))  # never seen: nothing cached
        first.append(ask(image, QUESTIONS[1]))
        follow_up.append(ask(image, QUESTIONS[2]))
    return {"first_ms": statistics.median(first), "follow_up_ms": statistics.median(follow_up)}


def _typed(question: str) -> dict:
    """The question box's result as the labeling screen sends it in `context.result`."""
    value = {"text": [question]}
    return {"from_name": "ask", "to_name": "image", "type": "textarea", "value": value, "origin": "manual"}


# -- the run ---------------------------------------------------------------------------------------


def table(results: dict) -> str:
    ms = results["ms"]
    lines = [
        f"{'median ms, 1 image':<22}"
        + "".join(f"{c:>15}" for c in CONTENDERS)
        + f"{'vs PyTorch':>12}"
        + f"{'vs notebook':>13}"
    ]
    for w in WORKLOADS:
        row = ms[w]
        ratio_pt = row["pytorch"] / row["int8"]
        ratio_nb = row["notebook"] / row["int8"]
        label = {"task": "task (caption + 3 q)"}.get(w, w)
        lines.append(
            f"{label:<22}"
            + "".join(f"{row[c]:>15.0f}" for c in CONTENDERS)
            + f"{ratio_pt:>11.1f}x{ratio_nb:>12.1f}x"
        )
    lines.append("(ratios: this project's INT8 against PyTorch and against the notebook)")
    parts = results["notebook"]["compiled"].values()
    short = {
        "PERFORMANCE_HINT": "hint",
        "INFERENCE_PRECISION_HINT": "execution",
        "INFERENCE_NUM_THREADS": "threads",
        "NUM_STREAMS": "streams",
    }
    chosen = ", ".join(
        f"{label} {'/'.join(sorted({str(p[k]) for p in parts}))}" for k, label in short.items()
    )
    lines.append(f"notebook: compiled with OpenVINO's defaults (threads set as for all): {chosen}")
    for precision, b in results["backend"].items():
        lines.append(
            f"/predict, {results['tasks']} tasks, {precision}: {b['tasks_per_s']:.2f} tasks/s, "
            f"peak RSS {b['peak_rss_mib']:.0f} MiB"
        )
    asked = results["backend"]["int8"]["interactive"]
    first, follow_up = asked["first_ms"], asked["follow_up_ms"]
    lines.append(f"interactive question, int8: first {first:.0f} ms, follow-up {follow_up:.0f} ms")
    lines.append(
        f"build (export + INT8, {results['calibration']} calibration samples): {results['build_s']:.0f} s"
    )
    lines.append(
        f"notebook build (its export + NNCF, {results['calibration']} calibration rows): "
        f"{results['notebook']['build_s']:.0f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="a BLIP VQA checkpoint folder (default: random weights)")
    p.add_argument("--work", type=Path, default=REPO / ".cache" / "bench", help="where models are built")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--calibration", type=int, default=300, help="INT8 calibration samples")
    p.add_argument("--tasks", type=int, default=16, help="tasks per /predict request")
    p.add_argument("--smoke", action="store_true", help="tiny test model, one repeat: checks the bench runs")
    args = p.parse_args(argv)

    if args.smoke:
        from model_build.tiny_blip import CHECKPOINT_DIR

        args.checkpoint, args.repeats, args.calibration, args.tasks = CHECKPOINT_DIR, 1, 20, 2
    checkpoint = args.checkpoint
    if checkpoint is None:
        from model_build.random_blip import make_random_blip

        checkpoint = args.work / "random-blip-vqa"
        if not (checkpoint / "config.json").exists():
            log(f"making a random-weight BLIP with blip-vqa-base's shapes in {checkpoint}")
            make_random_blip(checkpoint)
    model_dir = args.work / "model"

    log(f"building {checkpoint} -> {model_dir} (FP16 + INT8, {args.calibration} calibration samples)")
    t0 = time.perf_counter()
    build(
        str(checkpoint),
        model_dir,
        force=True,
        calibration=synthetic,
        # random weights agree with FP16 by chance only: accuracy control would put operations back in
        # float to no purpose; this measures speed (bench/quality.py measures agreement)
        quant=QuantSettings(subset_size=args.calibration, accuracy_control=False),
    )
    build_s = time.perf_counter() - t0

    from notebook_faithful import NotebookBlip
    from notebook_faithful import export as export_notebook
    from notebook_style import NotebookPipeline, export_decoder
    from transformers import BlipForQuestionAnswering

    log(f"building the OpenVINO notebook's INT8 IRs its way ({args.calibration} calibration rows)")
    t0 = time.perf_counter()
    notebook_dir = export_notebook(checkpoint, args.work / "notebook_faithful", args.calibration)
    notebook_build_s = time.perf_counter() - t0

    log("exporting the notebook-style decoder (cross-attention recomputed each step)")
    decoder_xml = export_decoder(
        BlipForQuestionAnswering.from_pretrained(checkpoint, dtype=torch.float32).eval(),
        args.work / "notebook_style",
    )

    side = Blip(model_dir, precision="fp16").image_settings["height"]
    image = random_image(side, seed=0)
    notebook = NotebookBlip(checkpoint, notebook_dir, args.threads)
    contenders = {
        "pytorch": lambda: pytorch_workloads(checkpoint, image, args.threads),
        "notebook": lambda: faithful_workloads(notebook, image),
        "notebook_style": lambda: notebook_workloads(
            NotebookPipeline(model_dir, decoder_xml, args.threads), image
        ),
        "fp16": lambda: project_workloads(Blip(model_dir, precision="fp16", threads=args.threads), image),
        "int8": lambda: project_workloads(Blip(model_dir, precision="int8", threads=args.threads), image),
    }
    ms = side_by_side({name: make() for name, make in contenders.items()}, args.repeats)

    backend = {}
    for precision in ("int8", "fp16"):
        backend[precision] = backend_throughput(
            model_dir, precision, side, args.threads, args.repeats, args.tasks
        )
        log(f"/predict {precision}: {backend[precision]}")

    results = {
        "checkpoint": "random weights, blip-vqa-base shapes" if args.checkpoint is None else str(checkpoint),
        "machine": machine(),
        "threads": args.threads,
        "repeats": args.repeats,
        "lengths": {"caption": CAPTION_TOKENS, "answer": ANSWER_TOKENS},
        "ms": ms,
        "backend": backend,
        "tasks": args.tasks,
        "build_s": build_s,
        "calibration": args.calibration,
        "notebook": {"build_s": notebook_build_s, "compiled": notebook.compiled_settings()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
