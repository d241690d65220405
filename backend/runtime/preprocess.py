"""Turn images and text into the arrays the IR parts take, the way BLIP's processor does, without torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer


def resized(image: Image.Image, settings: dict[str, Any]) -> Image.Image:
    """The image in RGB at the vision encoder's input size, resized as BlipImageProcessor does. An image
    already that size comes back as a copy of itself, so resizing early (to hold 0.4 MB per image
    instead of a photo's 36) gives the same pixel values."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.resize((settings["width"], settings["height"]), Image.Resampling(settings["resample"]))


def pixel_values(images: Sequence[Image.Image], settings: dict[str, Any]) -> np.ndarray:
    """RGB images -> float32 [N, 3, H, W]: resize, rescale and normalise as BlipImageProcessor does."""
    mean = np.asarray(settings["mean"], dtype=np.float32)
    std = np.asarray(settings["std"], dtype=np.float32)
    out = np.empty((len(images), 3, settings["height"], settings["width"]), dtype=np.float32)
    for i, image in enumerate(images):
        x = np.asarray(resized(image, settings), dtype=np.float32)
        x = (x * settings["rescale_factor"] - mean) / std
        out[i] = x.transpose(2, 0, 1)
    return out


class TextCodec:
    """BLIP's tokenizer from the model directory's tokenizer.json; adds [CLS] ... [SEP] like transformers."""

    def __init__(self, path: Path, pad_id: int, max_length: int) -> None:
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.pad_id = pad_id
        self.max_length = max_length

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids [N, T] int64 right-padded, mask [N, T] int64); overlong texts keep their head."""
        rows = [self.ids(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return ids, mask

    def ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text).ids
        if len(ids) > self.max_length:
            ids = ids[: self.max_length - 1] + ids[-1:]  # keep the closing [SEP]
        return ids

    def too_long(self, text: str) -> bool:
        return len(self.tokenizer.encode(text).ids) > self.max_length

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
