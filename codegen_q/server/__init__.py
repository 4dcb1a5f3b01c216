"""The completion server behind `codegen-q serve`: OpenAI's /v1/completions (and the
Copilot/FauxPilot /v1/engines/{engine}/completions) over HTTP, on one Engine.

    scheduler.py      the one thread that drives the Engine (it is not thread-safe) and hands each
                      step's outputs to the asyncio side; submissions, aborts and calls go through
                      its inbox
    openai_schema.py  a request body checked field by field into engine requests, and the
                      responses / stream chunks / error bodies in OpenAI's shapes
    api.py            the ASGI app (create_app): routes, API key, body limit, streaming,
                      disconnects, one log line per request

The HTTP side never touches the engine: a request becomes engine requests in the scheduler's
inbox, and its outputs come back on an asyncio.Queue of its own.
"""

from __future__ import annotations

from codegen_q.server.api import create_app

__all__ = ["create_app"]
