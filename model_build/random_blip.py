"""Random-weight BLIP checkpoints with the real blip-vqa-base / blip-image-captioning-base shapes.

The Hugging Face hub is out of reach in tests and CI, so export smoke tests and benchmarks use a
checkpoint folder made here: transformers' default `BlipConfig` (ViT-B/16 at 384 px, 12-layer BERT
text encoder and decoder, vocabulary 30524) and a BERT-layout vocabulary of filler words, so token
ids land where the real tokenizer has them. It says nothing about quality; only speed and shapes.

    python -m model_build.random_blip OUT [--caption]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    BlipImageProcessorPil,
    BlipProcessor,
)


def bert_layout_vocab(size: int) -> list[str]:
    """[PAD], [unused*], [UNK], [CLS], [SEP], [MASK] at BERT's ids, then filler words up to `size`."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return vocab + [f"w{i}" for i in range(size - len(vocab))]


def make_random_blip(out: str | Path, caption_only: bool = False, seed: int = 0) -> Path:
    """Write a random-weight BLIP checkpoint folder (fp16 weights on disk) to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = BlipConfig()
    vocab = bert_layout_vocab(base.text_config.vocab_size - 2)  # [DEC] and [ENC] come on top
    tokenizer = BertTokenizerFast(
        vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]", additional_special_tokens=["[ENC]"]
    )
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 384, "width": 384}), tokenizer)
    config = BlipConfig(
        text_config={
            # blip-image-captioning-base's text decoder has 12 heads, blip-vqa-base's 8 (BlipConfig's)
            "num_attention_heads": 12 if caption_only else 8,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"),
            "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        # transformers initialises BLIP's vision weights with std 1e-10; trained weights are ~0.02,
        # and fp16 compression and INT8 calibration only behave realistically at that scale
        vision_config={"initializer_range": 0.02},
    )
    torch.manual_seed(seed)
    model_class = BlipForConditionalGeneration if caption_only else BlipForQuestionAnswering
    model = model_class(config).eval()
    model.half().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--caption", action="store_true", help="BlipForConditionalGeneration instead of VQA")
    args = p.parse_args()
    print(make_random_blip(args.out, caption_only=args.caption))


if __name__ == "__main__":
    main()
