"""How to spend the cores on /predict's work: process and thread layouts, OpenVINO options and batch sizes,
side by side on the same tasks.

    .venv/bin/python bench/throughput.py .cache/bench/model --precision int8    # layouts, options: 2 rounds
    .venv/bin/python bench/throughput.py DIR --only default,dq_32 --rounds 3
    .venv/bin/python bench/throughput.py DIR OTHER_DIR --only default    # two builds side by side

Every variant runs in fresh processes (its threads and compile options apply from the first compile),
loads the model the way a worker does (Blip, then warm_up), then runs --tasks pre-labeling tasks
(bench/run.py's: a caption of 20 tokens and 3 questions of 10, forced, about each image) --repeats times,
plus one image's follow-up question (10 tokens, its embeddings computed before, as the interactive
mode keeps them). Rounds take the variants in turn, so a change in the machine's load touches all of them
alike; figures are medians over all rounds. For each variant: tasks/s, where one process's time goes
(vision encoder, captions, answers), the follow-up's ms, and the peak RSS over the RSS after warm-up
(what a request adds: how backend/annotate/budget.py's constants are measured).

Layouts: "two processes" runs two processes at the same time on half the tasks each (WORKERS=2 with
INFERENCE_THREADS=1); "two threads" runs the halves in two Python threads of one process (two requests
in one worker), which only overlaps with NUM_STREAMS=2. Results go to --out as JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import machine  # noqa: E402
from memory import reset_peak  # noqa: E402
from workload import ANSWER_TOKENS, CAPTION_TOKENS, QUESTIONS, random_image  # noqa: E402


@dataclass(frozen=True)
class Variant:
    about: str
    processes: int = 1  # running at the same time, each on tasks / processes
    python_threads: int = 1  # each on tasks / (processes x python_threads)
    threads: int | None = None  # INFERENCE_THREADS (None: OpenVINO's, every core)
    config: dict = field(default_factory=dict)  # OpenVINO compile options on top of ov_config's
    batches: dict = field(default_factory=dict)  # Batches fields (backend/runtime/blip.py)
    # the decoder's weights compressed again from the FP16 decoder (model_build.quantize.Rung's fields)
    decoder: dict = field(default_factory=dict)


VARIANTS = {
    "default": Variant("1 process, every core (WORKERS=1, the defaults)"),
    "one_thread": Variant("1 process, 1 thread, half the tasks, alone", threads=1),
    "two_processes": Variant(
        "2 processes of 1 thread, half the tasks each, together", processes=2, threads=1
    ),
    "streams2": Variant(
        "1 process, NUM_STREAMS=2, halves in two Python threads", python_threads=2, config={"NUM_STREAMS": 2}
    ),
    "dq_off": Variant(
        "DYNAMIC_QUANTIZATION_GROUP_SIZE=0 (off)", config={"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    ),
    "dq_32": Variant(
        "DYNAMIC_QUANTIZATION_GROUP_SIZE=32 (OpenVINO's default; the decoder's is 128)",
        config={"DYNAMIC_QUANTIZATION_GROUP_SIZE": 32},
    ),
    "int4": Variant(
        "decoder weights INT4 (the first rung of blip-build's --weights auto)", decoder={"mode": "int4_asym"}
    ),
    "int4_half": Variant(
        "decoder weights half INT4, half INT8 (NNCF ratio 0.5)", decoder={"mode": "int4_asym", "ratio": 0.5}
    ),
    "batch_1111": Variant(
        "batches vision 1, caption 1 (budget's smallest)", batches={"vision": 1, "caption": 1}
    ),
    "batch_1211": Variant("batches vision 1, caption 2", batches={"vision": 1, "caption": 2}),
    "batch_2411": Variant(
        "batches vision 2, caption 4 (format 3's defaults)",
        batches={"vision": 2, "caption": 4},
    ),
    "batch_2811": Variant("batches vision 2, caption 8", batches={"vision": 2, "caption": 8}),
    "batch_21611": Variant("batches vision 2, caption 16", batches={"vision": 2, "caption": 16}),
    "answers_48": Variant("answers 48 at a time", batches={"answer": 48}),
}
DEFAULT_RUN = ("default", "one_thread", "two_processes", "streams2", "dq_off", "dq_32")


# -- one measured process ---------------------------------------------------------------------------


def child(spec: dict) -> None:
    """Loads the model, says "ready", then runs the tasks each time the parent writes a line; prints one
    JSON line per run."""
    import backend.runtime.blip as blip_module
    from backend.runtime.blip import Batches, Blip
    from backend.runtime.memory import status_mib

    # the replies get stdout to themselves: what libraries print there (NNCF's progress) goes to stderr
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    extra = spec["config"]
    if extra:  # the compile options of this variant, on top of the backend's own
        ov_config = blip_module.ov_config
        blip_module.ov_config = lambda *a, **k: {**ov_config(*a, **k), **extra}
    blip = Blip(spec["model_dir"], precision=spec["precision"], threads=spec["threads"])
    blip.use(Batches(**spec["batches"]))
    if spec["decoder"]:  # compressed here, before the clock starts
        import openvino as ov

        from model_build.quantize import Rung, compress

        fp16_decoder = ov.Core().read_model(blip.manifest.part_xml("fp16", "decoder"))
        decoder = compress(fp16_decoder, Rung(**spec["decoder"]))
        compiled = ov.Core().compile_model(
            decoder, "CPU", blip_module.ov_config("CPU", spec["threads"], None, "decoder")
        )
        blip = blip.with_parts({"decoder": compiled})
    blip.warm_up()
    side = blip.image_settings["height"]
    images = [random_image(side, seed=i) for i in range(spec["tasks"])]
    caption = {"min_new_tokens": CAPTION_TOKENS, "max_new_tokens": CAPTION_TOKENS}
    answer = {"min_new_tokens": ANSWER_TOKENS, "max_new_tokens": ANSWER_TOKENS}
    compiled = blip._parts["vision"]
    settings = {k: int(compiled.get_property(k)) for k in ("NUM_STREAMS", "INFERENCE_NUM_THREADS")}
    warm = status_mib("VmRSS")
    reset_peak()  # VmHWM from now on: the peak of the runs

    def tasks(part: list) -> dict[str, float]:
        t0 = time.perf_counter()
        embeds = blip.encode(part)
        t1 = time.perf_counter()
        blip.caption(embeds, **caption)
        t2 = time.perf_counter()
        blip.answer(embeds, [list(QUESTIONS)] * len(part), **answer)
        t3 = time.perf_counter()
        return {"vision": t1 - t0, "captions": t2 - t1, "answers": t3 - t2}

    halves = [images[i :: spec["python_threads"]] for i in range(spec["python_threads"])]
    print(json.dumps({"ready": True, "settings": settings}), file=replies, flush=True)
    with ThreadPoolExecutor(len(halves)) as pool:
        for _ in sys.stdin:
            t0 = time.perf_counter()
            stages = list(pool.map(tasks, halves))
            wall = time.perf_counter() - t0
            one = blip.encode(images[:1])
            t1 = time.perf_counter()
            blip.answer(one, [[QUESTIONS[1]]], **answer)
            follow_up = time.perf_counter() - t1
            run = {"wall": wall, "follow_up": follow_up, **stages[0]}
            run["peak_over_warm_mib"] = status_mib("VmHWM") - warm
            print(json.dumps(run), file=replies, flush=True)


# -- the parent ---------------------------------------------------------------------------------------


def measure(name: str, model_dir: Path, precision: str, tasks: int, repeats: int) -> dict:
    """One round of a variant: its processes started together, `repeats` runs in step."""
    v = VARIANTS[name]
    spec = {**asdict(v), "model_dir": str(model_dir), "precision": precision, "tasks": tasks // v.processes}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(v.processes)
    ]

    def reply(p: subprocess.Popen) -> dict:
        line = p.stdout.readline()
        if not line:  # its traceback went to stderr, above
            raise SystemExit(f"{name}: a measured process ended (exit code {p.wait()})")
        return json.loads(line)

    try:
        ready = [reply(p) for p in procs]
        runs: list[list[dict]] = []
        for _ in range(repeats):
            for p in procs:  # every process starts its run at once
                p.stdin.write("go\n")
                p.stdin.flush()
            runs.append([reply(p) for p in procs])
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()
    done = tasks // v.processes * v.processes
    return {
        "settings": ready[0]["settings"],
        "tasks_per_s": [done / max(r["wall"] for r in run) for run in runs],
        **{k: [run[0][k] for run in runs] for k in ("vision", "captions", "answers", "follow_up")},
        "peak_over_warm_mib": [max(r["peak_over_warm_mib"] for r in run) for run in runs],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dirs", type=Path, nargs="*", help="model directories: each variant runs on each")
    p.add_argument(
        "--only",
        help=f"comma-separated variants (default: {','.join(DEFAULT_RUN)}; all: {','.join(VARIANTS)})",
    )
    p.add_argument(
        "--precision",
        default="auto",
        help="int8, fp16 or auto (what the model directory serves; a random-"
        "weight build serves FP16, its INT8 failing the gate by chance)",
    )
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="runs per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "throughput.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if not args.model_dirs:
        p.error("a model directory is needed (bench/run.py builds the full-size one in .cache/bench/model)")
    names = args.only.split(",") if args.only else list(DEFAULT_RUN)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"no variant {', '.join(unknown)} (there are: {', '.join(VARIANTS)})")

    several = len(args.model_dirs) > 1
    rows = {(f"{n}@{d.name}" if several else n): (n, d) for d in args.model_dirs for n in names}
    runs: dict[str, dict] = {}
    for r in range(args.rounds):
        for key, (name, model_dir) in rows.items():
            print(f"round {r + 1}/{args.rounds}: {key}", file=sys.stderr, flush=True)
            got = measure(name, model_dir, args.precision, args.tasks, args.repeats)
            about = VARIANTS[name].about + (f" [{model_dir.name}]" if several else "")
            mine = runs.setdefault(
                key, {"about": about, "model_dir": str(model_dir), "settings": got["settings"]}
            )
            for k, values in got.items():
                if k != "settings":
                    mine.setdefault(k, []).extend(values)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "tasks": args.tasks,
        "precision": args.precision,
        "variants": runs,
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"{results['date']}, {m['cpu']}, {m['cores']} cores, OpenVINO {m['openvino']}; "
        f"{results['tasks']} tasks per run, medians",
        "",
        "| variant | tasks/s (runs) | vision s | captions s | answers s | follow-up ms "
        "| peak over warm MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in results["variants"].values():
        med = {
            k: statistics.median(v[k])
            for k in ("tasks_per_s", "vision", "captions", "answers", "follow_up", "peak_over_warm_mib")
        }
        each = ", ".join(f"{x:.2f}" for x in v["tasks_per_s"])
        lines.append(
            f"| {v['about']} | {med['tasks_per_s']:.2f} ({each}) | {med['vision']:.2f} "
            f"| {med['captions']:.2f} | {med['answers']:.2f} | {med['follow_up'] * 1000:.0f} "
            f"| {med['peak_over_warm_mib']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
