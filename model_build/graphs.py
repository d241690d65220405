"""The graphs we export from a transformers BLIP, written as plain torch modules.

transformers' text models recompute every cross-attention key and value from the image at each call
(per question, per generated token) and keep the decoder's cache in `Cache` objects, so the question
encoder and the decoder are re-expressed here over the checkpoint's own weights:

- `CrossKV` (`text_encoder_kv`): image embeddings -> the question encoder's cross-attention keys and
  values of every layer, once per image instead of once per question about it.
- `TextEncoder`: questions' word embeddings + their images' precomputed K/V -> question embeddings.
  The word-embedding table stays outside the graph (serving looks its rows up from a file): inside
  it, OpenVINO's CPU plugin unpacks the table to f32 once the part holds INT8 operations (94 MB
  full-size, for the ~10 rows a question reads).
- `DecoderStep`: new token ids + explicit self-attention cache + the states it attends to (image
  embeddings for captions, question embeddings for answers) -> logits and the grown cache. Serving
  drives it from a numpy loop (backend/runtime/generate.py). Its cross-attention never materialises
  keys and values: `_attend_states` says how, and why.

Shapes (L layers, H heads, D head size, E encoder width, V vocab):
    image_kv  [L, 2, N, H, S, D]      the question encoder's cross K/V of N images, keys at index 0
    image_index [B]                   which of the N images each question is about
    past_kv   [L, 2, B, H, P, D]      P = tokens already decoded (0 on the first call)
    input_ids [B, T]                  T new tokens (the prompt on the first call, then 1)
    word_embeds [B, Q, E]             a question's Q tokens' rows of the word-embedding table
    encoder_states [B, S, C]          what the decoder attends to: S tokens of width C
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
    """encoder_states [B, S, E] -> image_kv [L, 2, B, H, S, D] of every layer's cross-attention"""

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


def _attend_states(
    attention: nn.Module, q: torch.Tensor, states: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Cross-attention of queries q [B, T, H, D] over states [B, S, C] -> context [B, T, H*D], without
    keys or values of the S states.

    A head's score of state s is q_h . (W_k_h s + b_k_h) = (q_h W_k_h) . s + q_h . b_k_h: the query is
    projected into the states' width instead of every state into keys, and the bias term, equal for all
    of a head's states, leaves its softmax unchanged. Likewise the softmax-weighted values are
    W_v_h (sum_s p_s s) + b_v_h, the weights summing to 1. Decoding then reads the states (1.8 MB per
    image, full-size) at each step instead of 12 layers of keys and values (42 MB), which made a step's
    time and memory grow with every image in the batch: 8 captions at a time took 20 instead of 27 ms a
    step, and the keys and values are no longer computed at all (README, "Performance").
    """
    b, t, h, d = q.shape
    width = states.shape[-1]
    eye = torch.eye(h, dtype=q.dtype)
    # row i of [H, H*D] holds head i's query in its own block: one projection by W_k for all heads
    # the scale on the queries: OpenVINO moved a scale of the scores onto the states (577 x 768
    # multiplications per layer and step)
    spread = (q[:, :, :, None, :] * (eye[:, :, None] / d**0.5)).reshape(b, t, h, h * d)
    queries = (spread @ attention.key.weight).reshape(b, t * h, width)  # [B, T*H, C]
    scores = queries @ states.transpose(1, 2) + bias[:, 0]  # [B, T*H, S]
    mixed = (scores.softmax(-1) @ states).reshape(b, t, h, width)  # [B, T, H, C]
    # each head's rows through W_v, then head i's block of its own row
    projected = nn.functional.linear(mixed, attention.value.weight).reshape(b, t, h * h, d)
    own = projected[:, :, torch.arange(h) * (h + 1)]  # [B, T, H, D]
    return (own + attention.value.bias.view(h, d)).reshape(b, t, h * d)


class DecoderStep(nn.Module):
    """(input_ids [B,T], past_kv, encoder_states [B,S,C], cross_mask [B,S]) -> (logits [B,T,V], present_kv)"""

    cross_attend = staticmethod(_attend_states)

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
        encoder_states: torch.Tensor,
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
            q = ca.query(h).view(h.shape[0], n_new, self.n_heads, -1)
            h = layer.crossattention.output(self.cross_attend(ca, q, encoder_states, cross_bias), h)

            h = layer.output(layer.intermediate(h), h)
        return self.lm_head(h), torch.stack(present)
