"""Running the app under uvicorn: in the foreground (the CLI) or on a thread (tests, apps)."""

from __future__ import annotations

import socket
import threading
import time

from ..errors import BackendUnavailableError, InvalidArgumentError
from ..model import Model
from ..options import ServerOptions, with_kwargs
from .engine import Engine


def _require_server_extra():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the server needs FastAPI and uvicorn ({exc.name} is missing): "
            "pip install 'flashinfer-lite[server]'") from None
    return uvicorn


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _engine_and_app(model: Model, model_id: str, api_key: str | None,
                    options: ServerOptions | None, kwargs: dict):
    """The engine over model and the app over the engine. kwargs: ServerOptions' fields
    (cache_slots, max_queue, cache_bytes), over options."""
    # FastAPI is an extra: the app's module imports only once it is known to be there
    from .app import create_app

    options = with_kwargs(options or ServerOptions(), kwargs)
    if kwargs:
        raise InvalidArgumentError(f"unknown server option {sorted(kwargs)[0]!r}")
    engine = Engine(model, options)
    return engine, create_app(engine, model_id, api_key=api_key)


class LocalServer:
    """The server on a background thread, on host:port (port 0: a free one). The model stays
    the caller's: stop() (or leaving the with block) stops serving but does not close it.
    Queue and cache options: ServerOptions (options=, or its fields as keywords)."""

    def __init__(self, model: Model, model_id: str, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, log_level: str = "warning",
                 options: ServerOptions | None = None, **server_options):
        uvicorn = _require_server_extra()
        self.engine, self.app = _engine_and_app(model, model_id, api_key, options,
                                                server_options)
        self._sock = _bind(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        config = uvicorn.Config(self.app, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=5, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> LocalServer:
        self.engine.start()
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]},
                                        name="flashinfer-lite-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.engine.stop()
        self._sock.close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model: Model, model_id: str, host: str = "127.0.0.1", port: int = 8080,
          api_key: str | None = None, log_level: str = "info", on_ready=None,
          options: ServerOptions | None = None, **server_options) -> None:
    """Serve in the foreground until Ctrl-C / SIGTERM. on_ready(base_url) once listening."""
    uvicorn = _require_server_extra()
    engine, app = _engine_and_app(model, model_id, api_key, options, server_options)
    sock = _bind(host, port)
    bound = sock.getsockname()
    if on_ready is not None:
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        on_ready(f"http://{shown}:{bound[1]}/v1")
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5, lifespan="off")
    engine.start()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
