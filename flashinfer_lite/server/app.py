"""The OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions, /v1/completions, /v1/models,
/health. Bodies are read and validated here (size limit, JSON, strict schemas) so that every
mistake gets OpenAI's error shape; generation happens on the Engine's worker thread."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Job
from .errors import OpenAIError
from .schemas import ChatRequest, CompletionRequest, parse

MAX_BODY_BYTES = 4 * 1024 * 1024  # a full 32k-token context is ~130 KB of text: ample room


def error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(engine: Engine, model_id: str, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The app for one engine. model_id is the name clients put in "model" (/v1/models)."""
    app = FastAPI(title="flashinfer-lite", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                     api_key.encode()):
                return error_response(OpenAIError(
                    401, "Incorrect API key provided (send it as 'Authorization: Bearer KEY')",
                    code="invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return error_response(OpenAIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return error_response(OpenAIError(400, str(exc.errors()[:1])))

    def check_model(name: str) -> None:
        if name != model_id:
            raise OpenAIError(404, f"The model '{name}' does not exist; this server runs "
                              f"'{model_id}'", param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.report()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return _model_card(model_id, created)

    async def complete(request: Request, chat: bool):
        req = parse(ChatRequest if chat else CompletionRequest,
                    await read_json(request, max_body_bytes))
        check_model(req.model)
        prompt = req.template_messages() if chat else req.prompt_input()
        job = Job(chat, prompt, req.limit(), req.sampling(), asyncio.get_running_loop())
        return await respond(request, engine, job, req, chat=chat, model_id=model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "flashinfer-lite"}


async def read_json(request: Request, limit: int):
    """The body, refused past limit bytes (413) before it is all read, then decoded (400)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"the request body is {int(declared)} bytes; the limit is {limit}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise OpenAIError(413, f"the request body is over the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away before its answer starts (or, without
    streaming, before it ends). Once a stream is under way Starlette watches for this itself and
    cancels the body generator."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


async def respond(request: Request, engine: Engine, job: Job, req, chat: bool, model_id: str):
    engine.submit(job)
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    done = False
    try:
        first = await job.events.get()
        if first[0] == "error":
            done = True
            return error_response(first[1])
        if first[0] == "end":  # cancelled while queued: the client is gone
            done = True
            return error_response(OpenAIError(499, "the client closed the request"))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            done = True  # from here the body generator owns the job
            return StreamingResponse(_sse(job, chat, model_id, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        parts = []
        while True:
            event = await job.events.get()
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] == "error":
                done = True
                return error_response(event[1])
            else:
                done = True
                finish, usage = event[1], event[2]
                return JSONResponse(_completion_body(chat, model_id, "".join(parts), finish,
                                                     usage))
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if not done:  # the handler itself was cancelled
            job.cancel.set()


def _completion_body(chat: bool, model_id: str, text: str, finish: str, usage: dict) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish, "logprobs": None}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": model_id, "choices": [choice],
                "usage": usage}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model_id, "choices": [choice], "usage": usage}


async def _sse(job: Job, chat: bool, model_id: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A client that
    disconnects cancels this generator (Starlette), which cancels the job."""
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False, usage=None) -> str:
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else \
                ({"content": text} if text else {})
            choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        else:
            choices = [{"index": 0, "text": text or "", "finish_reason": finish,
                        "logprobs": None}]
        body = {"id": rid, "object": kind, "created": created, "model": model_id,
                "choices": [] if usage is not None else choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    finished = False
    try:
        if chat:
            yield chunk("", None, first=True)
        while True:
            event = await job.events.get()
            if event[0] == "text":
                yield chunk(event[1], None)
            elif event[0] == "error":
                yield f"data: {json.dumps(event[1].body())}\n\n"
                finished = True
                return
            else:
                yield chunk(None, event[1])
                if include_usage and event[2] is not None:
                    yield chunk(None, None, usage=event[2])
                yield "data: [DONE]\n\n"
                finished = True
                return
    finally:
        if not finished:
            job.cancel.set()
