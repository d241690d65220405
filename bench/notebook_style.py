"""The notebook's pipeline shape on this project's parts: where the notebook's time goes.

Three IRs, as in the OpenVINO notebook ("Visual Question Answering and Image Captioning using BLIP and
OpenVINO"): vision encoder, text encoder, and a text decoder with a self-attention cache that takes
the encoder states at every step, so each generated token recomputes the cross-attention keys and
values over all 577 image tokens (or the question tokens). Every call runs the vision encoder
again: a caption and three questions about one image encode that image four times.

Unlike the notebook as users run it (bench/notebook_faithful.py, the bench's "notebook" contender),
the encoders are the same NNCF-quantized IRs this project builds (same calibration, same settings),
the decoder is this project's re-expressed
decoder step with the notebook's cross-attention (keys and values projected from the encoder states at
every step; INT8_ASYM weight compression), every
IR is compiled with this project's settings (f32 execution, LATENCY hint), and decoding is a plain
numpy greedy loop instead of transformers' `generate`. Between the notebook and this project, it
separates what the pipeline's shape costs from what the notebook's export, NNCF settings, default
compile settings and `generate` cost.
"""

from __future__ import annotations

from pathlib import Path

import nncf
import numpy as np
import openvino as ov
import torch
from PIL import Image
from torch import nn

from backend.runtime.blip import ov_config
from backend.runtime.manifest import load_manifest
from backend.runtime.preprocess import TextCodec, pixel_values
from model_build.graphs import DecoderStep, _attend, _heads, _merge_heads


class DecoderWithCrossAttention(DecoderStep):
    """(input_ids, past_kv, past_length, encoder_states, cross_mask) -> (logits, new_kv): every layer's
    keys and values of the encoder states recomputed at every step, as the notebook's decoder does."""

    @staticmethod
    def cross_attend(
        attention: nn.Module, q: torch.Tensor, states: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        heads = q.shape[2]
        k, v = _heads(attention.key(states), heads), _heads(attention.value(states), heads)
        return _merge_heads(_attend(q.transpose(1, 2), k, v, bias))


def export_decoder(model: nn.Module, out: Path) -> Path:
    """The notebook's decoder IR, FP16 weights compressed to INT8_ASYM; returns the xml path."""
    cfg = model.config.text_config
    layers, heads, width = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size
    head_size = width // heads
    f32, i64 = ov.Type.f32, ov.Type.i64
    with torch.no_grad():
        ov_model = ov.convert_model(
            DecoderWithCrossAttention(model.text_decoder).eval(),
            example_input=(
                torch.ones(2, 1, dtype=torch.int64),
                torch.zeros(layers, 2, 2, heads, 3, head_size),
                torch.tensor([2]),
                torch.zeros(2, 5, model.config.vision_config.hidden_size),
                torch.ones(2, 5, dtype=torch.int64),
            ),
            input=[
                ("input_ids", [-1, -1], i64),
                ("past_kv", [layers, 2, -1, heads, -1, head_size], f32),
                ("past_length", [1], i64),
                ("encoder_states", [-1, -1, model.config.vision_config.hidden_size], f32),
                ("cross_mask", [-1, -1], i64),
            ],
        )
    for port, name in zip(ov_model.outputs, ("logits", "new_kv")):
        port.get_tensor().set_names({name})
    ov_model = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    out.mkdir(parents=True, exist_ok=True)
    xml = out / "decoder_with_cross_attention.xml"
    ov.save_model(ov_model, xml, compress_to_fp16=True)
    return xml


class NotebookPipeline:
    """caption(image) and answer(image, question), each a separate call starting from pixels."""

    def __init__(self, model_dir: Path, decoder_xml: Path, threads: int | None) -> None:
        manifest = load_manifest(model_dir)  # tokenizer, image settings, token ids; no model compiled
        m = manifest.data
        text, self.image_settings, self.tokens = m["text"], m["image"], m["tokens"]
        self.codec = TextCodec(
            manifest.model_dir / text["tokenizer"], self.tokens["pad"], text["max_positions"]
        )
        self.cache_dims = (text["layers"], text["heads"], text["head_size"])
        core = ov.Core()
        config = ov_config("CPU", threads, None)
        xml = lambda part: manifest.part_xml("int8", part)  # noqa: E731
        self.vision = core.compile_model(xml("vision"), "CPU", config)
        self.text_encoder = core.compile_model(xml("text_encoder"), "CPU", config)
        self.words = np.load(manifest.part_table("int8", "text_encoder"), mmap_mode="r")  # its table's rows
        self.decoder = core.compile_model(decoder_xml, "CPU", config)

    def _greedy(self, states: np.ndarray, mask: np.ndarray, new_tokens: int, stop: bool) -> list[int]:
        request = self.decoder.create_infer_request()
        layers, heads, head_size = self.cache_dims
        past = np.zeros((layers, 2, 1, heads, new_tokens, head_size), np.float32)  # the model's cache scheme
        ids = np.array([[self.tokens["decoder_start"]]], np.int64)
        out: list[int] = []
        for t in range(new_tokens):  # the benchmark forces the length (stop=False) for every contender
            result = request.infer(
                {
                    "input_ids": ids,
                    "past_kv": past,
                    "past_length": np.array([t]),
                    "encoder_states": states,
                    "cross_mask": mask,
                }
            )
            logits = result["logits"]
            past[:, :, :, :, t : t + 1] = result["new_kv"]
            next_id = int(logits[0, -1].argmax())
            out.append(next_id)
            if stop and next_id == self.tokens["eos"]:
                break
            ids = np.array([[next_id]], np.int64)
        return out

    def encode(self, image: Image.Image) -> np.ndarray:
        return self.vision({"pixel_values": pixel_values([image], self.image_settings)})[0]

    def caption(self, image: Image.Image, new_tokens: int = 20, stop: bool = False) -> str:
        embeds = self.encode(image)
        mask = np.ones(embeds.shape[:2], np.int64)
        return self.codec.decode(self._greedy(embeds, mask, new_tokens, stop))

    def answer(self, image: Image.Image, question: str, new_tokens: int = 10, stop: bool = False) -> str:
        embeds = self.encode(image)
        ids, mask = self.codec.encode([question])
        q = self.text_encoder(
            {"word_embeds": self.words[ids].astype(np.float32), "attention_mask": mask}
            | {"encoder_states": embeds}
        )[0]
        return self.codec.decode(self._greedy(q, mask, new_tokens, stop))
