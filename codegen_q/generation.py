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
from codegen_q.sampling import SamplingParams, next_token
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
    seq_id: int = -1
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cut_at: int | None = None  # text length after stop-string / pattern truncation
    emitted: int = 0           # characters already streamed


class Generator:
    """Runs one generate() call; `steps()` yields (request index, text delta) while decoding."""

    def __init__(self, model, tokenizer: CodeGenTokenizer, prompts: Sequence[str], max_new_tokens: int,
                 params: SamplingParams, seed: int | None, stop: Sequence[str], stop_patterns: Sequence[str],
                 progress: Callable[[int, int], None] | None = None) -> None:
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.progress = progress
        self.max_new_tokens = max_new_tokens
        self.stop = list(stop)
        self.patterns = [re.compile(p) for p in stop_patterns]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        context = model.config.n_positions
        self.requests = []
        for i, prompt in enumerate(prompts):
            ids = tokenizer.encode(prompt)
            if not ids:
                raise ValueError(f"prompt {i} is empty; give at least one character of text")
            if len(ids) + max_new_tokens > context:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it would "
                                 f"exceed the model's context of {context} tokens")
            gen = None
            if params.temperature > 0:
                gen = torch.Generator()
                gen.manual_seed((seed if seed is not None else torch.seed()) + i)
            self.requests.append(_Request(i, ids, IncrementalDecoder(tokenizer), gen))
        self.vocab_limit = min(len(tokenizer), model.config.vocab_size)

    def steps(self) -> Iterator[tuple[int, str]]:
        # Each sequence owns whole blocks, so size the pool per sequence, rounded up to blocks.
        block = DEFAULT_BLOCK_SIZE
        tokens = sum(-(-(len(r.prompt_ids) + self.max_new_tokens) // block) * block for r in self.requests)
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
        if len(r.token_ids) >= self.max_new_tokens:
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


def generate(model, prompt: str | Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: Sequence[str] | None = None, stop_patterns: Sequence[str] | None = None,
             stop_at_top_level: bool = False, stream: bool = False, tokenizer: CodeGenTokenizer | None = None,
             progress: Callable[[int, int], None] | None = None, **unknown):
    """Complete one prompt or a list of prompts with a loaded model (see codegen_q.load).

    Returns a Completion (or a list, for a list of prompts). With stream=True, returns an iterator
    of text deltas (for a list of prompts: (index, delta) pairs); each delta is valid UTF-8 text and
    stop strings are never streamed. ``progress(layers_done, layers_total)``, if given, is called
    as the prompt pass goes through the model's blocks (a 2000-token prompt on a 6B model takes
    minutes on a laptop CPU before the first token).
    """
    if unknown:
        raise ValueError(f"unknown argument(s) to generate(): {', '.join(sorted(unknown))}; "
                         f"expected some of {', '.join(sorted(_KNOWN))}")
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("generate() needs a tokenizer: load the model with codegen_q.load, or pass tokenizer=")
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a str or a non-empty list of str")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError("stop must be a non-empty string or a list of non-empty strings")
    patterns = list(stop_patterns or []) + (list(TOP_LEVEL_PATTERNS) if stop_at_top_level else [])
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"stop pattern {p!r} is not a valid regular expression: {exc}") from None
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be a callable (layers_done, layers_total) or None, got {progress!r}")
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    runner = Generator(getattr(model, "model", model), tokenizer, prompts, max_new_tokens, params, seed, stop, patterns,
                       progress)
    if stream:
        return _stream(runner, single)
    for _ in runner.steps():
        pass
    done = runner.completions()
    return done[0] if single else done


def _stream(runner: Generator, single: bool):
    for index, delta in runner.steps():
        yield delta if single else (index, delta)
