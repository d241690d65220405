"""Train a tiny BLIP from scratch on synthetic scenes and save it as a transformers checkpoint.

    python -m model_build.tiny_blip.train [--shape base|wide] [--out DIR] [--steps N] [--seed S]

One ``BlipForQuestionAnswering`` learns both tasks: every step runs the vision tower once per image, then
the answer decoder captions the image tokens directly and, for each question about the image, decodes the
answer from the question encoder's output (the same wiring ``generate`` uses at inference).
Training scenes are drawn fresh each step from ``random.Random(TRAIN_SEED)``; ``--seed`` seeds the weights.
``--shape`` picks one of ``PRESETS``: ``base`` is the model in ``checkpoint/``, ``wide`` the one in
``checkpoint-wide/`` (another width, head size, depth, image size and token order, same data).
The held-out evaluation at the end loads the saved folder back and exits non-zero if a target is missed.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    BlipProcessor,
)

from . import CHECKPOINT_DIR, WIDE_CHECKPOINT_DIR
from .evaluate import evaluate
from .synthetic import (
    HELD_OUT_SEED,
    IMAGE_SIZE,
    QUESTION_TYPES,
    TRAIN_SEED,
    VOCABULARY,
    Scene,
    make_scene,
    make_scenes,
)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_TEXT_POSITIONS = 64

DEFAULT_STEPS = 1500
BATCH_SIZE = 64
PEAK_LR = 2e-3
WARMUP_STEPS = 100
WEIGHT_DECAY = 0.01
# Answers converge well before captions (which must count and order groups), so captions weigh more.
CAPTION_LOSS_WEIGHT = 2.0
HELD_OUT_SCENES = 500
LOG_EVERY = 100

ANSWER_TARGET = 0.97
PER_KIND_TARGET = 0.95
CAPTION_TARGET = 0.95


def shuffled_tokens(seed: int, special_ids: dict[str, int]) -> tuple[str, ...]:
    """The synthetic vocabulary in a seeded random order, with each special token inserted at its id."""
    tokens = list(VOCABULARY)
    random.Random(seed).shuffle(tokens)
    for token, index in sorted(special_ids.items(), key=lambda item: item[1]):
        tokens.insert(index, token)
    return tuple(tokens)


# Every one at another id than in base (where they are 0-4, [DEC] 46 and [ENC] 47), [PAD] included:
# transformers' BLIP and the runtime take pad, [DEC] and [SEP] from the config, and base's weights
# re-laid onto this order were checked to generate the same text token for token, padded batches included.
WIDE_SPECIAL_IDS = {"[SEP]": 5, "[CLS]": 12, "[DEC]": 20, "[PAD]": 27, "[UNK]": 33, "[ENC]": 40, "[MASK]": 44}
WIDE_VOCAB_SEED = 1


@dataclass(frozen=True)
class Shape:
    """What differs between the committed tiny models; the data, losses and schedule are shared."""

    name: str
    out: Path
    hidden_size: int  # text and vision alike: the VQA cross-attention needs them equal
    text_heads: int
    vision_heads: int
    text_layers: int  # for the question encoder and the answer decoder each
    vision_layers: int
    image_size: int
    # vocab.txt line by line; [DEC] and [ENC] get the next ids after it (as in the real BLIP) unless listed
    tokens: tuple[str, ...]
    steps: int = DEFAULT_STEPS
    peak_lr: float = PEAK_LR
    answer_target: float = ANSWER_TARGET  # held-out exact match the run must reach, overall
    per_kind_target: float = PER_KIND_TARGET  # ... and per question kind


PRESETS = {
    "base": Shape(
        name="base",
        out=CHECKPOINT_DIR,
        hidden_size=96,
        text_heads=4,
        vision_heads=4,
        text_layers=2,
        vision_layers=3,
        image_size=IMAGE_SIZE,
        tokens=(*SPECIAL_TOKENS, *VOCABULARY),
    ),
    # A second shape so that export and INT8 settings are never tuned on one model only: head size 32
    # instead of 24 (and an odd head count), 65 image tokens instead of 37, one more vision layer, and
    # other token ids throughout.
    "wide": Shape(
        name="wide",
        out=WIDE_CHECKPOINT_DIR,
        hidden_size=160,
        text_heads=5,
        vision_heads=5,
        text_layers=2,
        vision_layers=4,
        # The scenes stay 96 px; the processor upsamples them as it would any user's image.
        image_size=128,
        tokens=shuffled_tokens(WIDE_VOCAB_SEED, WIDE_SPECIAL_IDS),
        # Objects no longer sit on the patch grid (32 px cells become 42.7 px), so telling apart two
        # same-coloured shapes takes longer to learn. At base's peak lr the answer loss only fell once
        # the cosine brought the lr under ~1e-3: 1500 steps reached 88 % answers, 3000 steps 96.7 %
        # (yes/no 93 %); see README.md.
        steps=3000,
        peak_lr=1e-3,
    ),
}


def build_processor(workdir: Path, shape: Shape) -> BlipProcessor:
    """Word-level BERT tokenizer over the synthetic vocabulary plus BLIP's [DEC]/[ENC]; square images."""
    vocab_file = workdir / "vocab.txt"
    vocab_file.write_text("\n".join(shape.tokens) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True, model_max_length=MAX_TEXT_POSITIONS)
    # The real BLIP tokenizer is bert-base-uncased with these two tokens appended after the vocabulary;
    # when vocab.txt already lists them they keep their line's id and are only marked special.
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    check_token_ids(tokenizer, shape.tokens)
    image_processor = BlipImageProcessorPil(size={"height": shape.image_size, "width": shape.image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def check_token_ids(tokenizer: BertTokenizer, tokens: Sequence[str]) -> None:
    """Every token must get its vocab.txt line as id, and [DEC]/[ENC] must each be one special token."""
    wrong = [t for i, t in enumerate(tokens) if tokenizer.convert_tokens_to_ids(t) != i]
    for text in ("[DEC]", "[ENC]"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] not in tokenizer.all_special_ids:
            wrong.append(text)
    if wrong:
        raise RuntimeError(f"tokenizer ids differ from the intended vocabulary layout for {wrong}")


def build_config(tokenizer: BertTokenizer, shape: Shape) -> BlipConfig:
    """A BLIP of a few million parameters at most; all token ids come from the tokenizer."""
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": shape.hidden_size,
        "encoder_hidden_size": shape.hidden_size,
        "intermediate_size": 4 * shape.hidden_size,
        "num_hidden_layers": shape.text_layers,
        "num_attention_heads": shape.text_heads,
        "max_position_embeddings": MAX_TEXT_POSITIONS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        # Every target is unambiguous; smoothing would only cap the confidence exact-match tests rely on.
        "label_smoothing": 0.0,
    }
    vision_config = {
        "hidden_size": shape.hidden_size,
        "intermediate_size": 4 * shape.hidden_size,
        "num_hidden_layers": shape.vision_layers,
        "num_attention_heads": shape.vision_heads,
        "image_size": shape.image_size,
        "patch_size": 16,
        # BLIP's vision default of 1e-10 assumes pretrained weights get loaded over it; from scratch it
        # leaves the whole tower near zero. Use the text side's BERT-style value instead.
        "initializer_range": 0.02,
    }
    return BlipConfig(text_config=text_config, vision_config=vision_config)


def init_vision_positions(model: BlipForQuestionAnswering) -> None:
    """Start the patch position embeddings from a 2D sine-cosine grid instead of near-zero noise.

    Drawn like every other weight (std 0.02) they are ~40x smaller than the patch embeddings (std ~0.8),
    so position starts out invisible; "where is ...?" questions and left-to-right captions need it.
    """
    embeddings = model.vision_model.embeddings
    dim = embeddings.embed_dim
    grid = embeddings.image_size // embeddings.patch_size
    quarter = dim // 4
    frequencies = 1.0 / (grid ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # patches are flattened row-major

    def encode(values: torch.Tensor) -> torch.Tensor:
        angles = values.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(rows), encode(cols)], dim=1)
    with torch.no_grad():
        embeddings.position_embedding[0, 1:] = table
        embeddings.position_embedding[0, 0] = 0.0  # the class token has no location


class Batcher:
    """Turns scenes into tensors exactly as the processor would, without its per-call overhead."""

    def __init__(self, processor: BlipProcessor) -> None:
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        self.size = (image_processor.size["width"], image_processor.size["height"])
        self.resample = Image.Resampling(image_processor.resample)
        self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        self.scale = float(image_processor.rescale_factor)
        self._ids: dict[str, list[int]] = {}

    def pixels(self, scenes: Sequence[Scene]) -> torch.Tensor:
        array = np.stack([np.asarray(self.resized(s.image), dtype=np.float32) for s in scenes])
        pixels = torch.from_numpy(array).permute(0, 3, 1, 2) * self.scale
        return (pixels - self.mean) / self.std

    def resized(self, image: Image.Image) -> Image.Image:
        # The processor resizes the uint8 image with PIL; scenes are drawn at synthetic.IMAGE_SIZE, so this
        # is the identity for base and a bicubic upsampling for a larger preset.
        return image if image.size == self.size else image.resize(self.size, self.resample)

    def ids(self, text: str) -> list[int]:
        # The question and caption sets are small, so caching skips nearly all tokenizer calls.
        if text not in self._ids:
            ids = self.tokenizer(text)["input_ids"]
            if self.tokenizer.unk_token_id in ids:
                raise ValueError(f"{text!r} has words outside synthetic.VOCABULARY")
            self._ids[text] = ids
        return self._ids[text]

    def pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return ids, mask

    def decoder_targets(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoder input ids, mask and labels: [DEC] text [SEP], with padding ignored by the loss."""
        bos = self.tokenizer.bos_token_id
        ids, mask = self.pad([[bos, *self.ids(t)[1:]] for t in texts])
        return ids, mask, ids.masked_fill(mask == 0, -100)


def training_losses(
    model: BlipForQuestionAnswering, batcher: Batcher, scenes: Sequence[Scene]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token cross-entropy of the captions and of the answers."""
    image_embeds = model.vision_model(pixel_values=batcher.pixels(scenes)).last_hidden_state
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long)

    cap_ids, cap_mask, cap_labels = batcher.decoder_targets([s.caption for s in scenes])
    caption_loss = model.text_decoder(
        input_ids=cap_ids,
        attention_mask=cap_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
        labels=cap_labels,
    ).loss

    # Every question of every scene is trained each step: besides teaching answers, the question losses
    # shape the vision tower the captions rely on (training on a subset made both tasks worse).
    owner = torch.tensor([i for i, s in enumerate(scenes) for _ in s.qa])
    qas = [qa for s in scenes for qa in s.qa]
    q_ids, q_mask = batcher.pad([batcher.ids(qa.question) for qa in qas])
    question_embeds = model.text_encoder(
        input_ids=q_ids,
        attention_mask=q_mask,
        encoder_hidden_states=image_embeds[owner],
        encoder_attention_mask=image_mask[owner],
    ).last_hidden_state
    a_ids, a_mask, a_labels = batcher.decoder_targets([qa.answer for qa in qas])
    answer_loss = model.text_decoder(
        input_ids=a_ids,
        attention_mask=a_mask,
        encoder_hidden_states=question_embeds,
        encoder_attention_mask=q_mask,
        labels=a_labels,
    ).loss
    return caption_loss, answer_loss


def learning_rate(step: int, steps: int, peak: float) -> float:
    if step < WARMUP_STEPS:
        return peak * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(model: BlipForQuestionAnswering, processor: BlipProcessor, steps: int, peak_lr: float) -> float:
    """Train in place; returns wall seconds."""
    batcher = Batcher(processor)
    check = make_scenes(4, HELD_OUT_SEED)
    expected = processor(images=[s.image for s in check], return_tensors="pt")["pixel_values"]
    if not torch.allclose(batcher.pixels(check), expected, atol=1e-5):
        raise RuntimeError("training pixel pipeline disagrees with the image processor")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.98),
    )
    scene_rng = random.Random(TRAIN_SEED)
    model.train()
    start = time.perf_counter()
    running = torch.zeros(2)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr)
        scenes = [make_scene(scene_rng) for _ in range(BATCH_SIZE)]
        caption_loss, answer_loss = training_losses(model, batcher, scenes)
        loss = CAPTION_LOSS_WEIGHT * caption_loss + answer_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += torch.tensor([caption_loss.item(), answer_loss.item()])
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            caption_mean, answer_mean = (running / ((step % LOG_EVERY) + 1)).tolist()
            print(
                f"step {step + 1:5d}/{steps}  loss: caption {caption_mean:.4f} answer {answer_mean:.4f}  "
                f"lr {optimizer.param_groups[0]['lr']:.2e}  elapsed {time.perf_counter() - start:6.1f}s",
                flush=True,
            )
            running.zero_()
    return time.perf_counter() - start


def save(model: BlipForQuestionAnswering, processor: BlipProcessor, vocab_file: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # Not needed to load (tokenizer.json is), but keeps the folder shaped like a real BLIP checkpoint.
    shutil.copyfile(vocab_file, out / "vocab.txt")
    # save_pretrained derives this from config.json and from_pretrained re-derives it identically when
    # absent; leaving it out keeps the folder to the files other tools have to understand.
    (out / "generation_config.json").unlink(missing_ok=True)
    for path in out.iterdir():
        if path.is_file():
            path.chmod(0o644)  # save_pretrained writes the weights 0600


def print_report(metrics: dict) -> None:
    print(f"{'held-out':<10} {'accuracy':>8}")
    for kind in (*QUESTION_TYPES, "overall"):
        if kind in metrics["answers"]:
            print(f"{kind:<10} {metrics['answers'][kind]:8.2%}")
    print(f"{'captions':<10} {metrics['captions']:8.2%}")


def targets_met(metrics: dict, shape: Shape) -> bool:
    answers = metrics["answers"]
    return (
        answers["overall"] >= shape.answer_target
        and all(answers.get(kind, 0.0) >= shape.per_kind_target for kind in QUESTION_TYPES)
        and metrics["captions"] >= CAPTION_TARGET
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=PRESETS, default="base", help="which tiny model (default base)")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"checkpoint folder to write (default {CHECKPOINT_DIR.name}/ for base, "
        f"{WIDE_CHECKPOINT_DIR.name}/ for wide)",
    )
    parser.add_argument(
        "--steps", type=int, help=f"optimizer steps of {BATCH_SIZE} scenes each (default: the shape's own)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the weight initialisation")
    args = parser.parse_args(argv)
    shape = PRESETS[args.shape]
    out = args.out or shape.out
    steps = args.steps or shape.steps

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        processor = build_processor(Path(tmp), shape)
        model = BlipForQuestionAnswering(build_config(processor.tokenizer, shape))
        init_vision_positions(model)
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"shape {shape.name}: parameters {n_params / 1e6:.2f}M, "
            f"vocabulary {len(processor.tokenizer)} tokens, {steps} steps at peak lr {shape.peak_lr:g}",
            flush=True,
        )
        seconds = train(model, processor, steps, shape.peak_lr)
        print(f"training took {seconds:.0f}s", flush=True)
        save(model, processor, vocab_file, out)

    # Measure what the tests will load, not the in-memory model.
    model = BlipForQuestionAnswering.from_pretrained(out)
    processor = BlipProcessor.from_pretrained(out)
    start = time.perf_counter()
    metrics = evaluate(model, processor, make_scenes(HELD_OUT_SCENES, HELD_OUT_SEED))
    print(f"evaluated {HELD_OUT_SCENES} held-out scenes in {time.perf_counter() - start:.0f}s")
    print_report(metrics)
    if not targets_met(metrics, shape):
        print(
            f"FAILED: targets are answers >= {shape.answer_target:.0%} overall and "
            f">= {shape.per_kind_target:.0%} per kind, captions >= {CAPTION_TARGET:.0%}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
