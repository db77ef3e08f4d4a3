"""An OpenAI-compatible HTTP server over the inference engine (standard library only)."""

from .server import make_server

__all__ = ["make_server"]
