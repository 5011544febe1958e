"""The OpenAI-compatible HTTP front end (docs/openai-api.md): a stateless gateway that
is itself an ``AsyncClient`` of the coordinator, forwarding each caller's API key, so
identity and fairness are decided where they are for ZeroMQ clients.

- ``schemas.py`` — OpenAI's request and response bodies (pydantic)
- ``routes.py`` — the endpoints: one ``AsyncClient`` call per request
- ``streaming.py`` — server-sent events for ``"stream": true``
- ``errors.py`` — every failure as OpenAI's error body with its HTTP status
- ``identity.py`` — bearer key and claimed client; one connection per key
- ``model.py`` — the served model's name, chat template, tokenizer, context length
- ``metrics.py`` — the gateway's Prometheus metrics
- ``app.py`` — the FastAPI application; ``server.py`` — uvicorn; ``process.py`` — the
  child process ``disagg serve --http-port`` starts

Import from the modules (``from disagg.http.app import create_app``): this package
imports nothing, so ``disagg`` commands that never serve HTTP do not load FastAPI.
"""

from __future__ import annotations
