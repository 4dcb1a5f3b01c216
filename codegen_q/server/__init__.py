"""The completion server behind `codegen-q serve`: OpenAI's /v1/completions (and the
Copilot/FauxPilot /v1/engines/{engine}/completions) over HTTP, on one Engine.

    scheduler.py      the one thread that drives the Engine (it is not thread-safe) and hands each
                      step's outputs to the asyncio side; submissions, aborts and calls go through
                      its inbox
    openai_schema.py  a request body checked field by field into engine requests, and the
                      responses / stream chunks / error bodies in OpenAI's shapes
    api.py            the ASGI app (create_app): routes, API key, body limit, streaming,
                      disconnects, one log line per request
    settings.py       what `codegen-q serve` and the Ray replicas share: the API key's variable,
                      KV-memory sizes, the request log on stderr
    ray_options.py,   the same app as Ray Serve replicas (`codegen-q serve --ray`); Ray is imported
    ray_app.py        only by ray_app

The HTTP side never touches the engine: a request becomes engine requests in the scheduler's
inbox, and its outputs come back on an asyncio.Queue of its own.

May import codegen_q.format, codegen_q.kernels, codegen_q.model, codegen_q.generation and
codegen_q.default_model.
"""
