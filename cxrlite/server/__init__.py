"""cxrlite.server: the runtime behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    from cxrlite.server import ServerSettings, create_app
    app = create_app(lambda: Runtime.from_bundle("bundle/"), ServerSettings(api_key="..."))

Modules, as vLLM's OpenAI entry point lays them out:
- app: `create_app`, which puts the pieces below together (state on `app.state`)
- settings: `ServerSettings`, the limits and policies (and `cxrlite serve`'s option defaults)
- routes/openai: /v1/chat/completions and /v1/models; chat: the generation behind them
- routes/reports: /v1/reports, the draft report of an uploaded radiograph
- routes/ops: /health, /metrics and the web page at /
- pipeline: the steps every model request shares (deadline, image threads, the LLM job)
- loader: the runtime, loaded in the background; scheduler: the queue and the one LLM worker
- errors: the error shape and one handler per exception type; schemas: the request models
- middleware: request ids, the API key, access lines, the body-size cap, the 500 of last resort
- security: API key, image-URL policy, exposure warnings; metrics: Prometheus
`cxrlite serve BUNDLE` runs it with uvicorn.
"""

from cxrlite.server.app import create_app
from cxrlite.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
