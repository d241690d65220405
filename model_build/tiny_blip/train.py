"""Train the tiny BLIP from scratch on synthetic scenes and save it as a transformers checkpoint.

    python -m model_build.tiny_blip.train [--out DIR] [--steps N] [--seed S]

One ``BlipForQuestionAnswering`` learns both tasks: every step runs the vision tower once per image, then
the answer decoder captions the image tokens directly and, for each question about the image, decodes the
answer from the question encoder's output (the same wiring ``generate`` uses at inference).
Training scenes are drawn fresh each step from ``random.Random(TRAIN_SEED)``; ``--seed`` seeds the weights.
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
from pathlib import Path

import numpy as np
import torch
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    BlipProcessor,
)

from . import CHECKPOINT_DIR
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
HIDDEN_SIZE = 96
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


def build_processor(workdir: Path) -> BlipProcessor:
    """Word-level BERT tokenizer over the synthetic vocabulary plus BLIP's [DEC]/[ENC]; 96px images."""
    vocab_file = workdir / "vocab.txt"
    vocab_file.write_text("\n".join([*SPECIAL_TOKENS, *VOCABULARY]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab_file), do_lower_case=True, model_max_length=MAX_TEXT_POSITIONS)
    # The real BLIP tokenizer is bert-base-uncased with these two tokens appended after the vocabulary.
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_config(tokenizer: BertTokenizer) -> BlipConfig:
    """A ~1M-parameter BLIP; text and vision widths must match for the VQA cross-attention."""
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN_SIZE,
        "encoder_hidden_size": HIDDEN_SIZE,
        "intermediate_size": 4 * HIDDEN_SIZE,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TEXT_POSITIONS,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.sep_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        # Every target is unambiguous; smoothing would only cap the confidence exact-match tests rely on.
        "label_smoothing": 0.0,
    }
    vision_config = {
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": 4 * HIDDEN_SIZE,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
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
        self.mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
        self.scale = float(image_processor.rescale_factor)
        self._ids: dict[str, list[int]] = {}

    def pixels(self, scenes: Sequence[Scene]) -> torch.Tensor:
        # Images are already IMAGE_SIZE square, so the processor's bicubic resize is the identity.
        array = np.stack([np.asarray(s.image, dtype=np.float32) for s in scenes])
        pixels = torch.from_numpy(array).permute(0, 3, 1, 2) * self.scale
        return (pixels - self.mean) / self.std

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


def learning_rate(step: int, steps: int) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return PEAK_LR * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(model: BlipForQuestionAnswering, processor: BlipProcessor, steps: int) -> float:
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
        lr=PEAK_LR,
        betas=(0.9, 0.98),
    )
    scene_rng = random.Random(TRAIN_SEED)
    model.train()
    start = time.perf_counter()
    running = torch.zeros(2)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
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


def targets_met(metrics: dict) -> bool:
    answers = metrics["answers"]
    return (
        answers["overall"] >= ANSWER_TARGET
        and all(answers.get(kind, 0.0) >= PER_KIND_TARGET for kind in QUESTION_TYPES)
        and metrics["captions"] >= CAPTION_TARGET
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="checkpoint folder to write")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps of {BATCH_SIZE} scenes each"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the weight initialisation")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.txt"
        processor = build_processor(Path(tmp))
        model = BlipForQuestionAnswering(build_config(processor.tokenizer))
        init_vision_positions(model)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"parameters: {n_params / 1e6:.2f}M, vocabulary: {len(processor.tokenizer)} tokens", flush=True)
        seconds = train(model, processor, args.steps)
        print(f"training took {seconds:.0f}s", flush=True)
        save(model, processor, vocab_file, args.out)

    # Measure what the tests will load, not the in-memory model.
    model = BlipForQuestionAnswering.from_pretrained(args.out)
    processor = BlipProcessor.from_pretrained(args.out)
    start = time.perf_counter()
    metrics = evaluate(model, processor, make_scenes(HELD_OUT_SCENES, HELD_OUT_SEED))
    print(f"evaluated {HELD_OUT_SCENES} held-out scenes in {time.perf_counter() - start:.0f}s")
    print_report(metrics)
    if not targets_met(metrics):
        print(
            f"FAILED: targets are answers >= {ANSWER_TARGET:.0%} overall and >= {PER_KIND_TARGET:.0%} "
            f"per kind, captions >= {CAPTION_TARGET:.0%}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
