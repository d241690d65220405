"""Decoding loops over an exported BLIP decoder step, in numpy.

The step function is the `decoder` IR (model_build/graphs.py, `DecoderStep`):

    step(input_ids [B,T], past_kv [L,2,B,H,P,D], past_length, encoder_states [B,S,C], cross_mask [B,S])
        -> logits [B,T,V], new_kv [L,2,B,H,T,D]

The loops own the cache: the caller allocates `past_kv` with the capacity a decoding needs, each step's
new keys and values are written into it after its filled part, and it doubles when full. Every step of
a decoding then has the same input shapes (model_build/graphs.py says why that matters).

States of one row ([1,S,C]) are shared by all rows, each attending to the part its cross_mask
selects: how one image's caption and its questions' answers are decoded in one batch.

Greedy and beam search follow transformers' `generate` exactly (the parity tests compare token
ids), including how repetition penalty and minimum length act on the scores. Besides the tokens,
each result carries the model's own log-probability of every generated token, from which the
runtime derives its confidence score.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

Step = Callable[[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
NEG_INF = -np.inf


@dataclass(frozen=True)
class Settings:
    """Generation settings; the names and meanings are transformers' GenerationConfig ones."""

    num_beams: int = 1
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.min_new_tokens < 0:
            raise ValueError(f"invalid generation settings: {self}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass(frozen=True)
class Sequence:
    tokens: list[int]  # generated tokens, without the prompt, ending with eos unless cut by max_new_tokens
    token_logprobs: list[float]  # the model's log-probability of each generated token (no penalties applied)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _penalize_repeats(scores: np.ndarray, history: np.ndarray, penalty: float | np.ndarray) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: every token already in a row is made less likely.
    `penalty`: one for all rows, or one per row."""
    if np.all(penalty == 1.0):
        return scores
    rows = np.arange(scores.shape[0])[:, None]
    seen = scores[rows, history]
    penalty = np.reshape(penalty, (-1, 1))
    scores[rows, history] = np.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def _advance(
    step: Step, ids: np.ndarray, past: np.ndarray, n_past: int, states: np.ndarray, cross_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One step: its logits, and the cache with its keys and values written after the `n_past` filled
    (the same array, or one of twice the capacity when it was full)."""
    needed = n_past + ids.shape[1]
    if needed > past.shape[4]:
        grown = np.zeros((*past.shape[:4], max(needed, 2 * past.shape[4]), past.shape[5]), dtype=past.dtype)
        grown[:, :, :, :, :n_past] = past[:, :, :, :, :n_past]
        past = grown
    logits, new_kv = step(ids, past, n_past, states, cross_mask)
    past[:, :, :, :, n_past:needed] = new_kv
    return logits, past


def _rows(states: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The states of these rows; states of one row are every row's."""
    return states if len(states) == 1 else states[rows]


def greedy(
    step: Step,
    prompt: np.ndarray,
    past: np.ndarray,
    states: np.ndarray,
    cross_mask: np.ndarray,
    eos: int,
    settings: Settings | Seq[Settings],
) -> list[Sequence]:
    """Greedy decoding of a batch, with one `settings` for all rows or one per row (their num_beams
    ignored); rows that reach eos or their max_new_tokens leave the batch so they cost nothing more.
    `past`: an empty cache, ideally for the prompt and all but the last new token."""
    batch = prompt.shape[0]
    per_row = [settings] * batch if isinstance(settings, Settings) else list(settings)
    max_new = np.array([s.max_new_tokens for s in per_row])
    min_new = np.array([s.min_new_tokens for s in per_row])
    penalty = np.array([s.repetition_penalty for s in per_row])
    history = prompt.copy()
    tokens: list[list[int]] = [[] for _ in range(batch)]
    logprobs: list[list[float]] = [[] for _ in range(batch)]
    alive = np.arange(batch)  # original row of each row still decoding
    ids = prompt
    for t in range(int(max_new.max())):
        logits, past = _advance(step, ids, past, history.shape[1] - ids.shape[1], states, cross_mask)
        raw = logits[:, -1].astype(np.float32)
        scores = _penalize_repeats(raw.copy(), history, penalty[alive])
        scores[t < min_new[alive], eos] = NEG_INF
        nxt = scores.argmax(-1)
        model_lp = log_softmax(raw)[np.arange(len(nxt)), nxt]
        for row, tok, lp in zip(alive, nxt, model_lp):
            tokens[row].append(int(tok))
            logprobs[row].append(float(lp))
        keep = (nxt != eos) & (t + 1 < max_new[alive])
        if not keep.any():
            break
        if not keep.all():
            alive, nxt, history = alive[keep], nxt[keep], history[keep]
            past, states, cross_mask = past[:, :, keep], _rows(states, keep), cross_mask[keep]
        history = np.concatenate([history, nxt[:, None]], axis=1)
        ids = nxt[:, None]
    return [Sequence(t, lp) for t, lp in zip(tokens, logprobs)]


def beam_search(
    step: Step,
    prompt: np.ndarray,
    past: np.ndarray,
    states: np.ndarray,
    cross_mask: np.ndarray,
    eos: int,
    settings: Settings,
) -> list[Sequence]:
    """Beam search with transformers' defaults (early_stopping=False, length_penalty from settings).

    Each row keeps `num_beams` running hypotheses; a hypothesis ending in eos moves to that row's
    finished list, scored by sum of log-probs / length ** length_penalty. A row is done when it
    has num_beams finished hypotheses and no running one can beat the worst of them any more.
    """
    n_beams = settings.num_beams
    batch, prompt_len = prompt.shape
    # every beam starts as a copy of its row; only the first may expand at step 0, so the
    # num_beams first choices are distinct tokens
    expand = np.repeat(np.arange(batch), n_beams)
    seqs = prompt[expand]
    past, states, cross_mask = past[:, :, expand], _rows(states, expand), cross_mask[expand]
    beam_scores = np.zeros((batch, n_beams))
    beam_scores[:, 1:] = -1e9
    model_lps = np.zeros((batch * n_beams, 0))
    finished: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    ids = seqs
    for t in range(settings.max_new_tokens):
        logits, past = _advance(step, ids, past, seqs.shape[1] - ids.shape[1], states, cross_mask)
        raw_lp = log_softmax(logits[:, -1].astype(np.float32))
        # as in transformers' beam search, processors act on log-probs, not on logits
        scores = _penalize_repeats(raw_lp.copy(), seqs, settings.repetition_penalty)
        if t < settings.min_new_tokens:
            scores[:, eos] = NEG_INF
        vocab = scores.shape[-1]
        total = (scores + beam_scores.reshape(-1, 1)).reshape(batch, n_beams * vocab)
        # 2 * num_beams candidates guarantee num_beams that do not end here
        top = np.argsort(-total, axis=1, kind="stable")[:, : 2 * n_beams]
        top_scores = np.take_along_axis(total, top, axis=1)
        src_beam, tok = top // vocab, top % vocab
        cur_len = prompt_len + t + 1  # length including the token chosen now

        next_src = np.zeros((batch, n_beams), dtype=np.int64)
        next_tok = np.zeros((batch, n_beams), dtype=np.int64)
        next_scores = np.zeros((batch, n_beams))
        for b in range(batch):
            if done[b]:
                next_src[b], next_tok[b] = 0, eos
                next_scores[b] = beam_scores[b]
                continue
            k = 0
            for rank in range(2 * n_beams):
                row = b * n_beams + src_beam[b, rank]
                if tok[b, rank] == eos:
                    # transformers only lets the num_beams best candidates finish
                    if rank >= n_beams:
                        continue
                    lp = [*model_lps[row].tolist(), float(raw_lp[row, eos])]
                    hyp = [*seqs[row, prompt_len:].tolist(), eos]
                    _add_finished(
                        finished[b],
                        n_beams,
                        top_scores[b, rank] / (cur_len - prompt_len) ** settings.length_penalty,
                        hyp,
                        lp,
                    )
                else:
                    next_src[b, k], next_tok[b, k], next_scores[b, k] = (
                        src_beam[b, rank],
                        tok[b, rank],
                        top_scores[b, rank],
                    )
                    k += 1
                if k == n_beams:
                    break
            done[b] = _is_done(
                finished[b], n_beams, next_scores[b].max(), cur_len - prompt_len, settings.length_penalty
            )
        if done.all():
            break
        rows = (np.arange(batch)[:, None] * n_beams + next_src).reshape(-1)
        chosen = next_tok.reshape(-1)
        model_lps = np.concatenate([model_lps[rows], raw_lp[rows, chosen][:, None]], axis=1)
        seqs = np.concatenate([seqs[rows], chosen[:, None]], axis=1)
        past = past[:, :, rows]
        beam_scores = next_scores
        ids = chosen[:, None]
    else:
        # max_new_tokens reached: the running beams compete with the finished ones as they are
        for b in range(batch):
            if done[b]:
                continue
            for j in range(n_beams):
                row = b * n_beams + j
                score = beam_scores[b, j] / (seqs.shape[1] - prompt_len) ** settings.length_penalty
                _add_finished(
                    finished[b], n_beams, score, seqs[row, prompt_len:].tolist(), model_lps[row].tolist()
                )
    best = [max(f, key=lambda h: h[0]) for f in finished]
    return [Sequence(tokens, lps) for _, tokens, lps in best]


def _add_finished(
    hyps: list[tuple[float, list[int], list[float]]],
    n_beams: int,
    score: float,
    tokens: list[int],
    lps: list[float],
) -> None:
    if len(hyps) < n_beams or score > min(h[0] for h in hyps):
        hyps.append((float(score), tokens, lps))
        if len(hyps) > n_beams:
            hyps.remove(min(hyps, key=lambda h: h[0]))


def _is_done(
    hyps: list[tuple[float, list[int], list[float]]],
    n_beams: int,
    best_running: float,
    length: int,
    penalty: float,
) -> bool:
    # transformers' early_stopping=False heuristic: the best running beam, scored at the current
    # length, can no longer beat the worst finished hypothesis
    if len(hyps) < n_beams:
        return False
    return min(h[0] for h in hyps) >= best_running / length**penalty
