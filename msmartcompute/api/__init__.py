"""The Falcon app exposing the runtime over HTTP (the seed's REST contract)."""
from .app import create_app

__all__ = ["create_app"]
