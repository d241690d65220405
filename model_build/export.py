"""Export a BLIP checkpoint to an OpenVINO model directory (backend/runtime/manifest.py: the layout)."""

from __future__ import annotations

import errno
import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch

from backend.runtime.manifest import FORMAT, MANIFEST, WORD_TABLE, file_entry
from model_build.calibration import Calibration, synthetic, with_questions
from model_build.graphs import DecoderStep, TextEncoder, VisionEncoder
from model_build.quantize import QuantSettings
from model_build.source import BuildError, Checkpoint, load_checkpoint


class QualityGateError(BuildError):
    """INT8 was built but agrees with FP16 less than required; it is marked not to be served."""


CAPTION_DIR = "caption"  # the paired caption model's directory inside the model directory


# Used when the checkpoint's generation config does not say: greedy, and BLIP's answer length.
DEFAULT_GENERATION = {
    "caption": {"num_beams": 1, "max_new_tokens": 20, "min_new_tokens": 0, "repetition_penalty": 1.0},
    "answer": {"num_beams": 1, "max_new_tokens": 10, "min_new_tokens": 0, "repetition_penalty": 1.0},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(
    source: str,
    out: str | Path,
    revision: str | None = None,
    force: bool = False,
    int8: bool = True,
    calibration: Callable[[int], Calibration] | None = None,
    quant: QuantSettings | None = None,
    min_agreement: float | None = None,
    caption_model: str | None = None,
    caption_revision: str | None = None,
) -> Path:
    """Export `source` into `out` (FP16, then INT8 unless int8=False); returns the model directory.

    `calibration(n)` returns up to n samples of the user's data (default: synthetic shapes, with a
    warning). INT8 is served only if it agrees with FP16 on at least `min_agreement` of the held-out
    asks (default: the target agreement accuracy control holds). With `caption_model`, a second
    checkpoint is built alike into `out/caption` and captions come from it. Raises BuildError on user
    errors, and QualityGateError only when `min_agreement` was given and missed (the directory is
    complete then, with INT8 marked not to be served).
    """
    out = Path(out)
    t0 = time.perf_counter()
    _prepare_output(out, force)
    manifest = _build_one(source, out, revision, int8, calibration, quant, min_agreement)
    missed = [out] if int8 and not manifest["int8"]["serve"] else []
    if caption_model is not None:
        log(f"caption model: {caption_model} -> {out / CAPTION_DIR}")
        sub = out / CAPTION_DIR
        captions = _build_one(
            caption_model, sub, caption_revision, int8, calibration, quant, min_agreement, tasks=["caption"]
        )
        if int8 and not captions["int8"]["serve"]:
            missed.append(sub)
        from backend.runtime.manifest import load_manifest

        manifest["caption_model"] = {
            "path": CAPTION_DIR,
            "source": captions["source"],
            "fingerprint": load_manifest(sub, verify_hashes=False).fingerprint,
        }
        _write_manifest(out, manifest)
    log(f"done in {time.perf_counter() - t0:.1f} s: {out}")
    if min_agreement is not None and missed:
        gates = [json.loads((d / MANIFEST).read_text())["int8"]["gate"] for d in missed]
        raise QualityGateError(
            "; ".join(
                f"{d}: INT8 agrees with FP16 on {g['value']:.1%} of held-out asks, below --min-agreement "
                f"{g['threshold']:.1%}; it will serve FP16"
                for d, g in zip(missed, gates)
            )
        )
    return out


def _build_one(
    source: str,
    out: Path,
    revision: str | None,
    int8: bool,
    calibration: Callable[[int], Calibration] | None,
    quant: QuantSettings | None,
    min_agreement: float | None,
    tasks: list[str] | None = None,
) -> dict[str, Any]:
    """One checkpoint into `out` (emptied by the caller); `tasks` narrows what it is exported for."""
    quant = quant or QuantSettings()
    stages = 6 if int8 else 3
    out.mkdir(parents=True, exist_ok=True)
    log(f"[1/{stages}] loading {source}" + (f" @ {revision}" if revision else ""))
    ckpt = load_checkpoint(source, revision)
    if tasks:
        unsupported = set(tasks) - set(ckpt.tasks)
        if unsupported:
            raise BuildError(f"{source}: cannot {', '.join(sorted(unsupported))} ({ckpt.architecture})")
        ckpt.tasks = list(tasks)
    n_params = sum(p.numel() for p in ckpt.model.parameters())
    log(f"      {ckpt.architecture}, {n_params / 1e6:.1f}M parameters, tasks: {', '.join(ckpt.tasks)}")
    _check_free_space(out, needed=int(n_params * (3.5 if int8 else 2) * 1.3) + (50 << 20))

    log(f"[2/{stages}] exporting FP16 parts")
    parts = {"fp16": export_parts(ckpt, out / "fp16")}
    log(f"[3/{stages}] saving processor files and manifest")
    _write(lambda c=ckpt: _save_processor(c, out / "processor"), out)
    manifest = make_manifest(ckpt, out, parts)
    _write_manifest(out, manifest)
    del ckpt  # the torch model is not needed any more; INT8 works on the IR
    if int8:
        manifest = _build_int8(out, manifest, calibration, quant, min_agreement, stages)
    return manifest


def _build_int8(
    out: Path,
    manifest: dict[str, Any],
    calibration: Callable[[int], Calibration] | None,
    quant: QuantSettings,
    min_agreement: float | None,
    stages: int,
) -> dict[str, Any]:
    from backend.runtime.blip import Blip
    from model_build import report
    from model_build.accuracy import Control
    from model_build.agreement import gate_value
    from model_build.quantize import Calibration, quantize_parts

    held_out_n = max(4, min(100, quant.subset_size // 5))
    t0 = time.perf_counter()
    log(
        f"[4/{stages}] reading calibration data ({quant.subset_size} + {held_out_n} for accuracy control "
        f"+ {held_out_n} held out)"
    )
    data = (calibration or synthetic)(quant.subset_size + 2 * held_out_n)
    data = with_questions(data)
    if data.warning:
        log(f"WARNING: {data.warning}")
    if data.skipped:
        log(f"      skipped {len(data.skipped)} unreadable image(s), e.g. {next(iter(data.skipped.items()))}")
    # two slices the quantizer never calibrates on: one accuracy control steers by, one the gate measures
    n_held = min(held_out_n, max(1, len(data.samples) // 5))
    calib, validation, held_out = (
        data.samples[: -2 * n_held],
        data.samples[-2 * n_held : -n_held],
        data.samples[-n_held:],
    )
    if not calib:  # too few images for three slices: calibrate on the validation slice too
        calib = validation
    log(
        f"      {data.source}: {len(calib)} calibration samples, {len(validation)} for accuracy control, "
        f"{len(held_out)} held out"
    )

    fp16 = Blip(out, precision="fp16")
    control = Control(fp16, validation, quant.target_agreement)
    log(f"      read in {time.perf_counter() - t0:.1f} s")
    held = f", holding agreement with FP16 at {control.aim:.1%}" if quant.accuracy_control else ""
    log(f"[5/{stages}] quantizing with NNCF{held}")
    xmls = {name: out / entry["files"][0]["path"] for name, entry in manifest["parts"]["fp16"].items()}
    calibration = Calibration(fp16, calib, quant.subset_size, out / "int8")
    int8_parts = quantize_parts(xmls, out / "int8", calibration, quant, control)
    for name, entry in manifest["parts"]["fp16"].items():  # a part's files past its IR (a table) are shared
        int8_parts[name]["files"] += [out / f["path"] for f in entry["files"][2:]]
    parts = {**manifest["parts"], **_hashed(out, {"int8": int8_parts})}
    manifest = {**manifest, "parts": parts, "int8": {"serve": False}}
    _write_manifest(out, manifest)

    log(f"[6/{stages}] comparing FP16 and INT8 on {len(held_out)} held-out samples")
    t0 = time.perf_counter()
    int8 = Blip(out, precision="int8")
    agreement = report.compare(fp16, int8, held_out)
    value = gate_value(agreement)
    threshold = quant.target_agreement if min_agreement is None else min_agreement
    result = {
        "sizes": report.sizes(manifest),
        "latency": report.latency({"fp16": fp16, "int8": int8}, held_out[0]),
        "agreement": agreement,
        "accuracy_control": control.report() if quant.accuracy_control else None,
        "gate": {
            "value": value,
            "threshold": threshold,
            "by": "target agreement" if min_agreement is None else "--min-agreement",
            "passed": value >= threshold,
        },
        "calibration": {
            "source": data.source,
            "samples": len(calib),
            "validation": len(validation),
            "held_out": len(held_out),
            "skipped": data.skipped,
            "warning": data.warning,
        },
        "settings": quant.describe(),
        "device": {"name": fp16.device, "threads": fp16.threads},
    }
    log(f"      compared in {time.perf_counter() - t0:.1f} s")
    log(report.table(result))
    _write(lambda: (out / "report.json").write_text(json.dumps(result, indent=2) + "\n"), out)
    manifest = {
        **manifest,
        "int8": {"serve": result["gate"]["passed"], "gate": result["gate"]},
        "report": result,
    }
    _write_manifest(out, manifest)
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    _write(lambda: (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n"), out)


def export_parts(ckpt: Checkpoint, folder: Path) -> dict[str, dict[str, Any]]:
    """Convert each graph to an FP16-compressed IR in `folder`; returns manifest entries (no hashes yet)."""
    folder.mkdir(parents=True, exist_ok=True)
    graphs = example_graphs(ckpt.model, answers="answer" in ckpt.tasks)
    parts: dict[str, dict[str, Any]] = {}
    for i, (name, (module, example, inputs, outputs)) in enumerate(graphs.items(), 1):
        t0 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            # tracing warns about every Python-level shape check; the graphs' inputs are declared
            # dynamic below and the parity tests prove the result at other shapes
            warnings.simplefilter("ignore")
            ov_model = ov.convert_model(module, example_input=example, input=inputs)
        for port, names in zip(ov_model.outputs, outputs):
            port.get_tensor().set_names({names})
        xml = folder / f"{name}.xml"
        _write(lambda m=ov_model, x=xml: ov.save_model(m, x, compress_to_fp16=True), folder)
        size = xml.with_suffix(".bin").stat().st_size
        log(f"      {i}/{len(graphs)} {name}: {size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
        parts[name] = {"files": [xml, xml.with_suffix(".bin")]}
    if "text_encoder" in parts:  # its word-embedding table, which serving looks up itself (graphs.py)
        table = folder / WORD_TABLE
        weight = ckpt.model.text_encoder.embeddings.word_embeddings.weight.detach().numpy()
        _write(lambda: np.save(table, weight.astype(np.float16)), folder)
        parts["text_encoder"]["files"].append(table)
    return parts


def example_graphs(model: torch.nn.Module, answers: bool = True) -> dict[str, tuple]:
    """name -> (module, example inputs, [(input name, shape, type)], [output names])."""
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    size, width = vcfg.image_size, vcfg.hidden_size
    n_img = (size // vcfg.patch_size) ** 2 + 1
    layers, heads = tcfg.num_hidden_layers, tcfg.num_attention_heads
    head_size = tcfg.hidden_size // heads
    pixels = torch.zeros(2, 3, size, size)
    question = torch.tensor([[tcfg.pad_token_id + 1] * 4] * 2)
    f32, i64 = ov.Type.f32, ov.Type.i64
    graphs: dict[str, tuple] = {
        "vision": (
            VisionEncoder(model.vision_model),
            (pixels,),
            [("pixel_values", [-1, 3, size, size], f32)],
            ["image_embeds"],
        )
    }
    kv_shape = [layers, 2, -1, heads, -1, head_size]
    if answers and hasattr(model, "text_encoder"):
        words = model.text_encoder.embeddings.word_embeddings
        graphs["text_encoder"] = (
            TextEncoder(model.text_encoder),
            (words(question), torch.ones_like(question), torch.zeros(2, n_img, width)),
            [
                ("word_embeds", [-1, -1, tcfg.hidden_size], f32),
                ("attention_mask", [-1, -1], i64),
                ("encoder_states", [-1, -1, width], f32),
            ],
            ["question_embeds"],
        )
    states = model.text_decoder.bert.encoder.layer[0].crossattention.self.key.in_features
    graphs["decoder"] = (
        DecoderStep(model.text_decoder),
        (
            question[:, :1],
            torch.zeros(layers, 2, 2, heads, 3, head_size),
            torch.tensor([2]),
            torch.zeros(2, 5, states),
            torch.ones(2, 5, dtype=torch.int64),
        ),
        [
            ("input_ids", [-1, -1], i64),
            ("past_kv", kv_shape, f32),
            ("past_length", [1], i64),
            ("encoder_states", [-1, -1, states], f32),
            ("cross_mask", [-1, -1], i64),
        ],
        ["logits", "new_kv"],
    )
    return graphs


def image_settings(processor: Any) -> dict[str, Any]:
    ip = processor.image_processor
    size = ip.size
    return {
        "height": int(size["height"]),
        "width": int(size["width"]),
        "resample": int(ip.resample),
        "rescale_factor": float(ip.rescale_factor) if ip.do_rescale else 1.0,
        "mean": [float(x) for x in ip.image_mean] if ip.do_normalize else [0.0, 0.0, 0.0],
        "std": [float(x) for x in ip.image_std] if ip.do_normalize else [1.0, 1.0, 1.0],
    }


def generation_settings(ckpt: Checkpoint) -> dict[str, dict[str, Any]]:
    """Per task: DEFAULT_GENERATION overridden by what the checkpoint's generation config sets."""
    given = ckpt.generation
    settings = {}
    for task in ckpt.tasks:
        s = dict(DEFAULT_GENERATION[task])
        for key in ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "length_penalty"):
            if given.get(key) is not None:
                s[key] = given[key]
        # max_length/min_length count the start token too
        if given.get("max_length") is not None and given.get("max_new_tokens") is None:
            s["max_new_tokens"] = int(given["max_length"]) - 1
        if given.get("min_length") is not None and given.get("min_new_tokens") is None:
            s["min_new_tokens"] = max(int(given["min_length"]) - 1, 0)
        settings[task] = s
    return settings


def make_manifest(ckpt: Checkpoint, out: Path, parts: dict[str, dict[str, dict]]) -> dict[str, Any]:
    tcfg = ckpt.model.config.text_config
    return {
        "format": FORMAT,
        "source": {
            "model": ckpt.source,
            "revision": ckpt.revision,
            "architecture": ckpt.architecture,
            "tasks": ckpt.tasks,
        },
        "tokens": {
            "decoder_start": int(tcfg.bos_token_id),
            "eos": int(tcfg.sep_token_id),
            "pad": int(tcfg.pad_token_id),
        },
        "image": image_settings(ckpt.processor),
        "text": {
            "layers": tcfg.num_hidden_layers,
            "heads": tcfg.num_attention_heads,
            "head_size": tcfg.hidden_size // tcfg.num_attention_heads,
            "max_positions": tcfg.max_position_embeddings,
            "tokenizer": "processor/tokenizer.json",
        },
        "generation": generation_settings(ckpt),
        "parts": _hashed(out, parts),
        "tools": {p: version(p) for p in ("openvino", "nncf", "torch", "transformers")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _hashed(out: Path, parts: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """Manifest entries for parts given as {precision: {part: {"files": [Path, ...]}}}."""
    return {
        precision: {
            name: {**entry, "files": [file_entry(out, Path(f)) for f in entry["files"]]}
            for name, entry in by_part.items()
        }
        for precision, by_part in parts.items()
    }


def _save_processor(ckpt: Checkpoint, folder: Path) -> None:
    ckpt.processor.save_pretrained(folder)
    if not (folder / "tokenizer.json").is_file():
        raise BuildError(
            f"{ckpt.source}: its tokenizer has no fast (tokenizer.json) form, which serving needs"
        )
    for f in folder.iterdir():
        f.chmod(0o644)  # save_pretrained may write 0600; a non-root serving container must read them


def _prepare_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BuildError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise BuildError(f"{out}: folder is not empty; pass --force to replace its build")
        # the manifest goes first so a half-replaced directory is never mistaken for a complete build
        (out / MANIFEST).unlink(missing_ok=True)
        for sub in ("fp16", "int8", "processor", CAPTION_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"{out}: cannot create the output folder: {e.strerror}") from None


def _check_free_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if free < needed:
        raise BuildError(
            f"{out}: only {free / 2**20:.0f} MiB free on that disk, "
            f"the build needs about {needed / 2**20:.0f} MiB"
        )


def _write(action: Callable[[], Any], where: Path) -> Any:
    """Run a file-writing action, turning a full disk into a BuildError that says so."""
    try:
        return action()
    except (OSError, RuntimeError) as e:  # OpenVINO reports failed writes as RuntimeError
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        if full or shutil.disk_usage(where).free < (16 << 20):
            free = shutil.disk_usage(where).free / 2**20
            raise BuildError(
                f"{where}: disk full while writing the model directory ({free:.1f} MiB left); "
                "free space and rebuild"
            ) from None
        raise
