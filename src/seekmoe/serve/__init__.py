"""An OpenAI-compatible HTTP server over the inference engine: an ASGI app (FastAPI) served by uvicorn."""

from .server import make_server

__all__ = ["make_server"]
