"""The scheduler: the one thread that drives an Engine for a server, and its hand-off to asyncio.

The engine is not thread-safe, so exactly one thread ever touches it: this one. Everything else
talks to it through a thread-safe inbox (submit, abort, call), and it answers through
concurrent.futures.Future objects (a submission's request ids, or the QueueFull / ValueError the
engine raised) and, per job, an asyncio.Queue that each StepOutput is put on with
loop.call_soon_threadsafe. While requests are unfinished it steps the engine; otherwise it sleeps
on a condition until a message comes. Messages are handled between steps, so an abort frees the
request's blocks before the next step runs.

A job is the engine requests of one HTTP request (one per prompt and choice); they are added all
or none, so a request with n choices never half-starts when the queue fills.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from codegen_q.generation.engine import Engine, StepOutput

logger = logging.getLogger("codegen_q.server")


class SchedulerClosed(RuntimeError):
    """The scheduler stopped (the server is shutting down): nothing more will come."""


class EngineFailed(RuntimeError):
    """A step of the engine raised; every request that was running then is aborted."""


@dataclass(frozen=True)
class EngineRequest:
    """Engine.add_request's arguments for one prompt and choice."""

    prompt_ids: list[int]
    params: Any  # SamplingParams
    max_new_tokens: int
    stop: Sequence[str] = ()
    seed: int | None = None
    logprobs: int | None = None


@dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Message:
    kind: str  # "submit", "abort" or "call"
    future: concurrent.futures.Future | None = None
    requests: list[EngineRequest] = field(default_factory=list)
    sink: _Sink | None = None
    ids: list[int] = field(default_factory=list)
    fn: Callable[[Engine], Any] | None = None


class Job:
    """One HTTP request's engine requests: ``ids`` in submission order, and ``next()`` for their
    outputs as the scheduler delivers them (StepOutput; EngineFailed / SchedulerClosed raised)."""

    def __init__(self, scheduler: Scheduler, ids: list[int], queue: asyncio.Queue) -> None:
        self.scheduler, self.ids, self._queue = scheduler, ids, queue
        self._unfinished = set(ids)

    @property
    def finished(self) -> bool:
        return not self._unfinished

    async def next(self) -> StepOutput:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._unfinished.clear()
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item

    def cancel(self) -> None:
        """Abort whatever of the job is unfinished (idempotent; finished requests are left alone)."""
        if self._unfinished:
            self.scheduler.abort(sorted(self._unfinished))
            self._unfinished.clear()


class Scheduler:
    """Drives ``engine`` on a thread of its own; start() is implicit on the first submission."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox: collections.deque[_Message] = collections.deque()
        self._sinks: dict[int, _Sink] = {}  # unfinished request id -> where its outputs go
        self._thread: threading.Thread | None = None
        self._closing = False

    # ----------------------------------------------------------------------------------------
    # Any thread

    def start(self) -> None:
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="codegen-q-scheduler", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread: unfinished requests are aborted and their jobs get SchedulerClosed."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def submit(self, requests: Sequence[EngineRequest], loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue) -> concurrent.futures.Future:
        """Add ``requests`` to the engine, all or none; the future gives their ids, or the engine's
        exception (QueueFull, ValueError, TypeError). Their outputs go to ``queue`` on ``loop``."""
        self.start()
        return self._post(_Message("submit", concurrent.futures.Future(), list(requests), _Sink(loop, queue)))

    async def open(self, requests: Sequence[EngineRequest]) -> Job:
        """submit() from a coroutine: a Job, or the engine's exception raised here. Cancelled while
        the submission waits, the requests are aborted as soon as they exist."""
        queue: asyncio.Queue = asyncio.Queue()
        future = self.submit(requests, asyncio.get_running_loop(), queue)
        try:
            ids = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._abort_when_added)
            raise
        return Job(self, ids, queue)

    def abort(self, ids: Sequence[int]) -> None:
        self._post(_Message("abort", ids=list(ids)))

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine's thread, between steps; the future gives what it returns."""
        self.start()
        return self._post(_Message("call", concurrent.futures.Future(), fn=fn))

    @property
    def healthy(self) -> bool:
        """Whether requests can still be served: not closed, and the thread (once started) alive."""
        with self._cond:
            return not self._closing and (self._thread is None or self._thread.is_alive())

    @property
    def pending_messages(self) -> int:
        """Messages in the inbox that the thread has not taken yet."""
        with self._cond:
            return len(self._inbox)

    def _post(self, message: _Message) -> concurrent.futures.Future | None:
        with self._cond:
            if self._closing:
                if message.future is not None:
                    message.future.set_exception(SchedulerClosed("the server is shutting down"))
                return message.future
            self._inbox.append(message)
            self._cond.notify()
        return message.future

    def _abort_when_added(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self.abort(future.result())

    # ----------------------------------------------------------------------------------------
    # The engine's thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug: fail what waits rather than leave it hanging forever
            logger.exception("the scheduler thread failed; the server takes no more requests")
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        with self._cond:
            self._closing = True
            pending = list(self._inbox)
            self._inbox.clear()
        for message in pending:
            if message.future is not None and message.future.set_running_or_notify_cancel():
                message.future.set_exception(SchedulerClosed(f"the server failed: {type(exc).__name__}: {exc}"))
        with contextlib.suppress(Exception):
            self._fail_all(EngineFailed(f"the server failed: {type(exc).__name__}: {exc}"))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._closing and not self.engine.has_unfinished():
                    self._cond.wait()
                messages = list(self._inbox)
                self._inbox.clear()
                closing = self._closing
            for message in messages:
                self._handle(message)
            if closing:
                self._fail_all(SchedulerClosed("the server shut down before the completion finished"))
                return
            if self.engine.has_unfinished():
                self._step()

    def _handle(self, message: _Message) -> None:
        if message.kind == "abort":
            for request_id in message.ids:
                self.engine.abort(request_id)
                self._sinks.pop(request_id, None)
            return
        if not message.future.set_running_or_notify_cancel():
            return
        try:
            result = self._add(message) if message.kind == "submit" else message.fn(self.engine)
        except BaseException as exc:  # handed to the waiting side, which decides what it means
            message.future.set_exception(exc)
        else:
            message.future.set_result(result)

    def _add(self, message: _Message) -> list[int]:
        ids: list[int] = []
        try:
            for r in message.requests:
                ids.append(self.engine.add_request(r.prompt_ids, r.params, r.max_new_tokens, r.stop, (), r.seed,
                                                   r.logprobs))
        except BaseException:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        for request_id in ids:
            self._sinks[request_id] = message.sink
        return ids

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; aborting the %d unfinished request(s)", len(self._sinks))
            self._fail_all(EngineFailed(f"the model failed while generating: {type(exc).__name__}: {exc}"))
            return
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finished:
                del self._sinks[out.request_id]
            self._deliver(out.request_id, sink, out)

    def _deliver(self, request_id: int, sink: _Sink, item: StepOutput | BaseException) -> None:
        try:
            sink.loop.call_soon_threadsafe(sink.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is waiting any more
            self.engine.abort(request_id)
            self._sinks.pop(request_id, None)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort(request_id)
            self._deliver(request_id, sink, exc)
        self._sinks.clear()
