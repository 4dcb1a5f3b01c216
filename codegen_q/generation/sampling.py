"""Choosing the next token from logits: padding mask, repetition penalty, presence / frequency
penalties, temperature, top-k, top-p."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    repetition_penalty: float = 1.0
    # OpenAI's penalties, on the tokens generated so far (not the prompt): a token's logit loses
    # presence_penalty once it has appeared, and frequency_penalty for each time it has.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not _finite_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 turns it off), got {self.top_k!r}")
        if not _finite_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _finite_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 turns it off), "
                             f"got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be a number from -{MAX_PENALTY} to {MAX_PENALTY} (0 turns it off), "
                                 f"got {value!r}")

    @property
    def penalizes_generated(self) -> bool:
        """Whether the presence or frequency penalty is on (the logits depend on what was generated)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


# OpenAI's range for presence_penalty and frequency_penalty.
MAX_PENALTY = 2.0
# torch.Generator.manual_seed takes 64-bit seeds; request i of a batch is seeded with seed + i.
MAX_SEED = 2**63 - 1


def check_seed(seed: object, largest: int = MAX_SEED) -> None:
    """ValueError unless seed is None or an int in [0, largest] (torch.Generator takes up to 2**64 - 1;
    callers that add a request's index to a seed allow less)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= largest):
        bound = f"2**{(largest + 1).bit_length() - 1} - 1" if (largest + 1) & largest == 0 else str(largest)
        raise ValueError(f"seed must be None or an int in [0, {bound}], got {seed!r}")


def _finite_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def next_token(logits: torch.Tensor, params: SamplingParams, vocab_limit: int, seen: list[int],
               generator: torch.Generator | None, generated: Sequence[int] = ()) -> int:
    """One token id from fp32 logits [vocab] of one sequence; ``seen``: the prompt and the tokens
    generated so far (the repetition penalty's), ``generated``: those generated (the presence and
    frequency penalties').

    Rows at or past `vocab_limit` (the tokenizer's size) are embedding padding and never chosen.
    """
    if params.temperature == 0 and params.repetition_penalty == 1.0 and not params.penalizes_generated:
        # plain greedy: no copy needed
        return int(torch.argmax(logits[:vocab_limit]))
    logits = logits.float().clone()
    logits[vocab_limit:] = float("-inf")
    if params.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
        picked = logits[idx]
        logits[idx] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if params.penalizes_generated and generated:
        idx, counts = torch.unique(torch.tensor(list(generated), dtype=torch.long), return_counts=True)
        logits[idx] -= params.presence_penalty + params.frequency_penalty * counts.float()
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p  # keep the first token always
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, vocab_limit: int, token: int, top_n: int) -> tuple[float, dict[int, float]]:
    """The log-probability of ``token`` under fp32 logits [vocab] of one sequence, and the top_n
    most likely tokens (id -> log-probability, most likely first).

    The model's own distribution: log_softmax over the real vocabulary (rows at or past
    `vocab_limit` are padding, never chosen, so never counted), before temperature, top-k/top-p
    and the repetition penalty, which shape the choice but not what the model thought of it.
    """
    logprobs = torch.log_softmax(logits[:vocab_limit].float(), dim=-1)
    top: dict[int, float] = {}
    if top_n:
        values, ids = torch.topk(logprobs, min(top_n, vocab_limit))
        top = dict(zip(ids.tolist(), values.tolist()))
    return float(logprobs[token]), top
