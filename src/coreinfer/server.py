"""An OpenAI-compatible HTTP server for one ``Engine``, with the sparsity settings as request extensions.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` answers with server-sent events in OpenAI's chunk format, ending
with ``data: [DONE]``), and ``GET /``, a demo page streaming the dense and the
CoreInfer answers side by side.

Requests are validated and tokenised on the event loop, then generated in a worker
thread: ``Engine.lock`` queues them one at a time while each request's sparse state
lives in its own ``SparseSession``, so bad input is answered at once, even while
another request is generating.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import DEFAULT_SPARSITY
from .engine import Engine, GenerationResult, SamplingConfig, SparsityConfig, TokenEvent

SUPPORTED_METHODS = ("stability",)  # similarity-guided selection is not wired in yet


@dataclass(frozen=True)
class ServerSettings:
    """Server-side defaults (used when a request leaves a field out) and limits."""

    keep: Union[float, str] = DEFAULT_SPARSITY.keep  # "auto": chosen per request
    alpha: float = 0.2
    rule: str = DEFAULT_SPARSITY.rule
    quality: float = DEFAULT_SPARSITY.quality
    max_tokens: int = 256  # default completion length
    max_tokens_limit: int = 2048  # largest max_tokens a request may ask for
    max_prompt_tokens: int = 4096

    def __post_init__(self) -> None:
        SparsityConfig(self.keep, self.alpha, self.rule, quality=self.quality)  # raises on bad defaults
        if not 1 <= self.max_tokens <= self.max_tokens_limit:
            raise ValueError(f"max_tokens must lie in [1, {self.max_tokens_limit}], got {self.max_tokens}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be at least 1, got {self.max_prompt_tokens}")


class APIError(Exception):
    """A client error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class GenerationCancelled(Exception):
    """Raised from the token callback to stop a generation whose client has gone."""


# Request bodies. Unknown OpenAI fields (presence_penalty, user, ...) are accepted and ignored.


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0 is greedy (OpenAI's default is 1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    # CoreInfer extensions; None takes the server's default.
    keep: Union[float, Literal["auto"], None] = None
    quality: Optional[float] = Field(None, gt=0.0, le=1.0)
    alpha: Optional[float] = Field(None, gt=0.0, le=1.0)
    rule: Optional[str] = None
    method: str = "stability"
    dense: bool = False


class CompletionRequest(_Request):
    prompt: Union[str, list[str]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(pattern="^(system|developer|user|assistant)$")
    content: Union[str, list[dict[str, Any]]]

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise APIError(400, "only text content parts are supported", "messages")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


# Settings of one request, checked against the server's defaults and limits.


def sparsity_for(request: _Request, settings: ServerSettings) -> Optional[SparsityConfig]:
    """The request's sparsity, or ``None`` for a dense request."""
    if request.method not in SUPPORTED_METHODS:
        message = f"method {request.method!r} is not supported yet; use one of {list(SUPPORTED_METHODS)}"
        raise APIError(400, message, "method")
    if request.dense:
        return None
    try:
        return SparsityConfig(
            keep=request.keep if request.keep is not None else settings.keep,
            alpha=request.alpha if request.alpha is not None else settings.alpha,
            rule=request.rule if request.rule is not None else settings.rule,
            quality=request.quality if request.quality is not None else settings.quality,
        )
    except (ValueError, TypeError) as err:
        raise APIError(400, str(err), "keep" if "keep" in str(err) else "rule") from None


def sampling_for(request: _Request, settings: ServerSettings) -> SamplingConfig:
    max_tokens = request.max_completion_tokens or request.max_tokens or settings.max_tokens
    if max_tokens > settings.max_tokens_limit:
        message = f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}"
        raise APIError(400, message, "max_tokens")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > 4:
        raise APIError(400, "at most 4 stop sequences are allowed", "stop")
    return SamplingConfig(max_tokens, request.temperature, request.top_p, request.seed, stop)


def check_model(engine: Engine, name: Optional[str]) -> None:
    if name is not None and name != engine.name:
        message = f"the model {name!r} does not exist; this server serves {engine.name!r}"
        raise APIError(404, message, "model", "model_not_found")


def check_prompt_length(
    ids: list[int], sampling: SamplingConfig, settings: ServerSettings, engine: Engine, param: str
) -> None:
    limit = settings.max_prompt_tokens
    context = getattr(engine.model.config, "max_position_embeddings", None)
    if context:
        limit = min(limit, context - sampling.max_new_tokens)
    if len(ids) > limit:
        raise APIError(
            400,
            f"the prompt has {len(ids)} tokens; with max_tokens={sampling.max_new_tokens} at most {limit} are allowed",
            param,
            "context_length_exceeded",
        )


def encode_completion(engine: Engine, request: CompletionRequest) -> list[int]:
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if len(prompts) != 1:
        raise APIError(400, "give exactly one prompt per request", "prompt")
    try:
        return engine.encode(prompts[0], chat=False)
    except ValueError as err:
        raise APIError(400, str(err), "prompt") from None


def encode_messages(engine: Engine, request: ChatRequest) -> list[int]:
    messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in request.messages]
    try:
        return engine.encode_chat(messages)
    except ValueError as err:
        raise APIError(400, str(err), "messages") from None


# Responses


def _finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def usage(result: GenerationResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.new_tokens,
        "total_tokens": result.prompt_tokens + result.new_tokens,
    }


def measurements(result: GenerationResult, sparsity: Optional[SparsityConfig]) -> dict:
    """The ``coreinfer`` extension of a response: what was kept and how fast it decoded."""
    return {
        "dense": sparsity is None,
        "keep": result.keep,
        "alpha": sparsity.alpha if sparsity else None,
        "rule": sparsity.rule if sparsity else None,
        "method": "stability" if sparsity else None,
        "ffn_density": round(result.ffn_density, 5),
        "decode_tok_s": round(result.decode_tok_s, 3),
        "prefill_s": round(result.prefill_s, 5),
        "select_s": round(result.select_s, 5),
        "quality": sparsity.quality if sparsity and sparsity.auto else None,
        "dense_tokens": result.dense_tokens,
        "backend": result.backend,
        "weights": result.weights,
    }


@dataclass(frozen=True)
class _Job:
    """One validated request, ready to run: everything the response needs to name."""

    chat: bool
    ids: list[int]
    sparsity: Optional[SparsityConfig]
    sampling: SamplingConfig
    model: str
    stream: bool
    include_usage: bool
    id: str
    created: int

    def run(self, engine: Engine, on_token: Optional[Callable[[TokenEvent], None]] = None) -> GenerationResult:
        return engine.generate_ids([self.ids], self.sparsity, self.sampling, on_token)[0]

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, result: GenerationResult) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": result.text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(result)}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": _finish_reason(result)}
        return {**self._envelope(False), "choices": [choice], "usage": usage(result),
                "coreinfer": measurements(result, self.sparsity)}

    def chunk(self, text: Optional[str], finish_reason: Optional[str] = None, role: bool = False) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope(True), "choices": [choice]}

    def final_chunks(self, result: GenerationResult) -> Iterator[dict]:
        last = self.chunk(None if self.chat else "", _finish_reason(result))
        yield {**last, "coreinfer": measurements(result, self.sparsity)}
        if self.include_usage:
            yield {**self._envelope(True), "choices": [], "usage": usage(result)}


def _sse(payload: Union[dict, str]) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_events(engine: Engine, job: _Job) -> AsyncIterator[Union[TokenEvent, GenerationResult]]:
    """Run ``job`` in a worker thread, yielding its token events and then its result.

    Leaving the iterator early (the client went away) stops the generation at its
    next token, which frees the engine for the requests queued behind it.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (server shutting down)
            cancelled.set()

    def on_token(event: TokenEvent) -> None:
        if cancelled.is_set():
            raise GenerationCancelled
        put(event)

    def work() -> None:
        try:
            put(job.run(engine, on_token))
        except BaseException as err:  # handed to the event loop, raised there
            put(err)

    threading.Thread(target=work, name=f"generate-{job.id}", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, GenerationResult):
                return
    finally:
        cancelled.set()


async def sse_body(engine: Engine, job: _Job) -> AsyncIterator[str]:
    if job.chat:
        yield _sse(job.chunk("", role=True))
    try:
        async for item in stream_events(engine, job):
            if isinstance(item, GenerationResult):
                for chunk in job.final_chunks(item):
                    yield _sse(chunk)
            elif item.text:
                yield _sse(job.chunk(item.text))
    except Exception as err:  # the status line is sent already: report in-band, as OpenAI does
        yield _sse({"error": {"message": str(err), "type": "server_error", "param": None, "code": None}})
    yield _sse("[DONE]")


def demo_page() -> str:
    return files("coreinfer").joinpath("demo.html").read_text(encoding="utf-8")


def create_app(engine: Engine, settings: ServerSettings = ServerSettings()) -> FastAPI:
    """The FastAPI application serving ``engine``."""
    if engine.tokenizer is None:
        raise ValueError("the server needs an engine with a tokenizer")
    app = FastAPI(title="coreinfer", description="OpenAI-compatible CoreInfer server", docs_url="/docs")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON", None, "invalid_json").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return APIError(400, message, loc[0] if loc else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return APIError(err.status_code, str(err.detail)).response()

    def prepare(request: _Request, chat: bool) -> _Job:
        check_model(engine, request.model)
        sparsity = sparsity_for(request, settings)
        sampling = sampling_for(request, settings)
        ids = encode_messages(engine, request) if chat else encode_completion(engine, request)
        check_prompt_length(ids, sampling, settings, engine, "messages" if chat else "prompt")
        include_usage = bool((request.stream_options or {}).get("include_usage"))
        prefix = "chatcmpl" if chat else "cmpl"
        return _Job(chat, ids, sparsity, sampling, engine.name, request.stream, include_usage,
                    f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()))

    async def answer(job: _Job):
        if job.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(sse_body(engine, job), media_type="text/event-stream", headers=headers)
        result = None
        async for item in stream_events(engine, job):
            result = item
        return job.response(result)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": engine.name, "object": "model", "created": 0, "owned_by": "coreinfer"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        return await answer(prepare(request, chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        return await answer(prepare(request, chat=True))

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return demo_page().replace("{{MODEL}}", engine.name)

    return app


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yields its base URL (``port=0``: a free port)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
