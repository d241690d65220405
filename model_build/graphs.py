"""The graphs we export from a transformers BLIP, written as plain torch modules.

transformers' text models recompute every cross-attention key and value from the image at each call
(per question, per generated token) and keep the decoder's cache in `Cache` objects, so the question
encoder and the decoder are re-expressed here over the checkpoint's own weights:

- `CrossKV`: encoder states -> cross-attention keys/values of every layer of a text model. For the
  decoder, computed once per image (captions) or per question (answers) instead of at every
  generated token; for the question encoder (`text_encoder_kv`), once per image instead of once per
  question about it.
- `TextEncoder`: questions' word embeddings + their images' precomputed K/V -> question embeddings.
  The word-embedding table stays outside the graph (serving looks its rows up from a file): inside
  it, OpenVINO's CPU plugin unpacks the table to f32 once the part holds INT8 operations (94 MB
  full-size, for the ~10 rows a question reads).
- `DecoderStep`: new token ids + explicit self-attention cache + precomputed cross K/V -> logits
  and the grown cache. Serving drives it from a numpy loop (backend/runtime/generate.py).

Shapes (L layers, H heads, D head size, E encoder width, V vocab):
    cross_kv  [L, 2, B, H, S, D]      keys at index 0, values at index 1
    image_kv  [L, 2, N, H, S, D]      the question encoder's cross K/V of N images
    image_index [B]                   which of the N images each question is about
    past_kv   [L, 2, B, H, P, D]      P = tokens already decoded (0 on the first call)
    input_ids [B, T]                  T new tokens (the prompt on the first call, then 1)
    word_embeds [B, Q, E]             a question's Q tokens' rows of the word-embedding table
    logits    [B, T, V]
"""

from __future__ import annotations

import torch
from torch import nn


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, H, S, D]"""
    b, s, _ = x.shape
    return x.view(b, s, n_heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, H*D]"""
    b, _, s, _ = x.shape
    return x.transpose(1, 2).reshape(b, s, -1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
    if bias is not None:
        scores = scores + bias
    return scores.softmax(-1) @ v


def _padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """[B, S] 1/0 mask -> [B, 1, 1, S] additive bias: 0 where attended, float32 min where padded"""
    return (1.0 - mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min


class VisionEncoder(nn.Module):
    """pixel_values [B, 3, S, S] -> image_embeds [B, N, E]"""

    def __init__(self, vision_model: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state


class CrossKV(nn.Module):
    """encoder_states [B, S, E] -> cross_kv [L, 2, B, H, S, D] of every layer's cross-attention"""

    def __init__(self, layers: nn.ModuleList, n_heads: int) -> None:
        super().__init__()
        self.layers, self.n_heads = layers, n_heads

    def forward(self, encoder_states: torch.Tensor) -> torch.Tensor:
        kv = []
        for layer in self.layers:
            att = layer.crossattention.self
            k = _heads(att.key(encoder_states), self.n_heads)
            v = _heads(att.value(encoder_states), self.n_heads)
            kv.append(torch.stack([k, v]))
        return torch.stack(kv)


class TextEncoder(nn.Module):
    """(word_embeds [B,Q,E], attention_mask [B,Q], image_kv, image_index [B]) -> question_embeds [B,Q,E]

    transformers' BlipTextModel with encoder_hidden_states, except that each layer's cross-attention
    keys and values come precomputed (`CrossKV` over the image embeddings), and question i attends
    to image image_index[i]: three questions about one image pay for its keys and values once.
    """

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.embeddings = text_encoder.embeddings
        self.layers = text_encoder.encoder.layer
        self.n_heads = text_encoder.config.num_attention_heads

    def forward(
        self,
        word_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        image_kv: torch.Tensor,
        image_index: torch.Tensor,
    ) -> torch.Tensor:
        emb = self.embeddings
        positions = torch.arange(word_embeds.shape[1])
        h = emb.LayerNorm(word_embeds + emb.position_embeddings(positions)[None])
        bias = _padding_bias(attention_mask)
        for i, layer in enumerate(self.layers):
            sa = layer.attention.self
            q, k, v = (_heads(proj(h), self.n_heads) for proj in (sa.query, sa.key, sa.value))
            h = layer.attention.output(_merge_heads(_attend(q, k, v, bias)), h)

            q = _heads(layer.crossattention.self.query(h), self.n_heads)
            k, v = image_kv[i, 0, image_index], image_kv[i, 1, image_index]  # [B, H, S, D]
            h = layer.crossattention.output(_merge_heads(_attend(q, k, v, None)), h)

            h = layer.output(layer.intermediate(h), h)
        return h


class DecoderStep(nn.Module):
    """(input_ids [B,T], past_kv, cross_kv, cross_mask [B,S]) -> (logits [B,T,V], present_kv)"""

    def __init__(self, text_decoder: nn.Module) -> None:
        super().__init__()
        self.embeddings = text_decoder.bert.embeddings
        self.layers = text_decoder.bert.encoder.layer
        self.lm_head = text_decoder.cls
        self.n_heads = text_decoder.config.num_attention_heads

    def forward(
        self,
        input_ids: torch.Tensor,
        past_kv: torch.Tensor,
        cross_kv: torch.Tensor,
        cross_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_past, n_new = past_kv.shape[4], input_ids.shape[1]
        positions = torch.arange(n_new) + n_past
        emb = self.embeddings
        h = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None])

        neg = torch.finfo(torch.float32).min
        # new token i sits at position n_past + i and may see every key up to that position
        key_pos = torch.arange(n_past + n_new)
        causal = torch.where(key_pos[None, :] <= positions[:, None], 0.0, neg)[None, None]
        cross_bias = _padding_bias(cross_mask)

        present = []
        for i, layer in enumerate(self.layers):
            sa = layer.attention.self
            q = _heads(sa.query(h), self.n_heads)
            k = torch.cat([past_kv[i, 0], _heads(sa.key(h), self.n_heads)], dim=2)
            v = torch.cat([past_kv[i, 1], _heads(sa.value(h), self.n_heads)], dim=2)
            present.append(torch.stack([k, v]))
            h = layer.attention.output(_merge_heads(_attend(q, k, v, causal)), h)

            ca = layer.crossattention.self
            q = _heads(ca.query(h), self.n_heads)
            ctx = _attend(q, cross_kv[i, 0], cross_kv[i, 1], cross_bias)
            h = layer.crossattention.output(_merge_heads(ctx), h)

            h = layer.output(layer.intermediate(h), h)
        return self.lm_head(h), torch.stack(present)
