"""BLIP on OpenVINO: captions, answers and ranked choices for batches of images. No torch.

    blip = Blip("models/tiny-blip")
    embeds = blip.encode(images)                # the vision encoder runs once per image ...
    blip.caption(embeds)                        # ... for all of that image's asks
    blip.answer(embeds, [["what colour is the circle?"], ...])
    blip.caption_and_answer(embeds, [["what colour is it?"]])  # both; one image's decoded together
    blip.rank(embeds, "what shape is it?", ["circle", "square"])

Scores are in [0, 1]. A generated text's score is the geometric mean of the probabilities the
model gave its tokens (end-of-text included): 0.9 means the model was, on average, 90% sure of
each token it wrote. A ranked choice's score is the candidate's share of the probability the
model gives all candidates (a softmax over their total log-probabilities).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from PIL import Image

from backend.runtime.generate import Settings, beam_search, greedy, log_softmax
from backend.runtime.manifest import Manifest, load_manifest
from backend.runtime.memory import release_mapped_files, return_freed_memory
from backend.runtime.preprocess import TextCodec, pixel_values

Images = Sequence[Image.Image] | np.ndarray  # PIL images, or image embeddings from `Blip.encode`


@dataclass(frozen=True)
class Batches:
    """Images (or questions) per call of each part: memory bounded for large calls, at the speed measured
    on 2 cores with a full-size model. OpenVINO keeps each part's buffers at the size of the largest batch
    it has run.

    - vision: the same time per image one, two or four at a time (16 images: 1.20, 1.18, 1.16 s on an
      AMX Xeon); one at a time peaked 27 MiB lower over three 16-task requests (bench/memory.py).
    - caption: images captioned together; the decoder reads each one's embeddings (577 x 768 floats,
      1.8 MB) at every step. 16 images took 2.24 s one at a time, 1.14 s four at a time, 0.98 s eight
      and 0.95 s sixteen at a time, with the same peak (bench/throughput.py's batch_* variants).
    - answer: questions decoded together (their cross-attention holds the question's tokens only).

    The question encoder takes one image's questions per call, attending to one copy of its embeddings.
    """

    vision: int = 1
    caption: int = 8
    answer: int = 16


RANK_ELEMENTS = 16 << 20  # logits floats per ranking chunk


@dataclass(frozen=True)
class Generated:
    text: str
    score: float
    tokens: list[int]


@dataclass(frozen=True)
class Ranked:
    text: str
    score: float
    scores: dict[str, float]


# the group size of the decoder's on-the-fly activation quantization (ov_config says why)
DECODER_ACTIVATION_GROUP = "128"


def ov_config(
    device: str, threads: int | None, inference_precision: str | None, part: str | None = None
) -> dict[str, Any]:
    """OpenVINO compile options (of the part named `part`, when given). On CPU the execution precision is
    f32 unless asked otherwise.

    Measured (bench/inference_precision.py, 2 cores with bf16 instructions, full-size BLIP): INT8
    builds run fastest in f32 (bf16 took 1.1-1.4x longer); FP16 builds run 1.5-1.8x faster in bf16, but
    bf16 changed 1 of 300 test-model captions, and FP16 is the fallback and the reference INT8 is
    gated against, so it stays exact (token-identical to PyTorch) unless `inference_precision="bf16"`.

    The decoder's cross-attention (model_build/graphs.py, `_attend_states`) runs its two matrix
    products as oneDNN MatMuls: the CPU plugin's fused attention kernel (a "snippets" subgraph, made for
    heads of 64-128 wide) took 0.47 ms per layer on their 768-wide rows, 4x the two MatMuls.

    The decoder's INT8/INT4 weights multiply activations the CPU plugin quantizes on the fly, in groups of
    DECODER_ACTIVATION_GROUP values instead of its default 32: full-size INT8 on 2 AMX cores, a step at
    batch 1 took 6.7 instead of 7.1 ms, at 4 rows 8.9 instead of 9.7, at 16 rows 11.7 instead of 14.5
    (256: no faster; 768: slower at 16 rows; none: 9.7, 13.5, 30.2), and 16 tasks ran at 5.95 instead of
    5.63 tasks/s (bench/throughput.py --only default,dq_32). The agreement with PyTorch is `make
    quality`'s, measured with it (README, "Quality").
    """
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    kind = device.split(":")[0].split(".")[0]
    if kind == "CPU":
        config["INFERENCE_PRECISION_HINT"] = inference_precision or "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if part == "decoder":
            config["SNIPPETS_MODE"] = "DISABLE"
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = DECODER_ACTIVATION_GROUP
    elif inference_precision and kind == "GPU":
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    return config


def encode_images(
    vision: ov.CompiledModel,
    images: Sequence[Image.Image],
    image_settings: dict[str, Any],
    batch: int = Batches.vision,
) -> np.ndarray:
    """Images -> image embeddings [N, S, E] with a compiled vision part, `batch` images per call."""
    chunks = [
        vision.create_infer_request().infer(
            {"pixel_values": pixel_values(images[i : i + batch], image_settings)},
            share_inputs=True,
            share_outputs=True,
        )[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0, 0), np.float32)


# tokens a decoding's self-attention cache holds at first (full-size: 0.7 MB per row and 10 tokens)
CACHE_TOKENS = 32


class Blip:
    """A model directory built by `blip-build`, compiled for one OpenVINO device."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "CPU",
        precision: str = "auto",
        threads: int | None = None,
        inference_precision: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        return_freed_memory()  # the arrays a call frees go back to the system (backend/runtime/memory.py)
        self.manifest: Manifest = load_manifest(model_dir)
        # captions come from the paired captioning checkpoint when the directory has one (its own vision
        # encoder and gate), from this checkpoint's decoder otherwise
        # no reference to itself: a Blip (and the compiled parts it holds) is freed the moment it is dropped,
        # not at some later garbage collection
        self._paired: Blip | None = None
        if self.manifest.caption_dir is not None:
            self._paired = Blip(
                self.manifest.caption_dir, device, precision, threads, inference_precision, cache_dir
            )
        if precision == "auto":
            precision = self.manifest.served_precision
        self.device, self.precision, self.threads = device, precision, threads
        self.inference_precision = inference_precision
        self.batches = Batches()
        if precision not in self.manifest.precisions:
            raise ValueError(
                f"{model_dir} has no {precision} build (has {', '.join(self.manifest.precisions)})"
            )
        m = self.manifest.data
        self.tokens = m["tokens"]
        self.image_settings = m["image"]
        self.tasks = self.manifest.tasks
        text = m["text"]
        self.text_codec = TextCodec(
            self.manifest.model_dir / text["tokenizer"], self.tokens["pad"], text["max_positions"]
        )
        self.generation = {task: Settings(**s) for task, s in m["generation"].items()}
        self._cache_dims = (text["layers"], text["heads"], text["head_size"])

        core = ov.Core()
        if cache_dir:
            core.set_property({"CACHE_DIR": str(cache_dir)})
        self._parts = {
            part: core.compile_model(
                self.manifest.part_xml(precision, part),
                device,
                ov_config(device, threads, inference_precision, part),
            )
            for part in m["parts"][precision]
        }
        # mapped, not read: a question reads ~10 rows of the table's 30524
        table = self.manifest.part_table(precision, "text_encoder") if "text_encoder" in self._parts else None
        self._words = np.load(table, mmap_mode="r") if table else None

    def with_parts(self, parts: dict[str, ov.CompiledModel]) -> Blip:
        """A copy of this Blip that runs the given compiled parts instead of its own (the others are
        shared): how model_build measures a candidate INT8 part inside the whole pipeline."""
        unknown = set(parts) - set(self._parts)
        if unknown:
            raise ValueError(f"no part(s) {', '.join(sorted(unknown))} (has {', '.join(self._parts)})")
        other = copy.copy(self)
        other._parts = {**self._parts, **parts}
        return other

    @property
    def captioner(self) -> Blip:
        """The Blip that writes captions: the paired captioning checkpoint's, or this one."""
        return self._paired or self

    @property
    def model_version(self) -> str:
        """What Label Studio stores with each prediction of this build (see Manifest.model_version)."""
        own = self.manifest.model_version(self.precision)
        return own if self.captioner is self else f"{own}+{self.captioner.model_version}"

    def use(self, batches: Batches) -> None:
        """Runs every later call with these batch sizes (the paired caption model's too)."""
        self.batches = self.captioner.batches = batches

    @property
    def embeds_bytes(self) -> int:
        """The bytes of one image's embeddings (f32), the unit backend/annotate/budget.py counts memory in:
        1.8 MB on a full-size model (577 image tokens x 768)."""
        shape = self._parts["vision"].output(0).get_partial_shape()
        return shape[1].get_length() * shape[2].get_length() * 4

    @property
    def encoder_key(self) -> str:
        """Names what this Blip's vision encoder makes of an image (the build, its precision and where and
        how it runs): embeddings kept under this key are the ones `encode` would compute again."""
        own = self.manifest.model_version(self.precision)
        return f"{own}/{self.device}/{self.inference_precision or 'default'}"

    def warm_up(self) -> int:
        """Runs every part once on a blank image and gives back the pages of the weight files, which
        OpenVINO no longer reads once a part has run (backend/runtime/memory.py); returns the bytes of
        the weight files released. A server calls it after loading: the first request no longer pays for
        the parts' first inference, and RSS no longer holds the weights twice."""
        blips = [self] if self.captioner is self else [self, self.captioner]
        files = [
            blip.manifest.part_xml(blip.precision, part).with_suffix(".bin")
            for blip in blips
            for part in blip._parts
        ]
        for blip in blips:  # each part's pages go once it has run: the weights are never all held twice
            size = blip.image_settings["width"], blip.image_settings["height"]
            embeds = blip.encode([Image.new("RGB", size)])
            release_mapped_files(files)
            if blip.captioner is blip and "caption" in blip.tasks:
                blip.caption(embeds, max_new_tokens=2)
                release_mapped_files(files)
            if "answer" in blip.tasks:
                blip.answer(embeds, [["what is it?"]], max_new_tokens=2)
                release_mapped_files(files)
                blip.rank(embeds, "what is it?", ["yes", "no"])
        return release_mapped_files(files)

    # -- the parts -------------------------------------------------------------------------------

    def _run(self, part: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        # a request per call, whose output array we keep instead of copying it (rank's logits run to
        # RANK_ELEMENTS floats; format 3's 42 MB keys/values per image had cost 8 ms of a 42 ms call to copy)
        request = self._parts[part].create_infer_request()
        return request.infer(inputs, share_inputs=True, share_outputs=True)[0]

    def encode(self, images: Images) -> np.ndarray:
        """Images -> image embeddings [N, S, E] (pass them to caption/answer/rank to reuse them)."""
        if isinstance(images, np.ndarray):
            return images
        return encode_images(self._parts["vision"], images, self.image_settings, self.batches.vision)

    def _decode(
        self, prompt: np.ndarray, states: np.ndarray, mask: np.ndarray, settings: Settings | list[Settings]
    ) -> list:
        """Generates after `prompt` [B, T] attending to `states` [B or 1, S, C] (image or question embeddings;
        one row of them is shared by all rows, each attending to what its row of `mask` selects)."""
        request = self._parts["decoder"].create_infer_request()

        def step(
            ids: np.ndarray, past: np.ndarray, n_past: int, s: np.ndarray, m: np.ndarray
        ) -> tuple[np.ndarray, np.ndarray]:
            # share_inputs: the states are the same at every step, and the cache is written in place between
            # steps; share_outputs: the search reads a step's outputs before the next one overwrites them
            out = request.infer(
                {
                    "input_ids": ids,
                    "past_kv": past,
                    "past_length": np.array([n_past], dtype=np.int64),
                    "encoder_states": s,
                    "cross_mask": m,
                },
                share_inputs=True,
                share_outputs=True,
            )
            return out["logits"], out["new_kv"]

        per_row = [settings] if isinstance(settings, Settings) else settings
        # the prompt and every new token but the last go through the decoder; a long max_new_tokens starts
        # smaller (most decodings end well before it) and the cache doubles if it must
        capacity = prompt.shape[1] + min(max(s.max_new_tokens for s in per_row), CACHE_TOKENS) - 1
        past = np.zeros(self._past_shape(prompt.shape[0], capacity), dtype=np.float32)
        beams = settings.num_beams if isinstance(settings, Settings) else 1
        search = greedy if beams == 1 else beam_search
        return search(step, prompt, past, np.ascontiguousarray(states), mask, self.tokens["eos"], settings)

    def _settings(self, task: str, overrides: dict[str, Any]) -> Settings:
        if task not in self.generation:
            raise ValueError(f"this model cannot {task} (it supports: {', '.join(self.tasks)})")
        return replace(self.generation[task], **overrides)

    # -- the public calls ------------------------------------------------------------------------

    def caption(self, images: Images, prompt: str | None = None, **generation: Any) -> list[Generated]:
        """One caption per image, optionally continuing `prompt` (e.g. "a picture of"); by the paired
        caption model when there is one (`self.captioner`)."""
        if self.captioner is not self:
            if isinstance(images, np.ndarray):
                raise ValueError(
                    "captions come from the paired caption model, with its own vision encoder: pass images, "
                    "or embeddings from blip.captioner.encode() to blip.captioner.caption()"
                )
            return self.captioner.caption(images, prompt, **generation)
        settings = self._settings("caption", generation)
        embeds = self.encode(images)
        start = [self.tokens["decoder_start"]]
        # like transformers: the prompt's [CLS] becomes the decoder start and its closing [SEP] is dropped
        prompt_ids = start + (self.text_codec.ids(prompt)[1:-1] if prompt else [])
        results: list[Generated] = []
        for i in range(0, len(embeds), self.batches.caption):
            chunk = embeds[i : i + self.batches.caption]
            ids = np.tile(np.asarray(prompt_ids, dtype=np.int64), (len(chunk), 1))
            mask = np.ones(chunk.shape[:2], dtype=np.int64)
            for seq in self._decode(ids, chunk, mask, settings):
                results.append(self._generated(prompt_ids[1:] + seq.tokens, seq.token_logprobs))
        return results

    def answer(
        self, images: Images, questions: Sequence[Sequence[str]], **generation: Any
    ) -> list[list[Generated]]:
        """questions[i] are asked of image i; returns the answers in the same nesting."""
        settings = self._settings("answer", generation)
        embeds = self.encode(images)
        if len(questions) != len(embeds):
            raise ValueError(f"{len(embeds)} images but {len(questions)} question lists")
        pairs = [(i, q) for i, qs in enumerate(questions) for q in qs]
        if not pairs:
            return [[] for _ in questions]
        q_embeds, q_mask = self._questions(embeds, [i for i, _ in pairs], [q for _, q in pairs])
        flat: list[Generated] = []
        for c in range(0, len(pairs), self.batches.answer):
            chunk = slice(c, c + self.batches.answer)
            start = np.full((len(pairs[chunk]), 1), self.tokens["decoder_start"], dtype=np.int64)
            for seq in self._decode(start, q_embeds[chunk], q_mask[chunk], settings):
                flat.append(self._generated(seq.tokens, seq.token_logprobs))
        it = iter(flat)
        return [[next(it) for _ in qs] for qs in questions]

    def caption_and_answer(
        self,
        images: Images,
        questions: Sequence[Sequence[str]],
        prompt: str | None = None,
        caption: dict[str, Any] | None = None,
        answer: dict[str, Any] | None = None,
    ) -> tuple[list[Generated], list[list[Generated]]]:
        """`caption(images, prompt, **caption)` and `answer(images, questions, **answer)` in one call, with
        the same results. One image's caption and answers (greedy, no prompt) are decoded in one batch over
        its embeddings and its questions' side by side: a decoder step costs nearly the same for four rows
        as for one (10.6 ms, against 7.7 for the caption's alone and 7.0 for three answers', full-size)."""
        caption, answer = caption or {}, answer or {}
        c_settings, a_settings = self._settings("caption", caption), self._settings("answer", answer)
        if self.captioner is not self:
            return self.caption(images, prompt, **caption), self.answer(images, questions, **answer)
        embeds = self.encode(images)
        greedy_both = c_settings.num_beams == a_settings.num_beams == 1
        if (
            len(embeds) != 1
            or len(questions) != 1
            or not questions[0]
            or prompt is not None
            or not greedy_both
        ):
            return self.caption(embeds, prompt, **caption), self.answer(embeds, questions, **answer)
        n = len(questions[0])
        q_embeds, q_mask = self._questions(embeds, [0] * n, questions[0])
        image_tokens, width = embeds.shape[1], q_mask.shape[1]
        states = np.concatenate([embeds[0], q_embeds.reshape(n * width, -1)])[None]
        mask = np.zeros((1 + n, states.shape[1]), dtype=np.int64)
        mask[0, :image_tokens] = 1
        for i in range(n):
            mask[1 + i, image_tokens + i * width : image_tokens + (i + 1) * width] = q_mask[i]
        start = np.full((1 + n, 1), self.tokens["decoder_start"], dtype=np.int64)
        seqs = self._decode(start, states, mask, [c_settings] + [a_settings] * n)
        generated = [self._generated(seq.tokens, seq.token_logprobs) for seq in seqs]
        return generated[:1], [generated[1:]]

    def rank(self, images: Images, question: str, candidates: Sequence[str]) -> list[Ranked]:
        """Per image, the candidate answer to `question` the model finds most likely, with all scores."""
        if not candidates:
            raise ValueError("rank needs at least one candidate")
        embeds = self.encode(images)
        cand_ids = [[self.tokens["decoder_start"], *self.text_codec.ids(c)[1:]] for c in candidates]
        width = max(len(c) for c in cand_ids)
        seqs = np.full((len(cand_ids), width), self.tokens["pad"], dtype=np.int64)
        for j, c in enumerate(cand_ids):
            seqs[j, : len(c)] = c
        valid = seqs[:, 1:] != self.tokens["pad"]
        n_cand = len(candidates)
        per_chunk = max(1, RANK_ELEMENTS // (n_cand * width * self._vocab_size()))
        results: list[Ranked] = []
        for i in range(0, len(embeds), per_chunk):
            idx = list(range(i, min(i + per_chunk, len(embeds))))
            q_embeds, q_mask = self._questions(embeds, idx, [question] * len(idx))
            rows = np.repeat(np.arange(len(idx)), n_cand)
            logits = self._run(
                "decoder",
                {
                    "input_ids": np.tile(seqs, (len(idx), 1)),
                    "past_kv": np.zeros(self._past_shape(len(rows), 0), dtype=np.float32),
                    "past_length": np.zeros(1, dtype=np.int64),
                    "encoder_states": q_embeds[rows],
                    "cross_mask": q_mask[rows],
                },
            )
            lp = log_softmax(logits[:, :-1].astype(np.float32))
            target = np.tile(seqs[:, 1:], (len(idx), 1))
            token_lp = np.take_along_axis(lp, target[..., None], axis=-1)[..., 0]
            total = (token_lp * np.tile(valid, (len(idx), 1))).sum(-1).reshape(len(idx), n_cand)
            probs = np.exp(log_softmax(total))
            for p in probs:
                best = int(p.argmax())
                results.append(Ranked(candidates[best], float(p[best]), dict(zip(candidates, p.tolist()))))
        return results

    # -- helpers ---------------------------------------------------------------------------------

    def _questions(
        self, embeds: np.ndarray, image_index: Sequence[int], questions: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Question i about image image_index[i] -> (question embeddings [B, Q, E], mask [B, Q]), the
        questions about one image (consecutive in `questions`) encoded in one call over its embeddings."""
        if "answer" not in self.tasks:
            raise ValueError("this model only captions (its checkpoint has no question encoder)")
        ids, mask = self.text_codec.encode(questions)  # one width for all, so the chunks concatenate
        chunks, start = [], 0
        while start < len(questions):
            end = start + 1
            while end < len(questions) and image_index[end] == image_index[start]:
                end += 1
            img = image_index[start]
            inputs = {"word_embeds": self.embed_words(ids[start:end]), "attention_mask": mask[start:end]}
            chunks.append(self._run("text_encoder", inputs | {"encoder_states": embeds[img : img + 1]}))
            start = end
        return np.concatenate(chunks), mask

    def embed_words(self, ids: np.ndarray) -> np.ndarray:
        """Question token ids [B, Q] -> their rows of the question encoder's word-embedding table
        [B, Q, E], float32: the text encoder's first input (model_build/graphs.py says why it is not in
        the IR)."""
        if self._words is None:
            raise ValueError("this model only captions (its checkpoint has no question encoder)")
        return self._words[ids].astype(np.float32)

    def _past_shape(self, batch: int, capacity: int) -> tuple[int, ...]:
        layers, heads, head_size = self._cache_dims
        return (layers, 2, batch, heads, capacity, head_size)

    def _vocab_size(self) -> int:
        return self.text_codec.tokenizer.get_vocab_size()

    def _generated(self, tokens: list[int], logprobs: list[float]) -> Generated:
        score = float(np.exp(np.mean(logprobs))) if logprobs else 0.0
        return Generated(self.text_codec.decode(tokens), score, tokens)
