"""transformers' own BLIP calls, as a user writes them: the reference the OpenVINO runtime is held to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import BlipForQuestionAnswering


@torch.no_grad()
def caption_ids(
    model: BlipForQuestionAnswering,
    pixel_values: torch.Tensor,
    prompt_ids: Sequence[int] = (),
    **generation: Any,
) -> torch.Tensor:
    """A VQA checkpoint captions with its answer decoder on the image embeddings: ids [N, start + new]."""
    tcfg = model.config.text_config
    start = [tcfg.bos_token_id, *prompt_ids]
    embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    return model.text_decoder.generate(
        input_ids=torch.tensor([start] * len(pixel_values)),
        encoder_hidden_states=embeds,
        encoder_attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
        eos_token_id=tcfg.sep_token_id,
        pad_token_id=tcfg.pad_token_id,
        do_sample=False,
        **generation,
    )
