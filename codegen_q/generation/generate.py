"""generate(): complete prompts with a loaded model, on the engine (codegen_q/generation/engine.py).

generate() checks its arguments, tokenizes, plans the memory of the batch before anything is
allocated, and runs the prompts on an Engine whose pool holds them all at once: all prompts
start together, so its prompt pass and every decode step is one forward over the whole batch (a
flattened batch: prompts of different lengths batch without padding, and a batch gives each
prompt exactly what it gets alone under greedy decoding). Prompts with a common prefix compute
it once: the engine's prefix caching lets the later ones start on the first one's blocks, a
step after it. A batch that does not fit runs in consecutive parts, each on its own engine whose
pool is freed before the next is allocated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from codegen_q.generation.engine import Completion, Engine, InsufficientMemory, TokenLogprob, check_logprobs
from codegen_q.model.kv_cache import DEFAULT_BLOCK_SIZE
from codegen_q.model.memory_plan import GenerationPlan, available_bytes, generation_plan
from codegen_q.generation.sampling import MAX_SEED, SamplingParams, check_seed
from codegen_q.generation.tokenizer import CodeGenTokenizer

# Completion, TokenLogprob and InsufficientMemory live with the engine; generate() callers import them from here.
__all__ = ["Completion", "InsufficientMemory", "TokenLogprob", "check_text", "generate"]

# A new top-level statement at column 0 ends a code completion (cf. transformers' CodeGen
# `truncate_before_pattern`); the match is cut together with the newline before it.
TOP_LEVEL_PATTERNS = (r"\n(?=def |class |if __name__|print\()",)


@dataclass
class _Prompt:
    """One tokenized prompt of a generate() call, with its budget and sampling seed."""

    index: int
    prompt_ids: list[int]
    max_new_tokens: int
    seed: int | None  # None for greedy decoding


_KNOWN = {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop",
          "stop_patterns", "stop_at_top_level", "stream", "progress", "logprobs"}


class _CappedDefault(int):
    """max_new_tokens when the caller gave none: this many, or fewer where the context ends first."""

    def __repr__(self) -> str:
        return f"{int(self)} (capped at the context)"


DEFAULT_MAX_NEW_TOKENS = _CappedDefault(128)


def generate(model, prompt: str | Sequence[str], *, max_new_tokens: int | str | None = DEFAULT_MAX_NEW_TOKENS,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             seed: int | None = None, stop: str | Sequence[str] | None = None,
             stop_patterns: Sequence[str] | None = None, stop_at_top_level: bool = False, stream: bool = False,
             tokenizer: CodeGenTokenizer | None = None, progress: Callable[[int, int], None] | None = None,
             logprobs: int | None = None, **unknown):
    """Complete one prompt or a list of prompts with a loaded model (see codegen_q.load).

    Returns a Completion (or a list, for a list of prompts). With stream=True, returns an iterator
    of text deltas (for a list of prompts: (index, delta) pairs); each delta is valid UTF-8 text and
    stop strings are never streamed. ``max_new_tokens``: an int (the prompt plus it must fit the
    context), None or "auto" (until the context is full), or by default 128 capped at the context.
    ``progress(layers_done, layers_total)``, if given, is called as the prompt pass goes through the
    model's blocks (a 2000-token prompt on a 6B model takes minutes on a laptop CPU before the first
    token). ``logprobs``: None, or an int 0-20: each Completion's ``logprobs`` then holds, per token
    id, its log-probability under the model and that many most likely alternatives (TokenLogprob).

    The KV cache and the prompt pass's activations are planned before anything is allocated: a
    batch that does not fit in the memory available runs in consecutive parts (each prompt gets
    what it gets alone under greedy decoding either way), and a single prompt that does not fit is
    refused with the figures (InsufficientMemory).
    """
    if unknown:
        raise TypeError(f"unknown argument(s) to generate(): {', '.join(sorted(unknown))}; "
                        f"expected some of {', '.join(sorted(_KNOWN))}")
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("generate() needs a tokenizer: load the model with codegen_q.load, or pass tokenizer=")
    single = isinstance(prompt, str)
    if not single and not isinstance(prompt, (list, tuple)):
        raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    prompts = [prompt] if single else list(prompt)
    if not prompts:
        raise ValueError("prompt is an empty list; give at least one prompt")
    for i, p in enumerate(prompts):
        check_text(p, "prompt" if single else f"prompt {i}")
    _check_max_new_tokens(max_new_tokens)
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    stop = list(stop or [])
    for s in stop:
        check_text(s, "each stop string")
        if not s:
            raise ValueError("stop strings must not be empty")
    if stop_patterns is not None and not isinstance(stop_patterns, (list, tuple)):
        raise TypeError(f"stop_patterns must be a list of regular expressions, got {type(stop_patterns).__name__}")
    patterns = list(stop_patterns or []) + (list(TOP_LEVEL_PATTERNS) if stop_at_top_level else [])
    for p in patterns:
        check_text(p, "each stop pattern")
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"stop pattern {p!r} is not a valid regular expression: {exc}") from None
    for name, flag in (("stream", stream), ("stop_at_top_level", stop_at_top_level)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable (layers_done, layers_total) or None, got {progress!r}")
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    check_seed(seed)
    check_logprobs(logprobs)
    core = getattr(model, "model", model)
    requests = _requests(core, tokenizer, prompts, max_new_tokens, params, seed)
    parts = _parts_that_fit(core, requests)
    done: dict[int, Completion] = {}
    # One part (one engine and its KV pool) at a time: a part's pool is freed before the next is allocated.
    runs = (_run_part(core, tokenizer, part, params, stop, patterns, progress, logprobs, done) for part in parts)
    if stream:
        return _stream(runs, single)
    for run in runs:
        for _ in run:
            pass
    return done[0] if single else [done[i] for i in range(len(prompts))]


def check_text(value: object, what: str) -> str:
    """``value`` if it is a str that UTF-8 can encode; TypeError / ValueError naming ``what`` otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid text: it holds the lone surrogate U+{ord(value[exc.start]):04X} at "
                         f"character {exc.start} (was it decoded from bytes that are not UTF-8?)") from None
    return value


def _up_to_context(value: object) -> bool:
    return value is None or (isinstance(value, str) and value == "auto")


def _check_max_new_tokens(value: object) -> None:
    if _up_to_context(value):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, None or 'auto' (up to the context), got {value!r}")


def _requests(model, tokenizer: CodeGenTokenizer, prompts: Sequence[str], max_new_tokens, params: SamplingParams,
              seed: int | None) -> list[_Prompt]:
    """The prompts tokenized, each with its budget of new tokens (checked against the context)
    and, when sampling, its seed: prompt i of a batch is seeded with seed + i."""
    context = model.config.n_positions
    out = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError(f"prompt {i} is empty; give at least one character of text")
        room = context - len(ids)
        if room < 1:
            raise ValueError(f"prompt {i} has {len(ids)} tokens: with even one new token it would exceed the model's "
                             f"context of {context} tokens; shorten it")
        if _up_to_context(max_new_tokens):
            budget = room
        elif type(max_new_tokens) is _CappedDefault:
            budget = min(int(max_new_tokens), room)
        elif max_new_tokens > room:
            raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it would "
                             f"exceed the model's context of {context} tokens (at most {room} more fit; "
                             f"max_new_tokens=None generates up to the context)")
        else:
            budget = max_new_tokens
        own_seed = None
        if params.temperature > 0:
            own_seed = (seed if seed is not None else torch.seed() % (MAX_SEED + 1)) + i
        out.append(_Prompt(i, ids, budget, own_seed))
    return out


def _plan(model, requests: Sequence[_Prompt], available: int) -> GenerationPlan:
    return generation_plan(model.config, [len(r.prompt_ids) for r in requests], [r.max_new_tokens for r in requests],
                           DEFAULT_BLOCK_SIZE, model.kv_dtype, model.dtype, available)


def _parts_that_fit(model, requests: list[_Prompt]) -> list[list[_Prompt]]:
    """The requests in consecutive groups whose memory plan fits (one group when the whole batch does)."""
    available = available_bytes(model.device)
    if _plan(model, requests, available).fits:
        return [requests]
    parts: list[list[_Prompt]] = []
    for r in requests:
        alone = _plan(model, [r], available)
        if not alone.fits:
            raise InsufficientMemory(f"prompt {r.index} ({len(r.prompt_ids)} tokens, up to {r.max_new_tokens} new) "
                                     f"{alone.describe()}; lower max_new_tokens or shorten the prompt")
        if parts and _plan(model, parts[-1] + [r], available).fits:
            parts[-1].append(r)
        else:
            parts.append([r])
    return parts


def _run_part(model, tokenizer: CodeGenTokenizer, part: list[_Prompt], params: SamplingParams, stop: list[str],
              patterns: list[str], progress: Callable[[int, int], None] | None, logprobs: int | None,
              done: dict[int, Completion]) -> Iterator[tuple[int, str]]:
    """Run one part to its end on an engine whose pool holds all its prompts at once, yielding
    (prompt index, text delta) and filling done[index] as each one finishes. However it ends
    (finished, an error, or a stream closed early), every block goes back."""
    block = DEFAULT_BLOCK_SIZE
    engine = Engine(model, tokenizer, kv_tokens=sum(_whole_blocks(p, block) for p in part), block_size=block,
                    max_batch=len(part), max_queue=len(part),
                    max_prefill_tokens=sum(len(p.prompt_ids) for p in part), progress=progress)
    index = {engine.add_request(p.prompt_ids, params, p.max_new_tokens, stop, patterns, p.seed, logprobs): p.index
             for p in part}
    try:
        while engine.has_unfinished():
            for out in engine.step():
                if out.completion is not None:
                    done[index[out.request_id]] = out.completion
                if out.delta:
                    yield index[out.request_id], out.delta
    finally:
        for request_id in index:
            engine.abort(request_id)


def _whole_blocks(p: _Prompt, block: int) -> int:
    """The tokens of the blocks a prompt and its new tokens take: a sequence owns whole blocks."""
    return -(-(len(p.prompt_ids) + p.max_new_tokens) // block) * block


def _stream(runs: Iterator[Iterator[tuple[int, str]]], single: bool):
    for run in runs:
        for index, delta in run:
            yield delta if single else (index, delta)
