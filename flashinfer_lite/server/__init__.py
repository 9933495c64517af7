"""An OpenAI-compatible local server over one loaded Model (`flashinfer-lite serve`).

Needs the `server` extra (FastAPI + uvicorn): pip install "flashinfer-lite[server]".

    from flashinfer_lite.server import LocalServer
    with LocalServer(fl.load(), "smollm2-135m") as srv:   # a free loopback port
        client = openai.OpenAI(base_url=srv.base_url, api_key="unused")
"""

from .run import LocalServer, serve

__all__ = ["LocalServer", "serve"]
