"""The generation loop: prefill, batched decode on the paged KV cache, stopping, streaming.

All active sequences advance together: one forward per step with every sequence's new token
(a flattened batch), so prompts of different lengths batch without padding, and a batch gives
each prompt exactly what it gets alone under greedy decoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from codegen_q.kv_cache import DEFAULT_BLOCK_SIZE
from codegen_q.memory_plan import USABLE_FRACTION, GenerationPlan, available_bytes, generation_plan
from codegen_q.sampling import MAX_SEED, SamplingParams, check_seed, next_token
from codegen_q.tokenizer import CodeGenTokenizer, IncrementalDecoder

# A new top-level statement at column 0 ends a code completion (cf. transformers' CodeGen
# `truncate_before_pattern`); the match is cut together with the newline before it.
TOP_LEVEL_PATTERNS = (r"\n(?=def |class |if __name__|print\()",)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length" or "eos"
    prompt_tokens: int


@dataclass
class _Request:
    index: int
    prompt_ids: list[int]
    decoder: IncrementalDecoder
    generator: torch.Generator | None
    max_new_tokens: int
    seq_id: int = -1
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cut_at: int | None = None  # text length after stop-string / pattern truncation
    emitted: int = 0           # characters already streamed


class Generator:
    """Runs one group of requests; `steps()` yields (request index, text delta) while decoding."""

    def __init__(self, model, tokenizer: CodeGenTokenizer, requests: Sequence[_Request], params: SamplingParams,
                 stop: Sequence[str], stop_patterns: Sequence[str],
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.progress = progress
        self.stop = list(stop)
        self.patterns = [re.compile(p) for p in stop_patterns]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.requests = list(requests)
        self.vocab_limit = min(len(tokenizer), model.config.vocab_size)

    @classmethod
    def for_prompts(cls, model, tokenizer: CodeGenTokenizer, prompts: Sequence[str],
                    max_new_tokens: int | str | None, params: SamplingParams, seed: int | None = None,
                    stop: Sequence[str] = (), stop_patterns: Sequence[str] = ()) -> "Generator":
        """One runner for all of ``prompts`` (no memory planning: generate() does that)."""
        return cls(model, tokenizer, _requests(model, tokenizer, prompts, max_new_tokens, params, seed), params,
                   stop, stop_patterns)

    def steps(self) -> Iterator[tuple[int, str]]:
        # Each sequence owns whole blocks, so size the pool per sequence, rounded up to blocks.
        block = DEFAULT_BLOCK_SIZE
        tokens = sum(-(-(len(r.prompt_ids) + r.max_new_tokens) // block) * block for r in self.requests)
        cache = self.cache = self.model.new_cache(tokens, block_size=block)
        try:
            for r in self.requests:
                r.seq_id = cache.add_sequence()
            active = list(self.requests)
            # Plain greedy decode steps let the model pick the tokens (natively where it can).
            greedy = self.params.temperature == 0 and self.params.repetition_penalty == 1.0
            prompts = True
            while active:
                seqs = [r.seq_id for r in active]
                if greedy and not prompts:
                    picks = self.model.greedy_step([r.token_ids[-1] for r in active], cache, seqs, self.vocab_limit)
                else:
                    inputs = [torch.tensor(r.prompt_ids if prompts else [r.token_ids[-1]]) for r in active]
                    logits = self.model.forward(inputs, cache, seqs, on_layer=self.progress if prompts else None)
                    picks = [self._choose(r, lg[-1]) for r, lg in zip(active, logits)]
                prompts = False
                for r, tok in zip(active, picks):
                    delta = self._advance(r, tok)
                    if delta:
                        yield r.index, delta
                for r in active:
                    if r.finish_reason is not None:
                        cache.free(r.seq_id)
                active = [r for r in active if r.finish_reason is None]
        finally:  # normal end, error, or a stream closed early: every block goes back
            for r in self.requests:
                cache.free(r.seq_id)

    def completions(self) -> list[Completion]:
        return [Completion(self._final_text(r), r.token_ids, r.finish_reason or "length", len(r.prompt_ids))
                for r in self.requests]

    def _choose(self, r: _Request, logits: torch.Tensor) -> int:
        return next_token(logits, self.params, self.vocab_limit, r.prompt_ids + r.token_ids, r.generator)

    def _advance(self, r: _Request, tok: int) -> str:
        if tok == self.tokenizer.eos_token_id:
            r.finish_reason = "eos"
            return self._flush(r)
        r.token_ids.append(tok)
        r.decoder.push(tok)
        cut = self._find_stop(r.decoder.text)
        if cut is not None:
            r.cut_at, r.finish_reason = cut, "stop"
            return self._flush(r)
        if len(r.token_ids) >= r.max_new_tokens:
            r.finish_reason = "length"
            return self._flush(r)
        # Hold back what could still turn out to be the start of a stop string.
        safe = max(r.emitted, len(r.decoder.text) - self.holdback)
        delta = r.decoder.text[r.emitted:safe]
        r.emitted = safe
        return delta

    def _find_stop(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop if s in text]
        hits += [m.start() for p in self.patterns for m in [p.search(text)] if m]
        return min(hits) if hits else None

    def _final_text(self, r: _Request) -> str:
        if r.cut_at is not None:
            return r.decoder.text[: r.cut_at]
        # The streaming decoder holds back an incomplete trailing character; at the end the text
        # is everything the tokens decode to (the decoder's text is a prefix of it).
        return self.tokenizer.decode(r.token_ids)

    def _flush(self, r: _Request) -> str:
        text = self._final_text(r)
        delta = text[r.emitted:]
        r.emitted = len(text)
        return delta


_KNOWN = {"max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop",
          "stop_patterns", "stop_at_top_level", "stream", "progress"}


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
             **unknown):
    """Complete one prompt or a list of prompts with a loaded model (see codegen_q.load).

    Returns a Completion (or a list, for a list of prompts). With stream=True, returns an iterator
    of text deltas (for a list of prompts: (index, delta) pairs); each delta is valid UTF-8 text and
    stop strings are never streamed. ``max_new_tokens``: an int (the prompt plus it must fit the
    context), None or "auto" (until the context is full), or by default 128 capped at the context.
    ``progress(layers_done, layers_total)``, if given, is called as the prompt pass goes through the
    model's blocks (a 2000-token prompt on a 6B model takes minutes on a laptop CPU before the first
    token).

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
    core = getattr(model, "model", model)
    requests = _requests(core, tokenizer, prompts, max_new_tokens, params, seed)
    parts = _parts_that_fit(core, requests)
    # One runner (and one KV pool) at a time: a part's pool is freed before the next is allocated.
    runners = (Generator(core, tokenizer, part, params, stop, patterns, progress) for part in parts)
    if stream:
        return _stream(runners, single)
    done = []
    for runner in runners:
        for _ in runner.steps():
            pass
        done += runner.completions()
    return done[0] if single else done


class InsufficientMemory(MemoryError):
    """A prompt needs more memory (KV cache and activations) than the device has available."""


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
              seed: int | None) -> list[_Request]:
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
        gen = None
        if params.temperature > 0:
            gen = torch.Generator()
            gen.manual_seed((seed if seed is not None else torch.seed() % (MAX_SEED + 1)) + i)
        out.append(_Request(i, ids, IncrementalDecoder(tokenizer), gen, budget))
    return out


def _plan(model, requests: Sequence[_Request], available: int) -> GenerationPlan:
    return generation_plan(model.config, [len(r.prompt_ids) for r in requests], [r.max_new_tokens for r in requests],
                           DEFAULT_BLOCK_SIZE, model.kv_dtype, model.dtype, available)


def _parts_that_fit(model, requests: list[_Request]) -> list[list[_Request]]:
    """The requests in consecutive groups whose memory plan fits (one group when the whole batch does)."""
    available = available_bytes(model.device)
    if _plan(model, requests, available).fits:
        return [requests]
    parts: list[list[_Request]] = []
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


def _stream(runners: Iterator[Generator], single: bool):
    for runner in runners:
        for index, delta in runner.steps():
            yield delta if single else (index, delta)
