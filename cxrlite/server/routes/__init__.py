"""The HTTP routes, one APIRouter per surface: openai (/v1/models, /v1/chat/completions),
reports (/v1/reports, the radiology route) and ops (/health, /metrics, the web page)."""
