"""The graphs we export from a transformers BLIP, written as plain torch modules.

transformers' text models recompute every cross-attention key and value from the image at each call
(per question, per generated token) and keep the decoder's cache in `Cache` objects, so the question
encoder and the decoder are re-expressed here over the checkpoint's own weights, and neither computes
keys or values of the states it attends to (`_attend_states` says how, and why):

- `TextEncoder`: questions' word embeddings + the embeddings of the image each is about -> question
  embeddings. The word-embedding table stays outside the graph (serving looks its rows up from a file):
  inside it, OpenVINO's CPU plugin unpacks the table to f32 once the part holds INT8 operations (94 MB
  full-size, for the ~10 rows a question reads).
- `DecoderStep`: new token ids + a self-attention cache of fixed capacity and how much of it is filled
  + the states it attends to (image embeddings for captions, question embeddings for answers) -> logits
  and the new tokens' keys and values, which serving writes into the cache: a numpy loop
  (backend/runtime/generate.py) whose every step then has the same input shapes.

Both take states of one row ([1, S, C]) as every row's: the questions about one image, or one image's
caption and answers, attend to one copy of them.

Shapes (L layers, H heads, D head size, E encoder width, V vocab):
    past_kv   [L, 2, B, H, P, D]      a cache of capacity P, of which the first past_length are filled
    past_length [1]                   tokens already decoded (0 on the first call)
    input_ids [B, T]                  T new tokens (the prompt on the first call, then 1)
    new_kv    [L, 2, B, H, T, D]      the new tokens' keys and values
    word_embeds [B, Q, E]             a question's Q tokens' rows of the word-embedding table
    encoder_states [B or 1, S, C]     what is attended to: S tokens of width C
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


def _attend_states(
    attention: nn.Module, q: torch.Tensor, states: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Cross-attention of queries q [B, T, H, D] over states [B or 1, S, C] (bias [B, 1, 1, S] or None)
    -> context [B, T, H*D], without keys or values of the S states.

    A head's score of state s is q_h . (W_k_h s + b_k_h) = (q_h W_k_h) . s + q_h . b_k_h: the query is
    projected into the states' width instead of every state into keys, and the bias term, equal for all
    of a head's states, leaves its softmax unchanged. Likewise the softmax-weighted values are
    W_v_h (sum_s p_s s) + b_v_h, the weights summing to 1. Decoding then reads the states (1.8 MB per
    image, full-size) at each step instead of 12 layers of keys and values (42 MB), which made a step's
    time and memory grow with every image in the batch: 8 captions at a time took 20 instead of 27 ms a
    step, and the keys and values are no longer computed at all (README, "Performance"). In the question
    encoder, three questions about an image took 11 ms instead of 27 for the image's keys and values and
    the questions over them.
    """
    b, t, h, d = q.shape
    width = states.shape[-1]
    eye = torch.eye(h, dtype=q.dtype)
    # row i of [H, H*D] holds head i's query in its own block: one projection by W_k for all heads
    # the scale on the queries: OpenVINO moved a scale of the scores onto the states (577 x 768
    # multiplications per layer and step)
    spread = (q[:, :, :, None, :] * (eye[:, :, None] / d**0.5)).reshape(b, t, h, h * d)
    queries = (spread @ attention.key.weight).reshape(b, t * h, width)  # [B, T*H, C]
    scores = queries @ states.transpose(1, 2)  # [B, T*H, S]
    if bias is not None:
        scores = scores + bias[:, 0]
    mixed = (scores.softmax(-1) @ states).reshape(b, t, h, width)  # [B, T, H, C]
    # each head's rows through W_v, then head i's block of its own row
    projected = nn.functional.linear(mixed, attention.value.weight).reshape(b, t, h * h, d)
    own = projected[:, :, torch.arange(h) * (h + 1)]  # [B, T, H, D]
    return (own + attention.value.bias.view(h, d)).reshape(b, t, h * d)


class TextEncoder(nn.Module):
    """(word_embeds [B,Q,E], attention_mask [B,Q], encoder_states [B or 1,S,C]) -> question_embeds [B,Q,E]

    transformers' BlipTextModel with encoder_hidden_states: question i about image embeddings i, or all
    of them about the one image given.
    """

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.embeddings = text_encoder.embeddings
        self.layers = text_encoder.encoder.layer
        self.n_heads = text_encoder.config.num_attention_heads

    def forward(
        self, word_embeds: torch.Tensor, attention_mask: torch.Tensor, encoder_states: torch.Tensor
    ) -> torch.Tensor:
        emb = self.embeddings
        b, n_tokens = word_embeds.shape[:2]
        h = emb.LayerNorm(word_embeds + emb.position_embeddings(torch.arange(n_tokens))[None])
        bias = _padding_bias(attention_mask)
        for layer in self.layers:
            sa = layer.attention.self
            q, k, v = (_heads(proj(h), self.n_heads) for proj in (sa.query, sa.key, sa.value))
            h = layer.attention.output(_merge_heads(_attend(q, k, v, bias)), h)

            ca = layer.crossattention.self
            q = ca.query(h).view(b, n_tokens, self.n_heads, -1)
            h = layer.crossattention.output(_attend_states(ca, q, encoder_states, None), h)

            h = layer.output(layer.intermediate(h), h)
        return h


class DecoderStep(nn.Module):
    """(input_ids [B,T], past_kv, past_length [1], encoder_states [B or 1,S,C], cross_mask [B,S])
    -> (logits [B,T,V], new_kv)

    The cache has a fixed capacity (the decoding's length, allocated once) instead of growing by a token
    per call: every call of a decoding then has the same input shapes, which OpenVINO's CPU plugin did not
    have to re-plan (a full-size step 0.55 ms faster, 7.7 -> 7.1 ms; README, "Performance").
    """

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
        past_length: torch.Tensor,
        encoder_states: torch.Tensor,
        cross_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        capacity, n_new = past_kv.shape[4], input_ids.shape[1]
        positions = torch.arange(n_new) + past_length
        emb = self.embeddings
        h = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None])

        neg = torch.finfo(torch.float32).min
        # new token i sees the filled part of the cache and the new tokens up to itself
        filled = torch.where(torch.arange(capacity) < past_length, 0.0, neg).expand(n_new, capacity)
        new_pos = torch.arange(n_new)
        causal = torch.where(new_pos[None, :] <= new_pos[:, None], 0.0, neg)
        self_bias = torch.cat([filled, causal], dim=1)[None, None]
        cross_bias = _padding_bias(cross_mask)

        new_kv = []
        for i, layer in enumerate(self.layers):
            sa = layer.attention.self
            q = _heads(sa.query(h), self.n_heads)
            k_new, v_new = _heads(sa.key(h), self.n_heads), _heads(sa.value(h), self.n_heads)
            new_kv.append(torch.stack([k_new, v_new]))
            k, v = torch.cat([past_kv[i, 0], k_new], dim=2), torch.cat([past_kv[i, 1], v_new], dim=2)
            h = layer.attention.output(_merge_heads(_attend(q, k, v, self_bias)), h)

            ca = layer.crossattention.self
            q = ca.query(h).view(h.shape[0], n_new, self.n_heads, -1)
            h = layer.crossattention.output(self.cross_attend(ca, q, encoder_states, cross_bias), h)

            h = layer.output(layer.intermediate(h), h)
        return self.lm_head(h), torch.stack(new_kv)
