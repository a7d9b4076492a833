"""An OpenAI-compatible HTTP server for one ``Engine``, with the sparsity settings as request extensions.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` answers with server-sent events in OpenAI's chunk format, ending
with ``data: [DONE]``), and ``GET /``, a demo page streaming the dense and the
CoreInfer answers side by side.

Requests are validated and tokenised on the event loop, then handed to a
``scheduler.Scheduler``: concurrent requests decode together, each joining the running
batch after its own prefill and leaving when it ends or its client goes away (continuous
batching), each with its own sparsity, sampling and stop strings. At most ``max_batch``
sequences decode at once; ``max_queue`` requests may wait, each at most ``queue_timeout``
seconds; past that the server answers 429 (with ``Retry-After``) or 503. Bad input is
answered at once, whatever is generating. A request with several answers (a list of
prompts, ``n`` > 1) joins as one batch; its choices stream interleaved, each with its index.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib.resources import files
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2.exceptions import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import DEFAULT_SPARSITY
from .config import mode_for
from .engine import Engine, GenerationResult, SamplingConfig, SparsityConfig, TokenEvent
from .scheduler import QueueFull, QueueTimeout, Scheduler, Submission, check_limits

SUPPORTED_METHODS = ("stability",)  # similarity-guided selection is not wired in yet


@dataclass(frozen=True)
class ServerSettings:
    """Server-side defaults (used when a request leaves a field out) and limits."""

    keep: Union[float, str] = DEFAULT_SPARSITY.keep  # "auto": chosen per request
    alpha: float = 0.2
    rule: str = DEFAULT_SPARSITY.rule
    quality: float = DEFAULT_SPARSITY.quality
    mode: Optional[str] = None  # None: token for keep "auto", sentence for a number (config.mode_for)
    targets: str = DEFAULT_SPARSITY.targets
    max_tokens: int = 256  # default completion length
    max_tokens_limit: int = 2048  # largest max_tokens a request may ask for
    max_prompt_tokens: int = 4096
    max_choices: int = 16  # largest batch a request may ask for: its prompts times n
    max_batch: int = 8  # sequences decoding together (continuous batching)
    max_queue: int = 64  # requests waiting for room; one more is answered 429
    queue_timeout: float = 60.0  # seconds a request may wait for room before a 503

    def __post_init__(self) -> None:
        # raises on bad defaults
        SparsityConfig(self.keep, self.alpha, self.rule, quality=self.quality,
                       mode=mode_for(self.mode, self.keep), targets=self.targets)
        if not 1 <= self.max_tokens <= self.max_tokens_limit:
            raise ValueError(f"max_tokens must lie in [1, {self.max_tokens_limit}], got {self.max_tokens}")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be at least 1, got {self.max_prompt_tokens}")
        if self.max_choices < 1:
            raise ValueError(f"max_choices must be at least 1, got {self.max_choices}")
        check_limits(self.max_batch, self.max_queue, self.queue_timeout)


class APIError(Exception):
    """A client error answered in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = ("invalid_request_error" if self.status < 500 and self.status != 429
                else "rate_limit_error" if self.status == 429 else "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# Request bodies. They take every field OpenAI's Chat Completions and Completions APIs take; unknown
# fields and those that change nothing here (user, metadata, store, service_tier, parallel_tool_calls,
# prediction, reasoning_effort, ...) are ignored. A field asking for something this server does not do
# (logprobs, penalties, logit_bias, tool calls, JSON output, audio ...) is refused by
# ``check_unsupported`` with a 400 naming it, rather than answered as if it had been honoured.
# ``null`` means "left out" for every field, as in OpenAI's API.


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)  # 0 (the default here) is greedy
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)  # 0 keeps only the likeliest token: greedy
    n: Optional[int] = Field(None, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[dict[str, Any]] = None
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    # CoreInfer extensions; None takes the server's default.
    keep: Union[float, Literal["auto"], None] = None
    quality: Optional[float] = Field(None, gt=0.0, le=1.0)
    alpha: Optional[float] = Field(None, gt=0.0, le=1.0)
    rule: Optional[str] = None
    mode: Optional[str] = None  # "sentence" or "token"
    targets: Optional[str] = None  # token mode: "ffn" or "all"
    method: str = "stability"
    dense: bool = False


class CompletionRequest(_Request):
    # A string, a list of strings, a list of token ids or a list of token-id lists (see ``completion_prompts``).
    prompt: Union[str, list[Any]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, audio, ...

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[dict[str, Any]], None] = None
    refusal: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None

    def text(self, where: str = "messages") -> str:
        """The message's text: a string, or its text (and refusal) parts joined; other parts are refused."""
        if self.content is None:
            if self.role in ("assistant", "function"):  # an assistant turn that only called a tool or refused
                return self.refusal or ""
            raise APIError(400, f"{where}.content: a {self.role} message needs content", f"{where}.content")
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for j, part in enumerate(self.content):
            kind, param = part.get("type"), f"{where}.content[{j}]"
            field = {"text": "text", "refusal": "refusal"}.get(kind)
            if field is None:
                message = f"{param}: content parts of type {kind!r} are not supported; this server takes text only"
                raise APIError(400, message, param, "unsupported_content_type")
            if not isinstance(part.get(field), str):
                raise APIError(400, f"{param}: a {kind} part needs a string {field!r}", param)
            pieces.append(part[field])
        return "".join(pieces)

    def for_template(self, where: str) -> dict:
        """The message as a chat template takes it (roles ``developer`` -> system, ``function`` -> tool)."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        message: dict[str, Any] = {"role": role, "content": self.text(where)}
        if self.tool_calls:  # HF templates that render tool calls expect parsed arguments
            message["tool_calls"] = [_parsed_arguments(call) for call in self.tool_calls]
        return message


def _parsed_arguments(call: dict) -> dict:
    if not isinstance(call.get("function"), dict):  # a custom tool's call
        return call
    function = dict(call["function"])
    if isinstance(function.get("arguments"), str):
        try:
            function["arguments"] = json.loads(function["arguments"])
        except json.JSONDecodeError:
            pass
    return {**call, "function": function}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    functions: Optional[list[dict[str, Any]]] = None  # deprecated form of tools
    function_call: Union[str, dict[str, Any], None] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict[str, Any]] = None
    web_search_options: Optional[dict[str, Any]] = None


def check_unsupported(request: _Request) -> None:
    """Refuse, naming the field, what this server cannot honour; accept the same field's no-op values."""
    def refuse(param: str, why: str) -> None:
        raise APIError(400, f"{param}: {why}", param, "unsupported_parameter")

    for penalty in ("presence_penalty", "frequency_penalty"):
        if getattr(request, penalty):
            refuse(penalty, "only 0 is supported (no repetition penalties here)")
    if request.logit_bias:
        refuse("logit_bias", "is not supported; send {} or leave it out")
    if isinstance(request, CompletionRequest):
        if request.logprobs is not None:
            refuse("logprobs", "log probabilities are not returned by this server")
        if request.suffix:
            refuse("suffix", "insertion (text after the completion) is not supported")
        if request.best_of is not None and request.best_of != (request.n or 1):
            refuse("best_of", "ranking several candidates is not supported; best_of may only equal n")
        return
    assert isinstance(request, ChatRequest)
    if request.logprobs:
        refuse("logprobs", "log probabilities are not returned by this server")
    if request.top_logprobs:
        refuse("top_logprobs", "log probabilities are not returned by this server")
    kind = (request.response_format or {}).get("type", "text")
    if kind != "text":
        refuse("response_format", f"only type 'text' is supported, not {kind!r}")
    # Tools may be offered (the model answers in text: "auto" lets it); forcing a call cannot be honoured.
    for param in ("tool_choice", "function_call"):
        choice = getattr(request, param)
        if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
            choice = (choice.get("allowed_tools") or {}).get("mode")
        if choice is not None and choice not in ("auto", "none"):
            refuse(param, "this server does not call tools; only 'auto' or 'none' (the model answers in text)")
    if request.modalities and set(request.modalities) != {"text"}:
        refuse("modalities", 'only ["text"] is supported')
    if request.audio is not None:
        refuse("audio", "audio output is not supported")
    if request.web_search_options is not None:
        refuse("web_search_options", "web search is not supported")


# Settings of one request, checked against the server's defaults and limits.


def sparsity_for(request: _Request, settings: ServerSettings) -> Optional[SparsityConfig]:
    """The request's sparsity, or ``None`` for a dense request."""
    if request.method not in SUPPORTED_METHODS:
        message = f"method {request.method!r} is not supported yet; use one of {list(SUPPORTED_METHODS)}"
        raise APIError(400, message, "method")
    if request.dense:
        return None
    keep = request.keep if request.keep is not None else settings.keep
    try:
        return SparsityConfig(
            keep=keep,
            alpha=request.alpha if request.alpha is not None else settings.alpha,
            rule=request.rule if request.rule is not None else settings.rule,
            quality=request.quality if request.quality is not None else settings.quality,
            mode=mode_for(request.mode if request.mode is not None else settings.mode, keep),
            targets=request.targets if request.targets is not None else settings.targets,
        )
    except (ValueError, TypeError) as err:  # SparsityConfig's messages start with the field's name
        message = str(err)
        fields = ("keep", "alpha", "quality", "mode", "targets")
        param = next((name for name in fields if message.startswith(name)), "rule")
        raise APIError(400, message, param) from None


def sampling_for(request: _Request, settings: ServerSettings) -> SamplingConfig:
    param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    max_tokens = request.max_completion_tokens or request.max_tokens or settings.max_tokens
    if max_tokens > settings.max_tokens_limit:
        message = f"{param} is {max_tokens}; this server allows at most {settings.max_tokens_limit}"
        raise APIError(400, message, param)
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > 4:
        raise APIError(400, "at most 4 stop sequences are allowed", "stop")
    temperature, top_p = request.temperature or 0.0, 1.0 if request.top_p is None else request.top_p
    if top_p == 0:  # only the likeliest token survives: greedy
        temperature, top_p = 0.0, 1.0
    return SamplingConfig(max_tokens, temperature, top_p, request.seed, stop)


def check_model(engine: Engine, name: Optional[str]) -> None:
    if name is not None and name != engine.name:
        message = f"the model {name!r} does not exist; this server serves {engine.name!r}"
        raise APIError(404, message, "model", "model_not_found")


def check_prompt_length(
    ids: list[int], sampling: SamplingConfig, settings: ServerSettings, engine: Engine, param: str,
    where: Optional[str] = None,
) -> None:
    limit = settings.max_prompt_tokens
    context = getattr(engine.model.config, "max_position_embeddings", None)
    if context:
        limit = min(limit, context - sampling.max_new_tokens)
    if len(ids) > limit:
        tokens = sampling.max_new_tokens
        message = f"the prompt has {len(ids)} tokens; with max_tokens={tokens} at most {limit} are allowed"
        raise APIError(400, f"{where}: {message}" if where else message, param, "context_length_exceeded")


def completion_prompts(prompt: Union[str, list[Any]]) -> list[Union[str, list[int]]]:
    """The prompts of a completion request: OpenAI's four shapes (a string, a list of strings,
    a list of token ids, a list of token-id lists) as a list of strings and token-id lists."""
    def is_id(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(is_id(x) for x in prompt):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: the list of prompts is empty", "prompt")
    for i, item in enumerate(prompt):
        if not (isinstance(item, str) or isinstance(item, list) and all(is_id(x) for x in item)):
            message = (f"prompt[{i}]: a prompt is a string or a list of token ids (prompt is a string, a list of "
                       "strings, a list of token ids or a list of token-id lists)")
            raise APIError(400, message, "prompt")
    return list(prompt)


def encode_completion(engine: Engine, request: CompletionRequest) -> list[list[int]]:
    prompts = completion_prompts(request.prompt)
    vocab = engine.model.get_input_embeddings().weight.shape[0]
    encoded = []
    for i, prompt in enumerate(prompts):
        where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if isinstance(prompt, str):
            try:
                encoded.append(engine.encode(prompt, chat=False))
            except ValueError as err:
                raise APIError(400, f"{where}: {err}", "prompt") from None
            continue
        if not prompt:
            raise APIError(400, f"{where}: the prompt is empty (no tokens)", "prompt")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{where}: token ids {bad[:5]} lie outside the vocabulary [0, {vocab})", "prompt")
        encoded.append(list(prompt))
    return encoded


def encode_messages(engine: Engine, request: ChatRequest) -> list[int]:
    messages = [m.for_template(f"messages[{i}]") for i, m in enumerate(request.messages)]
    try:
        return engine.encode_chat(messages)
    except ValueError as err:
        raise APIError(400, str(err), "messages") from None
    except TemplateError as err:  # e.g. a template that takes no system or tool turns, or insists on alternation
        raise APIError(400, f"the model's chat template cannot take these messages: {err}", "messages") from None


# Responses


def _finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def measurements(result: GenerationResult, sparsity: Optional[SparsityConfig]) -> dict:
    """The ``coreinfer`` extension of a response: what was kept and how fast it decoded."""
    return {
        "dense": sparsity is None,
        "keep": result.keep,
        "alpha": sparsity.alpha if sparsity else None,
        "rule": sparsity.rule if sparsity else None,
        "method": "stability" if sparsity else None,
        "mode": result.mode,
        "targets": sparsity.targets if sparsity and sparsity.token else None,
        "ffn_density": round(result.ffn_density, 5),
        "weight_share": round(result.weight_share, 5),
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
    """One validated request, ready to run: everything the response needs to name.

    It has ``len(prompts) * n`` choices, choice ``p * n + k`` being prompt ``p``'s ``k``-th answer
    (OpenAI's order), and runs as one batch through the engine.
    """

    chat: bool
    prompts: list[list[int]]
    sparsity: Optional[SparsityConfig]
    sampling: SamplingConfig
    model: str
    stream: bool
    include_usage: bool
    id: str
    created: int
    n: int = 1
    echo: Optional[list[str]] = None  # completions with echo: each prompt's text, put before its answers

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def batches(self) -> list[tuple[list[list[int]], SamplingConfig, list[int]]]:
        """The engine calls this job makes: (prompts, sampling, choice index of each sequence)."""
        s = self.sampling
        if self.n > 1 and s.temperature > 0 and s.seed is not None:
            # A batch seeds every sequence alike, so its n copies of a prompt would draw the same
            # sample: one batch per copy instead, seeded seed, seed + 1, ...
            return [(self.prompts, replace(s, seed=s.seed + k), [p * self.n + k for p in range(len(self.prompts))])
                    for k in range(self.n)]
        return [([ids for ids in self.prompts for _ in range(self.n)], s, list(range(self.choices)))]

    def submit(self, scheduler: Scheduler, on_token: Callable[[TokenEvent], None], on_done: Callable[[], None],
               on_admitted: Callable[[], None]) -> list[tuple[Submission, list[int]]]:
        """Queue every batch of the job; ``on_token`` sees each event with its choice index.

        All or nothing: if the queue is full, what was queued is withdrawn and a 429 raised.
        """
        submitted: list[tuple[Submission, list[int]]] = []
        try:
            for prompts, sampling, indices in self.batches():
                def relay(event: TokenEvent, indices=indices) -> None:
                    on_token(replace(event, index=indices[event.index]))

                submitted.append((scheduler.submit(prompts, self.sparsity, sampling, relay, on_done, on_admitted),
                                  indices))
        except QueueFull as err:
            for sub, _ in submitted:
                sub.cancel()
            raise APIError(429, f"the server is busy: {err}", code="queue_full",
                           headers={"Retry-After": str(err.retry_after)}) from None
        return submitted

    def _envelope(self, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _echoed(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo else ""

    def usage(self, results: list[GenerationResult]) -> dict:
        prompt = sum(len(ids) for ids in self.prompts)  # each prompt counts once, however many answers it has
        completion = sum(r.new_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self, results: list[GenerationResult]) -> dict:
        choices = []
        for index, result in enumerate(results):
            choice: dict[str, Any] = {"index": index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = self._echoed(index) + result.text
            choice |= {"logprobs": None, "finish_reason": _finish_reason(result)}
            if len(results) > 1:
                choice["coreinfer"] = measurements(result, self.sparsity)
            choices.append(choice)
        return {**self._envelope(False), "choices": choices, "usage": self.usage(results),
                "coreinfer": measurements(results[0], self.sparsity)}

    def chunk(
        self, text: Optional[str], finish_reason: Optional[str] = None, role: bool = False, index: int = 0
    ) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope(True), "choices": [choice]}

    def first_chunks(self) -> Iterator[dict]:
        """Before any token: each chat choice's role, or each echoed prompt."""
        for index in range(self.choices):
            if self.chat:
                yield self.chunk("", role=True, index=index)
            elif self._echoed(index):
                yield self.chunk(self._echoed(index), index=index)

    def final_chunks(self, results: list[GenerationResult]) -> Iterator[dict]:
        """Each choice's finish reason with its ``coreinfer`` measurements, then the usage if asked for."""
        for index, result in enumerate(results):
            last = self.chunk(None if self.chat else "", _finish_reason(result), index=index)
            yield {**last, "coreinfer": measurements(result, self.sparsity)}
        if self.include_usage:
            yield {**self._envelope(True), "choices": [], "usage": self.usage(results)}


def _sse(payload: Union[dict, str]) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _Stream:
    """A job's submissions to the scheduler, their events relayed to the event loop.

    Leaving early (``close``: the client went away) cancels them at the next step, which frees
    their slots for the requests waiting.
    """

    def __init__(self, scheduler: Scheduler, job: _Job):
        self.job = job
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ready = asyncio.Event()  # every batch has left the scheduler's queue
        # Empty until submit returns: an admission may call back (on the loop, later) even if a
        # later batch then finds the queue full and this stream is never used.
        self.submitted: list[tuple[Submission, list[int]]] = []
        self.submitted = job.submit(scheduler, self._put, lambda: self._put(None), self._on_admitted)

    def _put(self, item) -> None:  # on the scheduler's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed (server shutting down)
            self.close()

    def _on_admitted(self) -> None:  # on the scheduler's thread
        try:
            self.loop.call_soon_threadsafe(self._check_admitted)
        except RuntimeError:  # the event loop has closed
            pass

    def _check_admitted(self) -> None:
        if all(sub.admitted.is_set() for sub, _ in self.submitted):
            self.ready.set()

    async def admitted(self) -> None:
        """Wait until every batch has left the queue; a 503 if one waited too long."""
        self._check_admitted()  # batches admitted before this stream listened
        await self.ready.wait()
        for sub, _ in self.submitted:
            if isinstance(sub.error, QueueTimeout):
                self.close()
                raise APIError(503, str(sub.error), code="queue_timeout", headers={"Retry-After": "1"})

    async def events(self) -> AsyncIterator[Union[TokenEvent, list[GenerationResult]]]:
        """The token events, then the results (a list, one per choice)."""
        pending = len(self.submitted)
        try:
            while pending:
                item = await self.queue.get()
                if item is None:
                    pending -= 1
                else:
                    yield item
            results: list[Optional[GenerationResult]] = [None] * self.job.choices
            for sub, indices in self.submitted:
                if sub.error is not None:
                    raise sub.error
                for index, result in zip(indices, sub.results):
                    results[index] = result
            yield results
        finally:
            self.close()

    def close(self) -> None:
        for sub, _ in self.submitted:
            if not sub.done.is_set():
                sub.cancel()


async def _cancel_on_disconnect(http: Request, stream: _Stream) -> None:
    """A client waiting for a whole answer that hangs up frees its slots too."""
    while not await http.is_disconnected():
        await asyncio.sleep(0.1)
    stream.close()


async def sse_body(stream: _Stream) -> AsyncIterator[str]:
    job = stream.job
    for chunk in job.first_chunks():
        yield _sse(chunk)
    try:
        async for item in stream.events():
            if isinstance(item, list):
                for chunk in job.final_chunks(item):
                    yield _sse(chunk)
            elif item.text:
                yield _sse(job.chunk(item.text, index=item.index))
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
    scheduler = Scheduler(engine, settings.max_batch, settings.max_queue, settings.queue_timeout)
    app.state.scheduler = scheduler

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
        check_unsupported(request)
        sparsity = sparsity_for(request, settings)
        sampling = sampling_for(request, settings)
        prompts = [encode_messages(engine, request)] if chat else encode_completion(engine, request)
        n = request.n or 1
        if len(prompts) * n > settings.max_choices:
            message = (f"{len(prompts)} prompt(s) times n={n} asks for {len(prompts) * n} answers; "
                       f"this server gives at most {settings.max_choices} per request")
            raise APIError(400, message, "n" if len(prompts) == 1 else "prompt")
        for i, ids in enumerate(prompts):
            where = f"prompt[{i}]" if len(prompts) > 1 else None
            check_prompt_length(ids, sampling, settings, engine, "messages" if chat else "prompt", where)
        echo = None
        if not chat and request.echo:
            echo = [p if isinstance(p, str) else engine.decode_text(p) for p in completion_prompts(request.prompt)]
        include_usage = bool((request.stream_options or {}).get("include_usage"))
        prefix = "chatcmpl" if chat else "cmpl"
        return _Job(chat, prompts, sparsity, sampling, engine.name, bool(request.stream), include_usage,
                    f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), n, echo)

    async def answer(job: _Job, http: Request):
        stream = _Stream(scheduler, job)
        await stream.admitted()
        if job.stream:  # a client that goes away closes the body's generator, which cancels the job
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(sse_body(stream), media_type="text/event-stream", headers=headers)
        watcher = asyncio.create_task(_cancel_on_disconnect(http, stream))
        try:
            results = None
            async for item in stream.events():
                results = item
        finally:
            watcher.cancel()
        return job.response(results)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": engine.name, "object": "model", "created": 0, "owned_by": "coreinfer"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        return await answer(prepare(request, chat=False), http)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        return await answer(prepare(request, chat=True), http)

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
        scheduler = getattr(app.state, "scheduler", None)
        if scheduler is not None:
            scheduler.close()
