"""cxrlite.server: the runtime behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    from cxrlite.server import ServerSettings, create_app
    app = create_app(lambda: Runtime.from_bundle("bundle/"), ServerSettings(api_key="..."))

Modules: app (routes, middleware, the app factory), schemas (the chat-completions subset and
the error shape), scheduler (bounded queue, one LLM worker), security (API key, size caps,
image-URL policy), metrics (Prometheus). `cxrlite serve BUNDLE` runs it with uvicorn.
"""

from cxrlite.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
