"""The engine: one model, its tokenizer and ONE paged KV pool, serving every request that comes.

generate() and a completion server run through this same loop, so batching, stopping, streaming
and sampling behave the same for both. Requests join the running batch between decode steps
(continuous batching): each step runs one decode step over the running requests (one token per
sequence, a flattened batch), then the prompts of admitted requests in one forward, at most
max_prefill_tokens of them; a longer prompt goes in chunks over several steps (chunked prefill),
each continuing the KV sequence the last one wrote. A request gets what it gets alone under
greedy decoding, whenever it joined and however its prompt was cut.

Admission reserves, up front, every block a request can need (its prompt plus max_new_tokens):
a running request then never runs out of blocks mid-decode, and nothing ever has to be
preempted. A request the pool cannot hold yet waits in a first-in-first-out queue (no request
overtakes an earlier one, so a long one is never starved by short ones) until finished or
aborted requests give their blocks back.

Prefix caching (on by default; kv_cache.py keeps the blocks): once a prompt pass has written a
request's full blocks, they are cached under the chain hash of their tokens, and so are blocks
that fill while decoding. A request admitted later starts on the cached blocks of its longest
cached prefix, shared read-only, and its prompt pass computes only the rest. The block holding a
prompt's last token is always computed again (it yields the logits of the first new token, and
the request writes past it, never into a shared block). Admission stays exact: a request takes
the free blocks its uncached tokens need plus the evictable cached blocks it starts on; free
blocks include evictable ones (a reservation evicts the least recently used). A request whose
next block an admitted, not yet run prompt is computing waits one step to share it, so a batch
with a common prefix (one generate() call) computes it once.

Not thread-safe: one thread drives an engine (a server's scheduler loop).
"""

from __future__ import annotations

import collections
import re
import secrets
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from codegen_q.model.kv_cache import DEFAULT_BLOCK_SIZE, block_hashes
from codegen_q.model.memory_plan import (USABLE_FRACTION, GenerationPlan, available_bytes, kv_cache_bytes,
                                   prompt_activation_bytes)
from codegen_q.generation.sampling import SamplingParams, check_seed, next_token, token_logprobs
from codegen_q.generation.tokenizer import CodeGenTokenizer, IncrementalDecoder

# The most alternatives a request may ask for per token (OpenAI's completions API allows as many).
MAX_LOGPROBS = 20
# torch.Generator.manual_seed takes any 64-bit unsigned seed (generate() seeds prompt i with seed + i).
SEED_LIMIT = 2**64


class QueueFull(RuntimeError):
    """The engine already has max_queue requests waiting (a server answers 429: try again later)."""


class InsufficientMemory(MemoryError):
    """A prompt needs more memory (KV cache and activations) than the device has available."""


@dataclass
class TokenLogprob:
    """A chosen token's log-probability under the model (log_softmax of its logits over the real
    vocabulary, before temperature, top-k/top-p and the repetition penalty), and the ``top``
    most likely tokens of that step (token id -> log-probability, most likely first)."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length" or "eos"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for


@dataclass
class StepOutput:
    """What one step did for one request: the text it may stream now (valid UTF-8, never any part
    of a stop string), the token it chose (none when the step ended it with EOS), and on its last
    output the finish reason and the whole completion."""

    request_id: int
    delta: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    completion: Completion | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)  # compared by identity: queue removal must find this very request
class _Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str]
    patterns: list[re.Pattern]
    generator: torch.Generator | None
    logprobs: int | None
    decoder: IncrementalDecoder
    seq_id: int | None = None  # its KV sequence, once admitted
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of its full blocks (prefix caching)
    cached_tokens: int = 0  # prompt tokens it started on from the prefix cache
    prefilled: int = 0      # prompt tokens in its KV sequence (cached ones, then each chunk computed)
    registered: int = 0     # its first blocks known to be in the prefix cache
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    cut_at: int | None = None  # text length after stop-string / pattern truncation
    emitted: int = 0           # characters already streamed

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet in its KV sequence (0 once its prompt pass is complete)."""
        return len(self.prompt_ids) - self.prefilled

    @property
    def holdback(self) -> int:
        """Characters of the text's tail that could still turn out to begin a stop string."""
        return max((len(s) for s in self.stop), default=1) - 1

    @property
    def plain_greedy(self) -> bool:
        """Whether the fused greedy step may choose its tokens: it gives no logits."""
        p = self.params
        return (p.temperature == 0 and p.repetition_penalty == 1.0 and not p.penalizes_generated
                and self.logprobs is None)


class Engine:
    """Continuous batching over one KV pool: add_request() queues, step() advances, abort() cancels.

    ``kv_tokens``: the pool's size in tokens (rounded up to blocks); by default room for
    ``max_batch`` full contexts, or as many tokens as the memory available holds besides one
    prompt pass (InsufficientMemory, with the figures, when that is not even one full context).
    ``max_batch`` caps the requests running at once, ``max_queue`` those waiting, and
    ``max_prefill_tokens`` (default: the context) the prompt tokens one step computes, so a burst
    of long prompts neither stalls the running requests for long nor takes more activation memory
    than that many tokens: whole prompts join a step's pass while they fit, and a prompt longer
    than the whole budget is computed in chunks of that size over consecutive steps (chunked
    prefill), the running requests decoding a token between them.
    ``progress(layers_done, layers_total)`` is called as each prompt pass goes through the blocks.
    ``prefix_caching``: reuse the K/V of cached prompt prefixes (see the module docstring).
    """

    def __init__(self, model, tokenizer: CodeGenTokenizer | None = None, *, kv_tokens: int | None = None,
                 max_batch: int = 8, max_queue: int = 64, max_prefill_tokens: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, progress: Callable[[int, int], None] | None = None,
                 prefix_caching: bool = True) -> None:
        self.model = getattr(model, "model", model)  # a LoadedModel or a CodeGenModel
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("the engine needs a tokenizer: pass a model from codegen_q.load, or tokenizer=")
        config = self.model.config
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("block_size", block_size)):
            _check_positive_int(name, value)
        if max_prefill_tokens is not None:
            _check_positive_int("max_prefill_tokens", max_prefill_tokens)
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a callable (layers_done, layers_total) or None, got {progress!r}")
        if not isinstance(prefix_caching, bool):
            raise TypeError(f"prefix_caching must be True or False, got {prefix_caching!r}")
        self.max_batch, self.max_queue, self.progress = max_batch, max_queue, progress
        self.prefix_caching = prefix_caching
        self.max_prefill_tokens = max_prefill_tokens or config.n_positions
        if kv_tokens is None:
            kv_tokens = _planned_pool_tokens(self.model, max_batch, self.max_prefill_tokens, block_size)
        _check_positive_int("kv_tokens", kv_tokens)
        self.cache = self.model.new_cache(kv_tokens, block_size=block_size)
        self.vocab_limit = min(len(self.tokenizer), config.vocab_size)
        self._queue: collections.deque[_Request] = collections.deque()
        self._admitted: list[_Request] = []  # blocks reserved, prompt not run yet
        self._running: list[_Request] = []   # prompt run, decoding
        self._requests: dict[int, _Request] = {}  # every unfinished request, by id
        self._undelivered: list[StepOutput] = []  # made by a step that then raised
        self._next_id = 0
        # Prompt tokens of admitted requests, and how many of them came from the prefix cache.
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0

    # ----------------------------------------------------------------------------------------
    # What callers use

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None, max_new_tokens: int,
                    stop: str | Sequence[str] = (), stop_patterns: Sequence[str | re.Pattern] = (),
                    seed: int | None = None, logprobs: int | None = None) -> int:
        """Queue a request and return its id; it starts at a step where the pool has room for its
        prompt plus max_new_tokens. ``params`` None is greedy; ``seed`` seeds its own sampling
        generator (None: a random seed), so what it samples does not depend on what else runs;
        ``logprobs``: None, or how many alternatives (0-20) to report besides each chosen token.
        ValueError / TypeError for a request that could never run, QueueFull when max_queue
        requests wait already."""
        r = self._new_request(prompt_ids, params, max_new_tokens, stop, stop_patterns, seed, logprobs)
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} requests are waiting already (max_queue={self.max_queue}); "
                            f"try again when some have started")
        self._next_id += 1
        self._queue.append(r)
        self._requests[r.id] = r
        return r.id

    def step(self) -> list[StepOutput]:
        """One iteration: a decode step over the running requests, then the prompt pass of the
        requests admitted now (blocks that finished requests just gave back count already).
        Returns one output per request that chose a token or ended.

        A forward that raises leaves its requests as they were (the model restores the cache),
        so the next step tries it again, or the caller aborts them; outputs the step made before
        the error come with the next step's, so no token or text is lost."""
        outputs, self._undelivered = self._undelivered, []
        try:
            if self._running:
                outputs += self._decode()
            self._admit()
            if self._admitted:
                outputs += self._run_prompts()
        except BaseException:
            self._undelivered = outputs
            raise
        return outputs

    def abort(self, request_id: int) -> bool:
        """Drop a waiting or running request and give its blocks back at once; False when no
        such request is unfinished (already finished or aborted: aborting is idempotent)."""
        r = self._requests.pop(request_id, None)
        if r is None:
            return False
        self._undelivered = [o for o in self._undelivered if o.request_id != request_id]
        for group in (self._queue, self._admitted, self._running):
            if r in group:
                group.remove(r)
        if r.seq_id is not None:
            self.cache.free(r.seq_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    @property
    def num_running(self) -> int:
        return len(self._admitted) + len(self._running)

    def pool_is_whole(self) -> bool:
        """Whether no request holds a block: each is empty or an evictable cached one (always so
        once nothing is unfinished)."""
        return self.cache.num_free_blocks == self.cache.num_blocks

    @property
    def num_evictable_blocks(self) -> int:
        """Free blocks still caching a prefix (cache.num_evictable_blocks)."""
        return self.cache.num_evictable_blocks

    # ----------------------------------------------------------------------------------------
    # Requests in

    def _new_request(self, prompt_ids, params, max_new_tokens, stop, stop_patterns, seed, logprobs) -> _Request:
        prompt_ids = self._check_prompt(prompt_ids)
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams or None (greedy), got {type(params).__name__}")
        self._check_budget(len(prompt_ids), max_new_tokens)
        stop = [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop strings must be non-empty str, got {stop!r}")
        patterns = [_compiled(p) for p in ([stop_patterns] if isinstance(stop_patterns, str) else stop_patterns)]
        check_seed(seed, largest=SEED_LIMIT - 1)
        check_logprobs(logprobs)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator()
            generator.manual_seed(secrets.randbits(63) if seed is None else seed)
        r = _Request(self._next_id, prompt_ids, params, max_new_tokens, stop, patterns, generator, logprobs,
                     IncrementalDecoder(self.tokenizer))
        if self.prefix_caching:
            r.hashes = block_hashes(prompt_ids, self.cache.block_size)
        return r

    def _check_prompt(self, prompt_ids) -> list[int]:
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
            raise TypeError(f"prompt_ids must be a list of token ids, got {type(prompt_ids).__name__}")
        if not prompt_ids:
            raise ValueError("prompt_ids is empty; give at least one token")
        rows = self.model.wte.shape[0]
        for t in prompt_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < rows:
                raise ValueError(f"prompt token {t!r} is not an id of the model's {rows} embedding rows")
        return list(prompt_ids)

    def _check_budget(self, prompt_tokens: int, max_new_tokens: object) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        context = self.model.config.n_positions
        if prompt_tokens + max_new_tokens > context:
            raise ValueError(f"a prompt of {prompt_tokens} tokens with max_new_tokens={max_new_tokens} would exceed "
                             f"the model's context of {context} tokens")
        blocks = self._blocks_for(prompt_tokens + max_new_tokens)
        if blocks > self.cache.num_blocks:
            raise ValueError(f"a prompt of {prompt_tokens} tokens with max_new_tokens={max_new_tokens} needs {blocks} "
                             f"KV blocks and the engine's whole pool has {self.cache.num_blocks}; lower max_new_tokens")

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.cache.block_size)

    def _admit(self) -> None:
        """Start waiting requests, oldest first, while the batch, the step's prompt tokens and the
        pool have room; every block a request can need is taken now (the cached prefix it starts
        on, and fresh blocks for the rest of its prompt plus max_new_tokens)."""
        bs = self.cache.block_size
        budget = self.max_prefill_tokens - sum(r.prompt_left for r in self._admitted)
        # Blocks the admitted prompts will cache once their pass has run.
        coming = {h for r in self._admitted for h in r.hashes[r.registered:]}
        while self._queue and self.num_running < self.max_batch:
            r = self._queue[0]
            prefix = self._usable_prefix(r)
            if len(prefix) < self._shareable_blocks(r) and r.hashes[len(prefix)] in coming:
                break  # its next block is being computed this step: wait one step and share it
            new_tokens = len(r.prompt_ids) - len(prefix) * bs
            total = len(r.prompt_ids) + r.max_new_tokens
            # Fresh blocks for the rest, and the prefix's evictable blocks, which stop being free.
            cost = self._blocks_for(total) - len(prefix) + sum(map(self.cache.is_evictable, prefix))
            if (self._admitted and new_tokens > budget) or cost > self.cache.num_free_blocks:
                break  # it waits, and so does everything behind it
            self._queue.popleft()
            r.seq_id = self.cache.add_sequence(prefix)  # holds the prefix first, so reserve cannot evict it
            self.cache.reserve({r.seq_id: total - len(prefix) * bs})
            r.cached_tokens, r.registered = len(prefix) * bs, len(prefix)
            r.prefilled = r.cached_tokens
            self.prompt_tokens += len(r.prompt_ids)
            self.cached_prompt_tokens += r.cached_tokens
            self._admitted.append(r)
            coming.update(r.hashes[len(prefix):])
            budget -= new_tokens

    def _shareable_blocks(self, r: _Request) -> int:
        """The most blocks a request may start on: never the one holding its prompt's last token,
        whose pass gives the logits of the first new token (a whole prompt cached still computes
        its last block, into a block of its own)."""
        return (len(r.prompt_ids) - 1) // self.cache.block_size if self.prefix_caching else 0

    def _usable_prefix(self, r: _Request) -> list[int]:
        return self.cache.cached_prefix(r.hashes[: self._shareable_blocks(r)]) if self.prefix_caching else []

    def _cache_full_blocks(self, r: _Request) -> None:
        """Enter a request's blocks that are full and written (prompt or decoded) in the prefix cache."""
        bs = self.cache.block_size
        full = self.cache.length(r.seq_id) // bs
        if full <= r.registered:
            return
        if len(r.hashes) < full:  # blocks filled while decoding: hash them from the tokens now
            r.hashes = block_hashes((r.prompt_ids + r.token_ids)[: full * bs], bs, r.hashes)
        self.cache.register(r.seq_id, r.hashes[r.registered:full], start=r.registered)
        r.registered = full

    # ----------------------------------------------------------------------------------------
    # The model

    def _run_prompts(self) -> list[StepOutput]:
        """This step's prompt pass: the admitted prompts' next tokens within max_prefill_tokens (see
        _prompt_chunks); the requests whose prompt it completes choose their first token and run."""
        batch, counts = self._prompt_chunks()
        completes = [n == r.prompt_left for r, n in zip(batch, counts)]
        logits = self.model.forward([torch.tensor(r.prompt_ids[r.prefilled:r.prefilled + n])
                                     for r, n in zip(batch, counts)], self.cache, [r.seq_id for r in batch],
                                    on_layer=self.progress, logits_for=completes)
        for r, n in zip(batch, counts):
            r.prefilled += n
            if self.prefix_caching:
                self._cache_full_blocks(r)
        done = [r for r, c in zip(batch, completes) if c]
        self._admitted = [r for r in self._admitted if r.prompt_left]
        self._running += done
        return self._choose_all(done, [lg[-1] for lg, c in zip(logits, completes) if c])

    def _prompt_chunks(self) -> tuple[list[_Request], list[int]]:
        """The admitted requests whose prompt tokens this step computes, oldest first, and how many
        of each: whole remaining prompts while they fit in max_prefill_tokens; a first one longer
        than the whole budget gives a chunk of that size (the others wait for the next step)."""
        budget = self.max_prefill_tokens
        batch, counts = [], []
        for r in self._admitted:
            left = r.prompt_left
            take = left if left <= budget else (budget if not batch else 0)
            if take == 0:
                break
            batch.append(r)
            counts.append(take)
            budget -= take
        return batch, counts

    def _decode(self) -> list[StepOutput]:
        batch = list(self._running)
        seqs, last = [r.seq_id for r in batch], [r.token_ids[-1] for r in batch]
        if all(r.plain_greedy for r in batch):  # the fused step picks the tokens natively
            picks = self.model.greedy_step(last, self.cache, seqs, self.vocab_limit)
            self._cache_decoded_blocks(batch)
            return self._advance_all(batch, picks, [None] * len(batch))
        logits = self.model.forward([torch.tensor([t]) for t in last], self.cache, seqs)
        self._cache_decoded_blocks(batch)
        return self._choose_all(batch, [lg[-1] for lg in logits])

    def _cache_decoded_blocks(self, batch: list[_Request]) -> None:
        if self.prefix_caching:
            bs = self.cache.block_size
            for r in batch:
                if self.cache.length(r.seq_id) // bs > r.registered:  # a block just filled
                    self._cache_full_blocks(r)

    def _choose_all(self, batch: list[_Request], rows: list[torch.Tensor]) -> list[StepOutput]:
        picks, logprobs = [], []
        for r, row in zip(batch, rows):
            tok = next_token(row, r.params, self.vocab_limit, r.prompt_ids + r.token_ids, r.generator, r.token_ids)
            picks.append(tok)
            logprobs.append(None if r.logprobs is None else TokenLogprob(
                tok, *token_logprobs(row, self.vocab_limit, tok, r.logprobs)))
        return self._advance_all(batch, picks, logprobs)

    def _advance_all(self, batch: list[_Request], picks: list[int],
                     logprobs: list[TokenLogprob | None]) -> list[StepOutput]:
        outputs = [self._advance(r, tok, lp) for r, tok, lp in zip(batch, picks, logprobs)]
        for r in batch:
            if r.finish_reason is not None:  # its blocks go back before the next admission
                self._running.remove(r)
                del self._requests[r.id]
                self.cache.free(r.seq_id)
        return outputs

    # ----------------------------------------------------------------------------------------
    # Tokens to text: stop strings, holdback, finish

    def _advance(self, r: _Request, tok: int, lp: TokenLogprob | None) -> StepOutput:
        if tok == self.tokenizer.eos_token_id:
            r.finish_reason = "eos"
            return self._output(r, self._flush(r), [], None)
        r.token_ids.append(tok)
        if lp is not None:
            r.token_logprobs.append(lp)
        r.decoder.push(tok)
        cut = self._find_stop(r, r.decoder.text)
        if cut is not None:
            r.cut_at, r.finish_reason = cut, "stop"
            return self._output(r, self._flush(r), [tok], lp)
        if len(r.token_ids) >= r.max_new_tokens:
            r.finish_reason = "length"
            return self._output(r, self._flush(r), [tok], lp)
        safe = max(r.emitted, len(r.decoder.text) - r.holdback)
        delta = r.decoder.text[r.emitted:safe]
        r.emitted = safe
        return self._output(r, delta, [tok], lp)

    def _output(self, r: _Request, delta: str, tokens: list[int], lp: TokenLogprob | None) -> StepOutput:
        logprobs = None
        if r.logprobs is not None:
            logprobs = [] if lp is None else [lp]  # none on the step that ended it with EOS
        out = StepOutput(r.id, delta, tokens, logprobs, r.finish_reason)
        if r.finish_reason is not None:
            out.completion = Completion(self._final_text(r), r.token_ids, r.finish_reason, len(r.prompt_ids),
                                        None if r.logprobs is None else r.token_logprobs)
        return out

    @staticmethod
    def _find_stop(r: _Request, text: str) -> int | None:
        hits = [text.find(s) for s in r.stop if s in text]
        hits += [m.start() for p in r.patterns for m in [p.search(text)] if m]
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


def check_logprobs(value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value <= MAX_LOGPROBS):
        raise ValueError(f"logprobs must be None or an int from 0 to {MAX_LOGPROBS}, got {value!r}")


def _compiled(pattern: str | re.Pattern) -> re.Pattern:
    if isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise ValueError(f"stop pattern {pattern!r} is not a valid regular expression: {exc}") from None


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _planned_pool_tokens(model, max_batch: int, max_prefill_tokens: int, block_size: int) -> int:
    """Room for max_batch full contexts, or what the memory available holds besides the largest
    prompt pass (max_prefill_tokens, with a row of logits per sequence) if that is less; at least
    one full context, or InsufficientMemory with the figures."""
    cfg = model.config
    context = -(-cfg.n_positions // block_size) * block_size  # a sequence owns whole blocks
    activations = (prompt_activation_bytes(cfg, [max_prefill_tokens], model.dtype)
                   + (max_batch - 1) * cfg.vocab_size * 4)
    available = available_bytes(model.device)
    per_block = kv_cache_bytes(cfg, block_size, model.kv_dtype)
    blocks = max(0, int(available * USABLE_FRACTION) - activations) // per_block
    if blocks * block_size < context:
        plan = GenerationPlan(kv_cache_bytes(cfg, context, model.kv_dtype), activations, available)
        raise InsufficientMemory(f"an engine with room for one full context of {cfg.n_positions} tokens "
                                 f"{plan.describe()}; pass a smaller kv_tokens or max_prefill_tokens")
    return min(max_batch * context, blocks * block_size)
