"""OpenAI's completions API, for the server: a request body checked field by field into engine
requests, and the responses, stream chunks and error bodies in OpenAI's shapes.

Every field a client may send is checked here, so bad input is a 400 naming the field (``param``)
and never reaches the engine as something it would raise on. Defaults are OpenAI's: max_tokens 16,
temperature 1 (send 0 for greedy decoding), top_p 1, n 1. Extensions: top_k and
repetition_penalty. presence_penalty / frequency_penalty are applied as OpenAI defines them (on
the tokens generated so far). Refused: token-id prompts, a non-empty suffix (CodeGen-1 models
cannot fill in the middle), logit_bias, best_of other than n. Fields this server does not know
(Copilot's "extra", "nwo", ...) are ignored, as FauxPilot does.

Logprobs are the model's own (log_softmax over the real vocabulary, before temperature and the
penalties), the ``logprobs`` most likely in top_logprobs. With echo, the prompt's tokens are
listed with null logprobs: the engine keeps no prompt logits. Tokens holding part of a UTF-8
character are written as OpenAI does, "bytes:\\xe2\\x80". A whole response leaves out the
tokens that start past a stop string's cut; a stream's chunks carry each token as it is chosen.

usage is in every whole response and, streamed, on the last chunk that has a choice (or, with
stream_options.include_usage, on a last chunk of its own with no choices, as OpenAI sends it).
"""

from __future__ import annotations

import codecs
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from codegen_q.generation.engine import Completion, StepOutput, TokenLogprob
from codegen_q.generation.generate import check_text
from codegen_q.generation.sampling import MAX_PENALTY, MAX_SEED, SamplingParams
from codegen_q.server.scheduler import EngineRequest
from codegen_q.generation.tokenizer import CodeGenTokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's
DEFAULT_TEMPERATURE = 1.0  # OpenAI's; 0 is greedy
MAX_LOGPROBS = 5  # OpenAI's limit for completions
MAX_STOP = 16  # OpenAI allows 4; Copilot-style clients send more
MAX_N = 128  # OpenAI's
_MISSING = object()


class ApiError(Exception):
    """An HTTP error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --------------------------------------------------------------------------------------------
# Requests in


@dataclass
class CompletionRequest:
    """A checked /v1/completions body: one tokenized prompt per entry of ``prompts``, n choices each."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    max_tokens: int
    params: SamplingParams
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool
    seed: int | None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)

    def choice_prompt(self, choice: int) -> int:
        """Which prompt choice ``choice`` completes (choices are prompt-major, like OpenAI's)."""
        return choice // self.n

    def engine_requests(self) -> list[EngineRequest]:
        """One per choice; when sampling with a seed, choice i is seeded with seed + i."""
        sampled = self.params.temperature > 0
        return [EngineRequest(self.prompt_ids[self.choice_prompt(i)], self.params, self.max_tokens, self.stop,
                              self.seed + i if sampled and self.seed is not None else None, self.logprobs)
                for i in range(len(self.prompts) * self.n)]


def parse_completion_request(body: object, tokenizer: CodeGenTokenizer, context: int, max_choices: int,
                             longest_token: int | None = None, ignore_suffix: bool = False) -> CompletionRequest:
    """``body`` (parsed JSON) checked against the model's ``context`` and the server's queue
    (``max_choices`` engine requests at most); ApiError 400 naming the field otherwise.
    ``longest_token`` (longest_token_bytes(tokenizer)) lets a prompt that could not fit the
    context whatever its tokens be refused without tokenizing it (a megabyte takes a second).
    ``ignore_suffix``: the FauxPilot route, whose Copilot clients send the text after the cursor
    with every request; FauxPilot ignores it, and so does that route, so those plugins work unchanged."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    _optional_text(body, "model")
    _optional_text(body, "user")
    suffix = _optional_text(body, "suffix")
    if suffix and not ignore_suffix:
        raise ApiError(400, "suffix is not supported: CodeGen-1 models cannot fill in the middle; send the text "
                            "before the cursor as the prompt only", "suffix")
    prompts = _prompts(body.get("prompt", _MISSING))
    n = _int(body, "n", 1, 1, MAX_N)
    if len(prompts) * n > max_choices:
        raise ApiError(400, f"{len(prompts)} prompt(s) with n={n} make {len(prompts) * n} completions; this server "
                            f"queues at most {max_choices} at once", "n")
    prompt_ids = [_tokenized(tokenizer, p, i if len(prompts) > 1 else None, context, longest_token)
                  for i, p in enumerate(prompts)]
    max_tokens = _int(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, None)  # the context is checked next
    for i, ids in enumerate(prompt_ids):
        _check_context(len(ids), max_tokens, context, i if len(prompts) > 1 else None)
    best_of = _int(body, "best_of", n, 1, MAX_N)
    if best_of != n:
        raise ApiError(400, f"best_of is not supported (only best_of = n), got best_of={best_of} with n={n}",
                       "best_of")
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and logit_bias != {}:
        raise ApiError(400, "logit_bias is not supported; leave it out", "logit_bias")
    stream = _bool(body, "stream", False)
    return CompletionRequest(
        prompts, prompt_ids, max_tokens, _sampling_params(body), n, _stop(body.get("stop")), stream,
        _include_usage(body.get("stream_options")), _optional_int(body, "logprobs", 0, MAX_LOGPROBS),
        _bool(body, "echo", False), _optional_int(body, "seed", 0, MAX_SEED))


def _sampling_params(body: dict) -> SamplingParams:
    return SamplingParams(
        temperature=_number(body, "temperature", DEFAULT_TEMPERATURE, 0.0, 2.0),
        top_k=_int(body, "top_k", 0, 0, None),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, None, low_open=True),
        presence_penalty=_number(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY))


def _prompts(value: object) -> list[str]:
    if value is _MISSING or value is None:
        raise ApiError(400, "prompt is required: a string, or a list of strings", "prompt")
    if isinstance(value, str):
        return [_text(value, "prompt")]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"prompt must be a string or a non-empty list of strings, got {_json_type(value)}",
                       "prompt")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value) or all(isinstance(v, list) for v in value):
        raise ApiError(400, "token-id prompts are not supported; send the prompt as text", "prompt")
    return [_text(v, f"prompt {i}", "prompt") for i, v in enumerate(value)]


def longest_token_bytes(tokenizer: CodeGenTokenizer) -> int:
    """The most bytes one token stands for: a prompt of more than context times this many bytes
    has more tokens than the context holds."""
    return max(len(tokenizer.token_bytes(i)) for i in range(len(tokenizer)))


def _tokenized(tokenizer: CodeGenTokenizer, prompt: str, index: int | None, context: int,
               longest_token: int | None) -> list[int]:
    size = len(prompt.encode("utf-8"))
    if longest_token is not None and size > context * longest_token:
        raise ApiError(400, f"{_prompt_name(index)} has {size} bytes: even at {longest_token} bytes a token (this "
                            f"tokenizer's longest) that is more than the model's context of {context} tokens; "
                            f"shorten it", "prompt", code="context_length_exceeded")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ApiError(400, f"{_prompt_name(index)} is empty; give at least one character of text", "prompt")
    return ids


def _check_context(prompt_tokens: int, max_tokens: int, context: int, index: int | None) -> None:
    room = context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"{_prompt_name(index)} has {_tokens(prompt_tokens)}: with even one new token it would "
                            f"exceed the model's context of {context} tokens; shorten it", "prompt",
                       code="context_length_exceeded")
    if max_tokens > room:
        raise ApiError(400, f"{_prompt_name(index)} has {_tokens(prompt_tokens)}; with max_tokens={max_tokens} it "
                            f"would exceed the model's context of {context} tokens (at most {room} more fit)",
                       "max_tokens", code="context_length_exceeded")


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _prompt_name(index: int | None) -> str:
    return "the prompt" if index is None else f"prompt {index}"


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP:
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP} strings, got "
                            f"{_json_type(value)}" + (f" of {len(stops)}" if isinstance(stops, list) else ""), "stop")
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ApiError(400, f"each stop string must be a non-empty string, got {_json_type(s)}", "stop")
        _text(s, "each stop string", "stop")
    return list(stops)


def _include_usage(value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, dict):
        raise ApiError(400, f"stream_options must be an object, got {_json_type(value)}", "stream_options")
    include = value.get("include_usage", False)
    if not isinstance(include, bool):
        raise ApiError(400, f"stream_options.include_usage must be true or false, got {_json_type(include)}",
                       "stream_options")
    return include


def _text(value: object, what: str, param: str | None = None) -> str:
    try:
        return check_text(value, what)
    except TypeError:
        raise ApiError(400, f"{what} must be a string, got {_json_type(value)}", param or what) from None
    except ValueError as exc:
        raise ApiError(400, str(exc), param or what) from None


def _optional_text(body: dict, name: str) -> str | None:
    value = body.get(name)
    return None if value is None else _text(value, name)


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, got {_json_type(value)}", name)
    return value


def _optional_int(body: dict, name: str, low: int, high: int) -> int | None:
    return None if body.get(name) is None else _int(body, name, None, low, high)


def _int(body: dict, name: str, default: int | None, low: int, high: int | None) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ApiError(400, f"{name} must be an integer {span}, got {_shown(value)}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float | None, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        span = f"{'above' if low_open else 'from'} {low:g}" + (f" {'up ' if low_open else ''}to {high:g}"
                                                              if high is not None else "")
        raise ApiError(400, f"{name} must be a number {span}, got {_shown(value)}", name)
    return float(value)


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (int, float, str, bool)) or value is None else _json_type(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------------------------
# Logprobs


def token_text(tokenizer: CodeGenTokenizer, token_id: int) -> str:
    """A token as OpenAI lists it: its text, or "bytes:\\x.." when it holds part of a character."""
    data = tokenizer.token_bytes(token_id)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class LogprobsWriter:
    """OpenAI's logprobs object for one choice, token by token: text_offset is where each token
    starts in the choice's text (after the echoed prompt, when there is one)."""

    def __init__(self, tokenizer: CodeGenTokenizer, start: int = 0) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._chars = start

    def echo(self, prompt_ids: Sequence[int]) -> dict[str, list]:
        """The prompt's tokens, with null logprobs (the engine keeps no prompt logits)."""
        block = self._empty()
        for t in prompt_ids:
            self._add(block, t, None, None)
        return block

    def tokens(self, logprobs: Sequence[TokenLogprob], limit: int | None = None) -> dict[str, list]:
        """The generated tokens; with ``limit`` (the text's length), none that starts at or past it."""
        block = self._empty()
        for lp in logprobs:
            if limit is not None and self._chars >= limit:
                break
            top: dict[str, float | None] = {}
            for t, v in lp.top.items():  # most likely first; two ids of one text keep the likelier
                top.setdefault(token_text(self.tokenizer, t), _finite(v))
            self._add(block, lp.token_id, _finite(lp.logprob), top)
        return block

    @staticmethod
    def _empty() -> dict[str, list]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _add(self, block: dict[str, list], token_id: int, logprob: float | None, top: dict | None) -> None:
        block["tokens"].append(token_text(self.tokenizer, token_id))
        block["token_logprobs"].append(logprob)
        block["top_logprobs"].append(top)
        block["text_offset"].append(self._chars)
        self._chars += len(self._decoder.decode(self.tokenizer.token_bytes(token_id)))


def merge_logprobs(first: dict[str, list], second: dict[str, list]) -> dict[str, list]:
    return {key: first[key] + second[key] for key in first}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no -inf


# --------------------------------------------------------------------------------------------
# Responses out


FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length"}


@dataclass
class ResponseHead:
    """What every response and chunk of one request repeats."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def wrap(self, choices: list[dict], usage: dict | None) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(head: ResponseHead, req: CompletionRequest, tokenizer: CodeGenTokenizer,
                        completions: list[Completion]) -> dict[str, Any]:
    """The non-streamed response: one choice per completion, in choice order."""
    choices = []
    for i, c in enumerate(completions):
        prompt_index = req.choice_prompt(i)
        prompt = req.prompts[prompt_index] if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            writer = LogprobsWriter(tokenizer)
            echoed = writer.echo(req.prompt_ids[prompt_index]) if req.echo else None
            # A stop string cuts the text inside the tokens: those that start past the cut are left out.
            limit = len(prompt) + len(c.text) if c.finish_reason == "stop" else None
            logprobs = writer.tokens(c.logprobs or [], limit)
            if echoed is not None:
                logprobs = merge_logprobs(echoed, logprobs)
        choices.append({"text": prompt + c.text, "index": i, "logprobs": logprobs,
                        "finish_reason": FINISH_REASONS[c.finish_reason]})
    return head.wrap(choices, usage(req.prompt_tokens, sum(len(c.token_ids) for c in completions)))


def stream_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs,
            "finish_reason": None if finish_reason is None else FINISH_REASONS[finish_reason]}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` (or the literal [DONE])."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode("utf-8")


def output_choice(step: StepOutput) -> bool:
    """Whether a step output is worth a stream chunk: text, a token, or the end."""
    return bool(step.delta or step.token_ids or step.finished)
