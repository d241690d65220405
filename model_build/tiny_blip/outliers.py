"""The bundled checkpoint with outliers, the way trained transformers have them: the same function in
float, hostile to INT8. Tests and bench/quality.py use it to show what accuracy control restores.

In each vision layer one query channel per head is scaled up 300x and its key channel down 300x (the
attention scores do not change); in each decoder layer every 7th value channel is scaled down 300x and
the attention output's weights that read it up 300x. Quantized, the outlier channels swamp the others
(vision activations), and the outlier weights the others in their rows (decoder weights).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor, BlipForQuestionAnswering

from . import CHECKPOINT_DIR

FACTOR = 300.0


def add_outliers(out: str | Path, source: str | Path = CHECKPOINT_DIR) -> Path:
    """Write the doctored copy of `source` (a VQA checkpoint folder) to `out`."""
    model = BlipForQuestionAnswering.from_pretrained(source).eval()
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            qkv, width = layer.self_attn.qkv, layer.self_attn.embed_dim
            for c in range(0, width, layer.self_attn.head_dim):
                for row, factor in ((c, FACTOR), (width + c, 1 / FACTOR)):
                    qkv.weight[row] *= factor
                    qkv.bias[row] *= factor
        for layer in model.text_decoder.bert.encoder.layer:
            attention = layer.attention
            for c in range(0, attention.self.all_head_size, 7):
                attention.self.value.weight[c] /= FACTOR
                attention.self.value.bias[c] /= FACTOR
                attention.output.dense.weight[:, c] *= FACTOR
    out = Path(out)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(source).save_pretrained(out)
    return out
