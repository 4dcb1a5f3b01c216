"""The ASGI app of `codegen-q serve` (create_app): routes, API key, body limit, streaming,
disconnects and one log line per request, over one Engine driven by the Scheduler's thread.

    POST /v1/completions                   OpenAI's completions API (openai_schema.py says what
    POST /v1/engines/{engine}/completions  is accepted); the second is Copilot's / FauxPilot's
                                           spelling, same body and behaviour, any engine name
    GET  /v1/models, /v1/models/{id}       the one model served
    GET  /health                           liveness, the engine's load and its prefix cache; needs
                                           no API key

Every error is OpenAI's error body: 400 for bad input (``param`` names the field), 401 for a
missing or wrong API key, 413 for a body over max_body_bytes, 429 with Retry-After when the
engine's queue is full, 503 while shutting down; 500 only when the model itself fails. A client
that goes away (mid-stream or while waiting for a whole response) has its requests aborted, and
their KV blocks go back to the pool at once.

Each request logs one line on the "codegen_q.server" logger: its id, route, status, prompt and
completion tokens, time to first token and total time; never the prompt or the completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import time
from typing import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from codegen_q.generation.engine import Engine, QueueFull, StepOutput
from codegen_q.server.openai_schema import (ApiError, CompletionRequest, LogprobsWriter, ResponseHead,
                                            completion_response, error_body, longest_token_bytes,
                                            parse_completion_request, sse, stream_choice, usage)
from codegen_q.server.scheduler import EngineFailed, Job, Scheduler, SchedulerClosed

logger = logging.getLogger("codegen_q.server")

RETRY_AFTER_SECONDS = 1
# A body over the limit is still read (and dropped) up to this much more, so that the client,
# still sending, gets the 413 rather than a reset connection; beyond it the connection is dropped.
DRAIN_LIMIT = 8 * 1024 * 1024
CLIENT_CLOSED = 499  # nginx's status for a client that went away before the response
# How long the last event of a stream cut by the shutdown may take to send (a client that does
# not read would otherwise hold the shutdown).
FINAL_SEND_SECONDS = 1.0


def create_app(model, *, api_key: str | None = None, max_batch: int = 8, max_queue: int = 64,
               kv_tokens: int | None = None, model_name: str | None = None,
               max_body_bytes: int = 1_000_000, prefix_caching: bool = True,
               max_prefill_tokens: int | None = None) -> Starlette:
    """The server's ASGI app for ``model`` (a model from codegen_q.load, or a directory to load).

    One Engine (``max_batch``, ``max_queue``, ``kv_tokens``, ``max_prefill_tokens`` as for
    codegen_q.generation.engine.Engine) on a
    scheduler thread that starts with the app's lifespan (or the first request); ``api_key``:
    when set, every /v1 route needs ``Authorization: Bearer <api_key>``; ``model_name``: the id
    /v1/models lists and responses carry (default: the model directory's name); ``prefix_caching``:
    reuse the KV cache of prompt prefixes seen before (an editor resends the same file on every
    keystroke; see codegen_q/generation/engine.py). The engine and the scheduler are app.state.engine and
    app.state.scheduler.
    """
    if isinstance(model, (str, os.PathLike)):
        from codegen_q.generation.load import load

        model = load(model)
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise ValueError("api_key must be a non-empty str, or None for no key")
    if model_name is not None and (not isinstance(model_name, str) or not model_name):
        raise ValueError("model_name must be a non-empty str, or None for the model directory's name")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be an int >= 1, got {max_body_bytes!r}")
    engine = Engine(model, kv_tokens=kv_tokens, max_batch=max_batch, max_queue=max_queue,
                    prefix_caching=prefix_caching, max_prefill_tokens=max_prefill_tokens)
    name = model_name or os.path.basename(os.path.normpath(getattr(model, "path", "codegen-q"))) or "codegen-q"
    service = _Service(engine, Scheduler(engine), name, api_key, max_body_bytes)
    app = Starlette(routes=service.routes(), lifespan=service.lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.engine, app.state.scheduler, app.state.model_name = engine, service.scheduler, name
    return app


class _Service:
    def __init__(self, engine: Engine, scheduler: Scheduler, name: str, api_key: str | None,
                 max_body_bytes: int) -> None:
        self.tokenizer, self.context = engine.tokenizer, engine.model.config.n_positions
        self.engine, self.scheduler, self.name = engine, scheduler, name
        self._key = None if api_key is None else api_key.encode("utf-8")
        self.max_body_bytes = max_body_bytes
        self.longest_token = longest_token_bytes(self.tokenizer)
        self.created = int(time.time())

    def routes(self) -> list[Route]:
        return [Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/engines/{engine}/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"])]

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.scheduler.start()
        try:
            yield
        finally:  # in-flight requests had uvicorn's graceful-shutdown time; what is left is aborted
            await asyncio.to_thread(self.scheduler.close)

    # ----------------------------------------------------------------------------------------
    # Routes

    async def health(self, request: Request) -> Response:
        healthy, engine = self.scheduler.healthy, self.engine
        # Read from this thread while the scheduler's steps: plain counters, at worst a step old.
        prefix_cache = {"enabled": engine.prefix_caching, "cached_blocks": engine.cache.num_cached_blocks,
                        "evictable_blocks": engine.num_evictable_blocks, "prompt_tokens": engine.prompt_tokens,
                        "cached_prompt_tokens": engine.cached_prompt_tokens}
        return JSONResponse({"status": "ok" if healthy else "unavailable", "model": self.name,
                             "running": engine.num_running, "waiting": engine.num_waiting,
                             "prefix_cache": prefix_cache}, status_code=200 if healthy else 503)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as exc:
            return _error(exc)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            if request.path_params["model_id"] != self.name:
                raise ApiError(404, f"no model {request.path_params['model_id']!r}; this server serves {self.name!r}",
                               "model", code="model_not_found")
        except ApiError as exc:
            return _error(exc)
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        log = _RequestLog(request.url.path)
        try:
            self._authorize(request)
            req = parse_completion_request(await _read_json(request, self.max_body_bytes), self.tokenizer,
                                           self.context, self.engine.max_queue, self.longest_token,
                                           ignore_suffix="engine" in request.path_params)
            log.prompt_tokens = req.prompt_tokens
            job = await self._open(req)
        except ApiError as exc:
            log.done(exc.status)
            return _error(exc)
        except ClientDisconnect:
            log.done(CLIENT_CLOSED, "client disconnected while sending")
            return Response(status_code=CLIENT_CLOSED)
        head = ResponseHead(log.id, self.name)
        if req.stream:
            return _EventStream(self._events(req, job, log, head), job, log)
        return await self._whole(request, req, job, log, head)

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "codegen-q"}

    # ----------------------------------------------------------------------------------------
    # Completions

    def _authorize(self, request: Request) -> None:
        if self._key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "an API key is required: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode("utf-8"), self._key):
            raise ApiError(401, "the API key is not valid", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def _open(self, req: CompletionRequest) -> Job:
        try:
            return await self.scheduler.open(req.engine_requests())
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except (ValueError, TypeError) as exc:  # what the engine refuses that the schema let through
            raise ApiError(400, str(exc)) from None
        except SchedulerClosed as exc:
            raise _unavailable(exc) from None

    async def _whole(self, request: Request, req: CompletionRequest, job: Job, log: _RequestLog,
                     head: ResponseHead) -> Response:
        """The whole response once every choice is done, unless the client leaves first."""
        work = asyncio.ensure_future(_collect(job, log))
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                log.done(CLIENT_CLOSED, "client disconnected")
                return Response(status_code=CLIENT_CLOSED)  # nobody reads it
            body = completion_response(head, req, self.tokenizer, work.result())
            log.done(200)
            return JSONResponse(body)
        except ApiError as exc:
            log.done(exc.status)
            return _error(exc)
        except asyncio.CancelledError:  # only uvicorn's shutdown cancels a request's task: answer still
            log.done(503, "the server shut down first")
            return _error(_shutting_down())
        finally:
            work.cancel()
            gone.cancel()
            job.cancel()  # nothing to do once every choice finished
            log.done(CLIENT_CLOSED, "cancelled")  # nothing either, unless this handler was cancelled

    async def _events(self, req: CompletionRequest, job: Job, log: _RequestLog,
                      head: ResponseHead) -> AsyncIterator[bytes]:
        """The stream: a chunk per decoded delta (and per token when logprobs are asked for), the
        usage on the last chunk (or on a chunk of its own with stream_options.include_usage), then
        [DONE]. Closed early, the job is aborted."""
        choice = {request_id: i for i, request_id in enumerate(job.ids)}
        writers = [LogprobsWriter(self.tokenizer) for _ in job.ids]
        tokens = 0
        try:
            if req.echo:
                for i, w in enumerate(writers):
                    p = req.choice_prompt(i)
                    lp = w.echo(req.prompt_ids[p]) if req.logprobs is not None else None
                    yield sse(head.wrap([stream_choice(i, req.prompts[p], lp, None)], None))
            while not job.finished:
                out = await job.next()
                log.saw(out)
                tokens += len(out.token_ids)
                if not _worth_a_chunk(out, req):
                    continue
                i = choice[out.request_id]
                lp = writers[i].tokens(out.logprobs or []) if req.logprobs is not None else None
                last = job.finished and not req.include_usage
                yield sse(head.wrap([stream_choice(i, out.delta, lp, out.finish_reason)],
                                    usage(req.prompt_tokens, tokens) if last else None))
            if req.include_usage:
                yield sse(head.wrap([], usage(req.prompt_tokens, tokens)))
            yield sse("[DONE]")
            log.done(200)
        except (EngineFailed, SchedulerClosed) as exc:
            err = _unavailable(exc) if isinstance(exc, SchedulerClosed) else _model_failed(exc)
            log.done(err.status)
            yield sse(err.body())
        finally:
            _closed(job, log)  # nothing to do once the stream ended


def _closed(job: Job, log: _RequestLog) -> None:
    job.cancel()
    log.done(CLIENT_CLOSED, "client disconnected")


async def _collect(job: Job, log: _RequestLog) -> list:
    """Every choice's Completion, in choice order."""
    completions = {}
    try:
        while not job.finished:
            out = await job.next()
            log.saw(out)
            if out.completion is not None:
                completions[out.request_id] = out.completion
    except EngineFailed as exc:
        raise _model_failed(exc) from None
    except SchedulerClosed as exc:
        raise _unavailable(exc) from None
    return [completions[i] for i in job.ids]


def _worth_a_chunk(out: StepOutput, req: CompletionRequest) -> bool:
    return bool(out.delta or out.finished or (req.logprobs is not None and out.token_ids))


class _EventStream:
    """A server-sent-event response that also watches for the client going away: then the event
    generator is closed at once (its finally aborts the job), not at the next token it makes.
    Cancelled by the server's shutdown (its grace time is over), it ends the stream with an error
    event rather than cutting the connection."""

    def __init__(self, events: AsyncIterator[bytes], job: Job, log: _RequestLog) -> None:
        self.events, self.job, self.log = events, job, log

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        shut_down = False
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # only uvicorn's shutdown cancels a request's task
            shut_down = True
            self.log.done(503, "the server shut down first")
        finally:
            for task in (pump, gone):
                task.cancel()
            await asyncio.gather(pump, gone, return_exceptions=True)
            await self.events.aclose()
            _closed(self.job, self.log)  # in case the generator never started, so its finally never ran
        if shut_down:
            with contextlib.suppress(Exception, asyncio.CancelledError):  # a client not reading: give up
                await asyncio.wait_for(self._end(send, _shutting_down()), FINAL_SEND_SECONDS)
        elif pump.done() and not pump.cancelled() and pump.exception() is not None:
            raise pump.exception()

    async def _pump(self, send) -> None:
        async for data in self.events:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _end(send, error: ApiError) -> None:
        await send({"type": "http.response.body", "body": sse(error.body()), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _disconnected(receive) -> None:
    """Returns when the client has gone away (the body was read already, so nothing else comes)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + DRAIN_LIMIT:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > limit + DRAIN_LIMIT:
            break
    if size > limit:
        raise _too_large(limit)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


class _RequestLog:
    """One request's log line, written once: the first done() is the one logged."""

    def __init__(self, route: str) -> None:
        self.id = "cmpl-" + secrets.token_hex(12)
        self.route = route
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._logged = False

    def saw(self, out: StepOutput) -> None:
        if out.token_ids and self.first_token is None:
            self.first_token = time.perf_counter()
        self.completion_tokens += len(out.token_ids)

    def done(self, status: int, note: str = "") -> None:
        if self._logged:
            return
        self._logged = True
        ttft = "-" if self.first_token is None else f"{self.first_token - self.started:.3f}s"
        logger.info("%s %s status=%d prompt_tokens=%d completion_tokens=%d ttft=%s total=%.3fs%s", self.id,
                    self.route, status, self.prompt_tokens, self.completion_tokens, ttft,
                    time.perf_counter() - self.started, f" ({note})" if note else "")


def _error(exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over this server's limit of {limit} bytes",
                    code="request_too_large")


def _shutting_down() -> ApiError:
    return _unavailable(SchedulerClosed("the server shut down before the completion finished"))


def _unavailable(exc: Exception) -> ApiError:
    return ApiError(503, str(exc), type="server_error", code="shutting_down")


def _model_failed(exc: Exception) -> ApiError:
    return ApiError(500, str(exc), type="server_error")


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """404 / 405 and the like, in OpenAI's error body."""
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code,
                        headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    logger.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
