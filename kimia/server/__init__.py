"""kimia's HTTP face: an OpenAI-compatible API, a realtime websocket and a web page over `KimiAudio`.

`create_app(model_or_path, settings)` builds the FastAPI application; `kimia serve` (kimia.server.cli) runs it
with uvicorn. The server never touches model tensors itself: requests become message lists for the API
layer and a batcher thread feeds them to the engine several at a time.
"""

from kimia.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def create_app(*args, **kwargs):
    """`kimia.server.app.create_app` (imported lazily so `import kimia.server` stays light)."""
    from kimia.server.app import create_app as _create

    return _create(*args, **kwargs)
