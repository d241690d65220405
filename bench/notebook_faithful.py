"""The OpenVINO notebook's BLIP INT8 pipeline as its users run it: the bench's "vs notebook" reference.

The notebook is openvinotoolkit/openvino_notebooks, notebooks/blip-visual-language-processing/
(blip-visual-language-processing.ipynb and its blip_model.py). This module re-does what it does, step by
step, for any BLIP VQA checkpoint folder:

1. Export (`export`): three IRs with the notebook's own `ov.convert_model(module, example_input=...)`
   calls, no input shapes given (every dimension dynamic), saved with `ov.save_model` (FP16 weights):
   `blip_vision_model` (transformers' vision model, example: one image's pixel values),
   `blip_text_encoder` (transformers' text encoder: question ids and mask, image embeddings and an
   all-ones mask) and `blip_text_decoder_with_past` (transformers' text decoder traced with an example
   self-attention cache of one token: inputs ids, mask, encoder states, encoder mask and one past key
   and value per layer; outputs logits and the new key and value per layer). The decoder is
   stateless and caches self-attention only: every generated token recomputes the cross-attention
   keys and values over all encoder tokens (577 image tokens for a caption).
2. NNCF as in the notebook: calibration rows are (image, question) pairs, images encoded once by the
   FP16 vision IR compiled with default settings; `nncf.quantize(model, dataset,
   model_type=nncf.ModelType.TRANSFORMER)` with every other argument at its default for the vision
   model and for the text encoder; `nncf.compress_weights(model)` (defaults: INT8_ASYM) for the decoder.
3. Inference (`NotebookBlip`): `core.compile_model(xml, device)` with no configuration; the
   transformers text decoder's `forward` is replaced by a function that runs the decoder IR, so that
   transformers' `generate` drives decoding (greedy by default); `generate_answer` runs the vision IR,
   the text encoder IR, then `generate` from the decoder start token with `eos = sep`;
   `generate_caption` runs the vision IR, then `generate` from `[bos]` on the image embeddings (the
   notebook's optional caption prompt is left out: nothing here uses it). Every
   call starts from pixels: a caption and three questions about one image run the vision IR four times.
   `caption(image)` and `answer(image, question)` are the notebook's demo function: BlipProcessor,
   generate, `processor.decode(..., skip_special_tokens=True)`.

Where this differs from the notebook, and why (nothing else does):

- transformers 5 (here 5.24) has no tuple caches: its BLIP text decoder takes a `Cache` object named
  `cache` (was `past_key_values`) and caches cross-attention keys/values too. The notebook traces
  `text_decoder` itself with a nested tuple of past tensors and `config.torchscript = True` (an
  attribute transformers 5 no longer reads). Here a thin module (`DecoderWithPast`) takes the same
  inputs in the same order, builds the self-attention cache from the past tensors and a fresh, empty
  cross-attention cache at every call, runs the unchanged transformers decoder and returns logits and
  the self-attention cache as a flat tuple: the IR computes what the notebook's IR computes
  (tests/test_bench.py: the FP16 IRs executed in f32 decode transformers' own token ids, captions and
  answers). Its cache layers start from a zero-length slice of the first keys instead of
  transformers' empty 1-D tensor, which OpenVINO cannot concatenate on the sequence axis.
- The replaced `forward` is the notebook's `text_decoder_forward` with transformers 5's names: it
  receives generate's `cache` (an empty `DynamicCache` on the first step, which it treats as the
  notebook treats `None`: empty past tensors of batch 1) and returns the new past tensors wrapped in a
  `DynamicCache` (generate 5 requires one; the notebook returned the list of arrays). Wrapping copies
  the self-attention cache once per step (at most ~1.5 MB per step for 20 tokens of a full-size model;
  all of this glue measured ~1% of a full-size caption). generate 5 also drops an all-ones attention
  mask instead of passing it on; the forward rebuilds the one the notebook received (past + new tokens).
- The empty past tensors take the head count and size from the checkpoint's config: the past inputs of
  an IR traced by OpenVINO 2026 leave the heads dimension dynamic, where the notebook read the shape
  from the IR.
- Checkpoint loading: `dtype=torch.float32` (the hub's blip-vqa-base is stored in f32 and transformers 5
  loads the stored dtype; the bench's random checkpoint is stored in FP16).
- Example inputs and calibration data: the notebook traces with its demo image and question, and
  calibrates on the first 300 rows of VQAv2's train split (out of reach here; one row = an image and
  one question, so ~60 distinct images). Here the image and question of the first row, and the same
  synthetic scenes the bench's own build calibrates on (`model_build.calibration.synthetic`), taken
  as rows of (scene, question) in order, as many rows as the bench's --calibration (300).
- Threads: the bench runs every contender on the same number of threads (--threads, default all
  cores). The notebook sets none; OpenVINO's CPU default is one stream on the cores of one socket.
  `NotebookBlip(threads=n)` sets `INFERENCE_NUM_THREADS` as the CPU default of its `ov.Core` before the
  unchanged `compile_model(xml, device)` calls, and `compiled_settings()` reports what each compiled IR
  ended up with, so results.json shows whether that changed anything (on a 2-core machine with the
  default --threads it does not: OpenVINO picks 2 threads by itself). Execution precision is left to
  OpenVINO, as in the notebook: bf16 on CPUs with bf16 instructions, f32 elsewhere.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import nncf
import numpy as np
import openvino as ov
import torch
from PIL import Image
from torch import nn
from transformers import BlipForQuestionAnswering, BlipProcessor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from model_build.calibration import synthetic

# the notebook's file names; "<name>_int8.xml" after NNCF
VISION, TEXT_ENCODER, TEXT_DECODER = "blip_vision_model", "blip_text_encoder", "blip_text_decoder_with_past"
PARTS = (VISION, TEXT_ENCODER, TEXT_DECODER)
SETTINGS = ("PERFORMANCE_HINT", "INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "NUM_STREAMS")


def int8_xml(folder: Path, part: str) -> Path:
    return folder / f"{part}_int8.xml"


# -- export ----------------------------------------------------------------------------------------


class _TraceableLayer(DynamicLayer):
    """transformers' DynamicLayer, started from a zero-length slice of the first keys/values it gets
    instead of an empty 1-D tensor (OpenVINO cannot concatenate that one on the sequence axis)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]


class DecoderWithPast(nn.Module):
    """transformers' BLIP text decoder with the notebook's traced interface:
    (input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, past_key_values) ->
    (logits, key_0, value_0, key_1, ...), past_key_values = ((key, value) per layer) of self-attention.
    The cross-attention cache starts empty at every call: keys and values of the encoder states are
    recomputed for every generated token, as in the notebook's IR."""

    def __init__(self, text_decoder: nn.Module) -> None:
        super().__init__()
        self.text_decoder = text_decoder

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...],
    ) -> tuple[torch.Tensor, ...]:
        self_attention = Cache(layers=[_TraceableLayer() for _ in past_key_values])
        for i, (key, value) in enumerate(past_key_values):
            self_attention.update(key, value, i)
        cross_attention = Cache(layers=[_TraceableLayer() for _ in past_key_values])
        out = self.text_decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            cache=EncoderDecoderCache(self_attention, cross_attention),
            use_cache=True,
            return_dict=True,
        )
        present = out.cache.self_attention_cache.layers
        return (out.logits, *(t for layer in present for t in (layer.keys, layer.values)))


def calibration_rows(n: int) -> list[tuple[Image.Image, str]]:
    """n (image, question) rows from the bench's synthetic scenes, row by row as VQAv2's train[:n]."""
    rows = [(s.image, q) for s in synthetic(n).samples for q in s.questions]
    return rows[:n]


def export(checkpoint: Path, out: Path, calibration: int = 300) -> Path:
    """The notebook's FP16 IRs, then its INT8 IRs, into `out`; returns `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model = BlipForQuestionAnswering.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = BlipProcessor.from_pretrained(checkpoint)
    rows = calibration_rows(calibration)
    t0 = time.perf_counter()
    image, question = rows[0]
    inputs = processor(images=image, text=question, return_tensors="pt")

    vision_model = model.vision_model.eval()
    with torch.no_grad():
        vision_outputs = vision_model(inputs["pixel_values"])
        ov.save_model(
            ov.convert_model(vision_model, example_input=inputs["pixel_values"]), out / f"{VISION}.xml"
        )

    image_embeds = vision_outputs[0]
    example = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "encoder_hidden_states": image_embeds,
        "encoder_attention_mask": torch.ones(image_embeds.size()[:-1], dtype=torch.long),
    }
    with torch.no_grad():
        text_encoder = ov.convert_model(model.text_encoder.eval(), example_input=example)
    ov.save_model(text_encoder, out / f"{TEXT_ENCODER}.xml")

    text_decoder = model.text_decoder.eval()
    text_config = model.config.text_config
    example = {
        "input_ids": torch.tensor([[text_config.bos_token_id]]),
        "attention_mask": torch.tensor([[1]]),
        "encoder_hidden_states": torch.rand((1, 10, text_config.encoder_hidden_size)),
        "encoder_attention_mask": torch.ones((1, 10), dtype=torch.long),
    }
    with torch.no_grad():
        first = text_decoder(**example, use_cache=True)
        layers = first.cache.self_attention_cache.layers
        example["past_key_values"] = tuple((layer.keys, layer.values) for layer in layers)
        decoder = ov.convert_model(DecoderWithPast(text_decoder).eval(), example_input=example)
    ov.save_model(decoder, out / f"{TEXT_DECODER}.xml")
    _log(f"notebook: exported the three IRs in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    core = ov.Core()
    calibration_data = _calibration_data(rows, processor, core.compile_model(out / f"{VISION}.xml", "CPU"))
    for part, key in ((VISION, "vision_model_inputs"), (TEXT_ENCODER, "text_encoder_inputs")):
        dataset = nncf.Dataset(calibration_data, partial(_pick, key))
        quantized = nncf.quantize(
            model=core.read_model(out / f"{part}.xml"),
            calibration_dataset=dataset,
            model_type=nncf.ModelType.TRANSFORMER,
        )
        ov.save_model(quantized, int8_xml(out, part))
    compressed = nncf.compress_weights(core.read_model(out / f"{TEXT_DECODER}.xml"))
    ov.save_model(compressed, int8_xml(out, TEXT_DECODER))
    _log(f"notebook: NNCF on {len(calibration_data)} rows in {time.perf_counter() - t0:.1f} s")
    return out


def _pick(key: str, item: dict[str, Any]) -> Any:
    return item[key]


def _calibration_data(
    rows: list[tuple[Image.Image, str]], processor: BlipProcessor, vision: ov.CompiledModel
) -> list[dict[str, dict[str, np.ndarray]]]:
    """One item per row: the image's pixel values, and the question with the image's FP16 embeddings
    (each image encoded once); grouped by image, in order of first appearance, as in the notebook."""
    by_image: dict[int, dict[str, Any]] = {}
    for image, question in rows:
        if id(image) in by_image:
            inputs = processor(text=question, return_tensors="np")
            info = by_image[id(image)]
        else:
            inputs = processor(images=image, text=question, return_tensors="np")
            pixel_values = inputs["pixel_values"]
            info = by_image[id(image)] = {
                "pixel_values": pixel_values,
                "encoder_hidden_states": vision(pixel_values)[vision.output(0)],
                "text_encoder_inputs": [],
            }
        info["text_encoder_inputs"].append(
            {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        )
    items = []
    for info in by_image.values():
        states = info["encoder_hidden_states"]
        for text in info["text_encoder_inputs"]:
            text["encoder_hidden_states"] = states
            text["encoder_attention_mask"] = np.ones(states.shape[:-1], dtype=int)
            items.append(
                {"vision_model_inputs": {"pixel_values": info["pixel_values"]}, "text_encoder_inputs": text}
            )
    return items


# -- inference -------------------------------------------------------------------------------------


def text_decoder_forward(
    ov_text_decoder_with_past: ov.CompiledModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    cache: Cache | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    empty_past: tuple[int, int] = (0, 0),
    **kwargs: Any,
) -> CausalLMOutputWithCrossAttentions:
    """One generation step on the decoder IR, in place of the transformers decoder's forward.
    `empty_past` is (heads, head size) for the first step's empty past tensors."""
    past_length = 0 if cache is None else cache.get_seq_length()
    if attention_mask is None:  # transformers 5's generate drops an all-ones mask; the IR takes one
        attention_mask = torch.ones((input_ids.shape[0], past_length + input_ids.shape[1]), dtype=torch.long)
    inputs = [input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask]
    if past_length == 0:
        heads, head_size = empty_past
        n_past = len(ov_text_decoder_with_past.inputs) - 4
        inputs.extend(np.zeros((1, heads, 0, head_size), np.float32) for _ in range(n_past))
    else:
        inputs.extend(t for layer in cache.layers for t in (layer.keys, layer.values))
    outputs = ov_text_decoder_with_past(inputs)
    values = list(outputs.values())
    past = [torch.from_numpy(v) for v in values[1:]]
    return CausalLMOutputWithCrossAttentions(
        logits=torch.from_numpy(values[0]),
        cache=DynamicCache(ddp_cache_data=list(zip(past[::2], past[1::2]))),
    )


class NotebookBlip:
    """The notebook's OVBlipModel over its INT8 IRs, plus its demo function (`caption`, `answer`).

    `threads`: the bench's one setting, the same thread count for every contender. `precision="fp16"`
    with `config={"INFERENCE_PRECISION_HINT": "f32"}` runs the FP16 IRs exactly, for tests that hold
    the export to transformers; the bench passes neither (INT8 IRs, OpenVINO's defaults).
    """

    def __init__(
        self,
        checkpoint: Path,
        folder: Path,
        threads: int | None = None,
        device: str = "CPU",
        precision: str = "int8",
        config: dict[str, Any] | None = None,
    ) -> None:
        core = ov.Core()
        if threads:
            core.set_property(device, {"INFERENCE_NUM_THREADS": threads})
        xml = partial(int8_xml, folder) if precision == "int8" else lambda part: folder / f"{part}.xml"
        settings = config or {}
        self.vision_model = core.compile_model(xml(VISION), device, settings)
        self.vision_model_out = self.vision_model.output(0)
        self.text_encoder = core.compile_model(xml(TEXT_ENCODER), device, settings)
        self.text_encoder_out = self.text_encoder.output(0)
        self.ov_text_decoder_with_past = core.compile_model(xml(TEXT_DECODER), device, settings)

        model = BlipForQuestionAnswering.from_pretrained(checkpoint, dtype=torch.float32)
        self.config = model.config
        self.decoder_start_token_id = model.decoder_start_token_id
        text_config = model.config.text_config
        heads = text_config.num_attention_heads
        self.text_decoder = model.text_decoder.eval()
        self.text_decoder.forward = partial(
            text_decoder_forward,
            ov_text_decoder_with_past=self.ov_text_decoder_with_past,
            empty_past=(heads, text_config.hidden_size // heads),
        )
        self.processor = BlipProcessor.from_pretrained(checkpoint)

    def compiled_settings(self) -> dict[str, dict[str, int | str]]:
        """What OpenVINO chose for each compiled IR (hint, execution precision, threads, streams)."""
        parts = {
            VISION: self.vision_model,
            TEXT_ENCODER: self.text_encoder,
            TEXT_DECODER: self.ov_text_decoder_with_past,
        }
        return {
            part: {k: _plain(compiled.get_property(k)) for k in SETTINGS} for part, compiled in parts.items()
        }

    def generate_answer(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        **generate_kwargs,
    ) -> torch.Tensor:
        image_embed = self.vision_model(pixel_values.detach().numpy())[self.vision_model_out]
        image_attention_mask = np.ones(image_embed.shape[:-1], dtype=int)
        question_embeds = self.text_encoder(
            [input_ids.detach().numpy(), attention_mask.detach().numpy(), image_embed, image_attention_mask]
        )[self.text_encoder_out]
        question_attention_mask = np.ones(question_embeds.shape[:-1], dtype=int)
        bos_ids = np.full((question_embeds.shape[0], 1), fill_value=self.decoder_start_token_id)
        return self.text_decoder.generate(
            input_ids=torch.from_numpy(bos_ids),
            eos_token_id=self.config.text_config.sep_token_id,
            pad_token_id=self.config.text_config.pad_token_id,
            encoder_hidden_states=torch.from_numpy(question_embeds),
            encoder_attention_mask=torch.from_numpy(question_attention_mask),
            **generate_kwargs,
        )

    def generate_caption(self, pixel_values: torch.Tensor, **generate_kwargs) -> torch.Tensor:
        batch_size = pixel_values.shape[0]
        image_embeds = self.vision_model(pixel_values.detach().numpy())[self.vision_model_out]
        image_attention_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        text_config = self.config.text_config
        input_ids = torch.LongTensor([[text_config.bos_token_id, text_config.eos_token_id]]).repeat(
            batch_size, 1
        )
        input_ids[:, 0] = text_config.bos_token_id
        return self.text_decoder.generate(
            input_ids=input_ids[:, :-1],
            eos_token_id=text_config.sep_token_id,
            pad_token_id=text_config.pad_token_id,
            attention_mask=None,
            encoder_hidden_states=torch.from_numpy(image_embeds),
            encoder_attention_mask=image_attention_mask,
            **generate_kwargs,
        )

    # the notebook's demo: image (and question) in, text out; by default max_length=20, as in the notebook

    def caption(self, image: Image.Image, **generate_kwargs) -> str:
        inputs = self.processor(images=image, return_tensors="pt")
        out = self.generate_caption(inputs["pixel_values"], **(generate_kwargs or {"max_length": 20}))
        return self.processor.decode(out[0], skip_special_tokens=True)

    def answer(self, image: Image.Image, question: str, **generate_kwargs) -> str:
        inputs = self.processor(images=image, text=question, return_tensors="pt")
        out = self.generate_answer(**inputs, **(generate_kwargs or {"max_length": 20}))
        return self.processor.decode(out[0], skip_special_tokens=True)

    def encode(self, image: Image.Image) -> np.ndarray:
        """The vision IR alone, from a PIL image (the bench's "vision" workload)."""
        pixel_values = self.processor(images=image, return_tensors="pt")["pixel_values"]
        return self.vision_model(pixel_values.detach().numpy())[self.vision_model_out]


def _plain(value: Any) -> int | str:
    """A compiled model's property for JSON: ints stay ints, ov.Type as "bf16"/"f32", enums as "LATENCY"."""
    if isinstance(value, int):
        return value
    return value.to_string() if isinstance(value, ov.Type) else str(value)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
