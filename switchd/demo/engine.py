"""A stand-in OpenAI-compatible inference engine for demos and tests without a GPU.

It behaves like a vLLM server from the outside: it listens at once, reports 503 on
/health while "loading" (printing vLLM-like log lines), then serves deterministic
chat, completion, Responses API and embedding answers, streamed at a fixed token
rate if asked.

With --enable-sleep-mode it also offers vLLM's sleep-mode API (what vLLM serves with
--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1): POST /sleep?level=1|2[&mode=abort|wait|keep]
(each mode recorded, for tests), POST /wake_up
(optionally ?tags=weights / ?tags=kv_cache, repeatable), GET /is_sleeping and POST
/collective_rpc {"method": "reload_weights"}. Level 1 keeps the weights (offloaded to
CPU RAM); level 2 discards them, so after waking, generation answers 500
`weights_not_loaded` until reload_weights ran. While asleep /health and /v1/models still
answer, generation answers 503 `engine_sleeping`, and open streams are ended when a sleep
starts. Without the flag these paths answer 404, like a vLLM without dev mode.
`/v1/models` lists `max_model_len` as vLLM does, and `GET /props` gives llama.cpp's
`default_generation_settings.n_ctx`: the same figure (--max-model-len).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

OWNER = "switchd-demo"
PROMPT_ECHO_CHARS = 200
DEFAULT_MAX_TOKENS = 64
SLEEP_TAGS = ("weights", "kv_cache")
SLEEP_LEVELS = (1, 2)
SLEEP_MODES = ("abort", "wait", "keep")  # vLLM's /sleep `mode`; abort is its default
DEFAULT_MAX_MODEL_LEN = 4096


class Engine:
    def __init__(self, model: str, tokens_per_second: float) -> None:
        self.model = model
        self.tokens_per_second = tokens_per_second
        self.created = int(time.time())
        self.loaded = False
        self.stopping = False
        # Sleep mode (vLLM's --enable-sleep-mode), configured from the command line.
        self.sleep_mode = False
        self.sleep_seconds = 0.2
        self.wake_seconds = 0.3
        self.reload_seconds = 1.0
        self.fail_sleep = False
        # vLLM #45520: a sleep during decode crashed the engine, yet /sleep answered 200.
        self.crash_in_sleep = False
        self.crashed = False
        self.fail_wake = False
        # Serialises /sleep, /wake_up and /collective_rpc; /health and /is_sleeping do
        # not take it, so they keep answering while a call spends its time.
        self.sleep_lock = asyncio.Lock()
        self.sleeping: set[str] = set()  # tags asleep, a subset of SLEEP_TAGS
        self.sleep_level: int | None = None  # the last sleep's level
        self.sleep_modes: list[str] = []  # each /sleep's `mode`, as asked (tests read it)
        self.max_model_len = DEFAULT_MAX_MODEL_LEN
        self.weights_loaded = True  # level 2 discards them until reload_weights
        self.falling_asleep = False
        # Bumped when a sleep starts: a stream begun under another value ends.
        self.sleep_epoch = 0

    def asleep(self) -> bool:
        return self.falling_asleep or bool(self.sleeping)


def log(line: str) -> None:
    # Supervisors read this stream line by line to show progress and failures.
    print(line, flush=True)


def error(status: int, message: str, code: str, kind: str = "invalid_request_error") -> Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def words(text: str) -> list[str]:
    return text.split()


def message_text(content: Any) -> str:
    # OpenAI allows content as a plain string or a list of typed parts.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(str(p.get("text", "")) for p in parts)
    return ""


def embed(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(b / 127.5) - 1.0 for b in digest[:8]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in raw]


async def read_body(request: Request, engine: Engine) -> dict[str, Any] | Response:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return error(400, "Request body is not valid JSON.", "invalid_json")
    if not isinstance(body, dict):
        return error(400, "Request body must be a JSON object.", "invalid_json")
    model = body.get("model")
    if model is not None and model != engine.model:
        return error(404, f"The model `{model}` does not exist.", "model_not_found")
    if not engine.loaded:
        message = f"Model {engine.model} is still loading."
        return error(503, message, "model_loading", "server_error")
    if engine.asleep():
        message = f"Model {engine.model} is sleeping; POST /wake_up first."
        return error(503, message, "engine_sleeping", "server_error")
    if not engine.weights_loaded:
        # A real vLLM would generate garbage here; the demo makes the mistake visible.
        message = (
            f"Model {engine.model} woke from a level 2 sleep without its weights; "
            'POST /collective_rpc {"method": "reload_weights"} first.'
        )
        return error(500, message, "weights_not_loaded", "server_error")
    return body


def token_budget(
    body: dict[str, Any], names: tuple[str, ...] = ("max_tokens", "max_completion_tokens")
) -> int | Response:
    """The first of `names` the body has (chat's by default), else DEFAULT_MAX_TOKENS."""
    value = next((body[name] for name in names if name in body), DEFAULT_MAX_TOKENS)
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return error(400, f"{names[0]} must be a positive integer.", "invalid_value")
    return value


async def generate(request: Request, chat: bool) -> Response:
    engine: Engine = request.app.state.engine
    body = await read_body(request, engine)
    if isinstance(body, Response):
        return body
    budget = token_budget(body)
    if isinstance(budget, Response):
        return budget
    if chat:
        raw = body.get("messages")
        messages = [m for m in raw if isinstance(m, dict)] if isinstance(raw, list) else []
        prompt_text = " ".join(message_text(m.get("content")) for m in messages)
        user = [m for m in messages if m.get("role") == "user"]
        said = message_text(user[-1].get("content")) if user else ""
        answer = f"Hello from {engine.model}. You said: {said[:PROMPT_ECHO_CHARS]}"
    else:
        prompt = body.get("prompt", "")
        prompt_text = prompt[0] if isinstance(prompt, list) and prompt else str(prompt)
        answer = f"Completion from {engine.model} for: {prompt_text[:PROMPT_ECHO_CHARS]}"
    tokens = words(answer)[:budget]
    finish = "length" if len(words(answer)) > budget else "stop"
    if body.get("ignore_eos") is True:
        # vLLM's sampling flag: generate exactly max_tokens (benchmarks need long answers).
        tokens = list(itertools.islice(itertools.cycle(words(answer)), budget))
        finish = "length"
    usage = {
        "prompt_tokens": len(words(prompt_text)),
        "completion_tokens": len(tokens),
        "total_tokens": len(words(prompt_text)) + len(tokens),
    }
    prefix = "chatcmpl" if chat else "cmpl"
    base = {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": engine.model,
    }
    if body.get("stream"):
        options = body.get("stream_options")
        with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        stream = stream_chunks(
            engine,
            base,
            tokens,
            chat=chat,
            finish=finish,
            usage=usage if with_usage else None,
            epoch=engine.sleep_epoch,
        )
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    text = " ".join(tokens)
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return JSONResponse({**base, "choices": [choice], "usage": usage})


async def stream_chunks(
    engine: Engine,
    base: dict[str, Any],
    tokens: list[str],
    *,
    chat: bool,
    finish: str,
    usage: dict[str, int] | None,
    epoch: int,
) -> AsyncIterator[str]:
    base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}
    delay = 1.0 / engine.tokens_per_second if engine.tokens_per_second > 0 else 0.0

    def cut() -> bool:
        return engine.stopping or engine.sleep_epoch != epoch

    def chunk(piece: str | None, first: bool, finish_reason: str | None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if chat:
            delta: dict[str, str] = {} if piece is None else {"content": piece}
            if first:
                delta["role"] = "assistant"
            choice["delta"] = delta
        else:
            choice["text"] = piece or ""
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

    for i, token in enumerate(tokens):
        if i and delay:
            await pause(delay, cut)
        if cut():
            # Cut the stream short, as a real engine aborts requests on shutdown, rather
            # than run into uvicorn's graceful-shutdown timeout; and as vLLM's /sleep
            # (mode=abort, its default) aborts the requests in flight.
            return
        # Leading spaces make the concatenated deltas equal the non-streamed text.
        yield chunk(token if i == 0 else f" {token}", i == 0, None)
    yield chunk(None, not tokens, finish)
    if usage is not None:
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


# ---- the Responses API (POST /v1/responses) --------------------------------------------
# The shape of OpenAI's Responses API: a `response` object whose `output` holds one
# assistant `message` with one `output_text` part; streamed, the documented semantic
# events (`event:` lines, each payload with its `type` and a `sequence_number`), ending
# with response.completed (or response.incomplete) and no `[DONE]`.


def input_text(value: Any) -> str:
    """The last user text of a Responses `input`: a string, or a list of message items
    whose content is a string or parts (`input_text`, or `text` as chat allows)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        return ""
    said = ""
    for item in value:
        if not isinstance(item, dict) or item.get("role", "user") != "user":
            continue
        content = item.get("content")
        if isinstance(content, list):
            parts = [
                p
                for p in content
                if isinstance(p, dict) and p.get("type") in ("input_text", "text")
            ]
            said = " ".join(str(p.get("text", "")) for p in parts)
        else:
            said = message_text(content)
    return said


def response_object(
    engine: Engine,
    ids: tuple[str, str],
    created: int,
    *,
    status: str,
    text: str | None,
    usage: dict[str, int] | None,
    budget: int,
) -> dict[str, Any]:
    """A `response` object; `text` None: no output yet (as response.created has it)."""
    response_id, message_id = ids
    output = [] if text is None else [message_item(message_id, text, "completed")]
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "model": engine.model,
        "output": output,
        "max_output_tokens": budget,
        "usage": usage,
    }


def message_item(message_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [text_part(text)]
    return {
        "type": "message",
        "id": message_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


async def responses(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    body = await read_body(request, engine)
    if isinstance(body, Response):
        return body
    budget = token_budget(body, ("max_output_tokens",))
    if isinstance(budget, Response):
        return budget
    said = input_text(body.get("input"))
    instructions = body.get("instructions")
    prompt_text = f"{instructions} {said}" if isinstance(instructions, str) else said
    answer = words(f"Hello from {engine.model}. You said: {said[:PROMPT_ECHO_CHARS]}")
    tokens = answer[:budget]
    status = "incomplete" if len(answer) > budget else "completed"
    usage = {
        "input_tokens": len(words(prompt_text)),
        "output_tokens": len(tokens),
        "total_tokens": len(words(prompt_text)) + len(tokens),
    }
    ids = (f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}")
    created = int(time.time())
    if body.get("stream"):
        events = stream_response_events(
            engine, ids, created, tokens, status=status, usage=usage, budget=budget
        )
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    text = " ".join(tokens)
    return JSONResponse(
        response_object(engine, ids, created, status=status, text=text, usage=usage, budget=budget)
    )


async def stream_response_events(
    engine: Engine,
    ids: tuple[str, str],
    created: int,
    tokens: list[str],
    *,
    status: str,
    usage: dict[str, int],
    budget: int,
) -> AsyncIterator[str]:
    delay = 1.0 / engine.tokens_per_second if engine.tokens_per_second > 0 else 0.0
    epoch = engine.sleep_epoch
    sequence = itertools.count()
    message_id = ids[1]
    where = {"item_id": message_id, "output_index": 0, "content_index": 0}

    def event(kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": next(sequence), **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def cut() -> bool:
        return engine.stopping or engine.sleep_epoch != epoch

    def response(state: str, text: str | None, used: dict[str, int] | None) -> dict[str, Any]:
        return response_object(
            engine, ids, created, status=state, text=text, usage=used, budget=budget
        )

    yield event("response.created", response=response("in_progress", None, None))
    yield event("response.in_progress", response=response("in_progress", None, None))
    item = message_item(message_id, None, "in_progress")
    yield event("response.output_item.added", output_index=0, item=item)
    yield event("response.content_part.added", **where, part=text_part(""))
    for i, token in enumerate(tokens):
        if i and delay:
            await pause(delay, cut)
        if cut():
            return  # as the chat stream: cut short on shutdown or sleep
        # Leading spaces make the concatenated deltas equal the whole text.
        yield event("response.output_text.delta", **where, delta=token if i == 0 else f" {token}")
    text = " ".join(tokens)
    yield event("response.output_text.done", **where, text=text)
    yield event("response.content_part.done", **where, part=text_part(text))
    item = message_item(message_id, text, "completed")
    yield event("response.output_item.done", output_index=0, item=item)
    yield event(f"response.{status}", response=response(status, text, usage))


async def pause(seconds: float, stop: Callable[[], bool]) -> None:
    # Polled in short slices, not an asyncio.Event: engine.stopping is set from a signal
    # handler, where touching the event loop is unsafe.
    end = time.monotonic() + seconds
    while not stop() and (left := end - time.monotonic()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(min(left, 0.05))


async def chat_completions(request: Request) -> Response:
    return await generate(request, chat=True)


async def completions(request: Request) -> Response:
    return await generate(request, chat=False)


async def embeddings(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    body = await read_body(request, engine)
    if isinstance(body, Response):
        return body
    raw = body.get("input", "")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs):
        return error(400, "input must be a string or a list of strings.", "invalid_value")
    data = [
        {"object": "embedding", "index": i, "embedding": embed(text)}
        for i, text in enumerate(inputs)
    ]
    count = sum(len(words(s)) for s in inputs)
    usage = {"prompt_tokens": count, "total_tokens": count}
    return JSONResponse({"object": "list", "data": data, "model": engine.model, "usage": usage})


async def health(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    if engine.crashed:
        return JSONResponse({"status": "error"}, status_code=500)
    if engine.loaded:
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "loading"}, status_code=503)


async def models(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    card = {
        "id": engine.model,
        "object": "model",
        "created": engine.created,
        "owned_by": OWNER,
        "max_model_len": engine.max_model_len,  # as vLLM lists it
    }
    return JSONResponse({"object": "list", "data": [card]})


async def props(request: Request) -> Response:
    """llama.cpp's `GET /props`: the context size it runs with, among much else."""
    engine: Engine = request.app.state.engine
    settings = {"n_ctx": engine.max_model_len, "params": {}}
    return JSONResponse(
        {"model_alias": engine.model, "default_generation_settings": settings, "is_sleeping": False}
    )


def tag_list(tags: set[str] | list[str]) -> list[str]:
    return [tag for tag in SLEEP_TAGS if tag in tags]


async def sleep(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    raw = request.query_params.get("level", "1")
    try:
        level = int(raw)
    except ValueError:
        level = 0
    if level not in SLEEP_LEVELS:
        return error(400, f"level must be 1 or 2, not {raw!r}.", "invalid_value")
    mode = request.query_params.get("mode", "abort")
    if mode not in SLEEP_MODES:
        return error(400, f"mode must be abort, wait or keep, not {mode!r}.", "invalid_value")
    engine.sleep_modes.append(mode)
    async with engine.sleep_lock:
        if not engine.loaded:
            message = f"Model {engine.model} is still loading."
            return error(503, message, "model_loading", "server_error")
        if engine.sleeping:
            log("WARNING Executor is already sleeping.")
            return Response(status_code=200)
        log(f"INFO Putting the engine to sleep (level {level})")
        log(f"INFO Sleep mode: {mode}")  # which one the caller asked for, for tests to read
        started = time.monotonic()
        engine.falling_asleep = True
        engine.sleep_epoch += 1
        try:
            await pause(engine.sleep_seconds, lambda: engine.stopping)
            if engine.fail_sleep:
                log("ERROR RuntimeError: Failed to offload weights to CPU (--fail-sleep)")
                log("ERROR Failed to put the engine to sleep; it stays awake.")
                message = "Failed to put the engine to sleep (--fail-sleep)."
                return error(500, message, "sleep_failed", "server_error")
            # As with loading, the state turns only after the line that explains it.
            log(f"INFO It took {time.monotonic() - started:.2f} seconds to fall asleep.")
            engine.sleeping = set(SLEEP_TAGS)
            engine.sleep_level = level
            if engine.crash_in_sleep:
                log("ERROR EngineDeadError: the engine core died while falling asleep")
                engine.crashed = True
            if level == 2:
                engine.weights_loaded = False
        finally:
            engine.falling_asleep = False
        return Response(status_code=200)


async def wake_up(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    asked = request.query_params.getlist("tags")
    unknown = [tag for tag in asked if tag not in SLEEP_TAGS]
    if unknown:
        # vLLM ignores an unknown tag; the demo names the mistake instead.
        message = f"Unknown tags {unknown}; tags are {list(SLEEP_TAGS)}."
        return error(400, message, "invalid_value")
    async with engine.sleep_lock:
        if not engine.sleeping:
            log("WARNING Executor is not sleeping.")
            return Response(status_code=200)
        tags = tag_list(engine.sleeping & set(asked)) if asked else tag_list(engine.sleeping)
        if not tags:
            log(f"WARNING Tags {asked} are not in sleeping tags {tag_list(engine.sleeping)}.")
            return Response(status_code=200)
        log(f"INFO Waking up the engine (tags: {', '.join(tags)})")
        started = time.monotonic()
        await pause(engine.wake_seconds, lambda: engine.stopping)
        if engine.fail_wake:
            log("ERROR RuntimeError: CUDA error: out of memory (--fail-wake)")
            log("ERROR Failed to wake up the engine; it stays asleep.")
            message = "Failed to wake up the engine (--fail-wake)."
            return error(500, message, "wake_up_failed", "server_error")
        log(f"INFO It took {time.monotonic() - started:.2f} seconds to wake up tags {tags}.")
        engine.sleeping -= set(tags)
        return Response(status_code=200)


async def is_sleeping(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    return JSONResponse({"is_sleeping": bool(engine.sleeping)})


async def collective_rpc(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return error(400, "Request body is not valid JSON.", "invalid_json")
    if not isinstance(body, dict):
        return error(400, "Request body must be a JSON object.", "invalid_json")
    method = body.get("method")
    if method is None:
        return error(400, "Missing 'method' in request body.", "invalid_value")
    if method != "reload_weights":
        message = f"The demo engine only knows the method reload_weights, not {method!r}."
        return error(400, message, "invalid_value")
    async with engine.sleep_lock:
        if not engine.loaded:
            message = f"Model {engine.model} is still loading."
            return error(503, message, "model_loading", "server_error")
        if "weights" in engine.sleeping:
            message = "The weights are asleep; POST /wake_up?tags=weights first."
            return error(503, message, "engine_sleeping", "server_error")
        log(f"INFO Reloading weights for {engine.model}")
        started = time.monotonic()
        await pause(engine.reload_seconds, lambda: engine.stopping)
        log(f"INFO Reloaded weights in {time.monotonic() - started:.2f} s")
        engine.weights_loaded = True
        # vLLM answers each worker's return value; reload_weights returns None.
        return JSONResponse({"results": [None]})


def create_app(engine: Engine) -> Starlette:
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/props", props, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ]
    if engine.sleep_mode:
        routes += [
            Route("/sleep", sleep, methods=["POST"]),
            Route("/wake_up", wake_up, methods=["POST"]),
            Route("/is_sleeping", is_sleeping, methods=["GET"]),
            Route("/collective_rpc", collective_rpc, methods=["POST"]),
        ]
    app = Starlette(routes=routes)
    app.state.engine = engine
    return app


async def load(engine: Engine, seconds: float) -> None:
    started = time.monotonic()
    lines = [f"INFO Loading model weights for {engine.model}"]
    lines += [f"INFO Loading safetensors checkpoint shards: {i}/4" for i in range(1, 5)]
    lines += ["INFO Memory profiling: KV cache reserved", "INFO Capturing CUDA graphs"]
    gap = max(seconds, 0.0) / len(lines)
    for line in lines:
        log(line)
        await asyncio.sleep(gap)
    # Health turns 200 only after the last line is out, so a supervisor never sees
    # "ready" ahead of the log that explains it.
    log(f"INFO Model {engine.model} loaded in {time.monotonic() - started:.2f}s")
    engine.loaded = True


async def crash(seconds: float) -> None:
    await asyncio.sleep(seconds)
    log("ERROR torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    log("ERROR RuntimeError: Engine core initialization failed. See root cause above.")
    log("ERROR Engine core initialization failed")
    # Exit hard, as a crashed engine would: no graceful shutdown, no cleanup.
    os._exit(1)


class EngineServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Open streams watch this flag so they end at once instead of holding the
        # process until uvicorn's graceful-shutdown timeout.
        self.engine.stopping = True
        super().handle_exit(sig, frame)


async def serve(server: EngineServer, args: argparse.Namespace) -> None:
    engine = server.engine
    tasks = [asyncio.create_task(load(engine, args.load_seconds))]
    if args.fail_after is not None:
        tasks.append(asyncio.create_task(crash(args.fail_after)))
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    log(f"INFO Shutting down {engine.model}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m switchd.demo.engine", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--load-seconds", type=float, default=3.0)
    parser.add_argument("--tokens-per-second", type=float, default=50.0)
    parser.add_argument("--fail-after", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--max-model-len", type=int, default=DEFAULT_MAX_MODEL_LEN)
    sleep_mode = parser.add_argument_group("sleep mode (vLLM's /sleep, /wake_up API)")
    sleep_mode.add_argument("--enable-sleep-mode", action="store_true")
    sleep_mode.add_argument("--sleep-seconds", type=float, default=0.2)
    sleep_mode.add_argument("--wake-seconds", type=float, default=0.3)
    sleep_mode.add_argument("--reload-seconds", type=float, default=1.0)
    sleep_mode.add_argument(
        "--fail-sleep", action="store_true", help="/sleep answers 500; the engine stays awake"
    )
    sleep_mode.add_argument(
        "--crash-in-sleep",
        action="store_true",
        help="/sleep answers 200, then /health answers 500 (vLLM #45520)",
    )
    sleep_mode.add_argument(
        "--fail-wake", action="store_true", help="/wake_up answers 500; the engine stays asleep"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = Engine(args.model, args.tokens_per_second)
    engine.sleep_mode = args.enable_sleep_mode
    engine.max_model_len = args.max_model_len
    engine.sleep_seconds = args.sleep_seconds
    engine.wake_seconds = args.wake_seconds
    engine.reload_seconds = args.reload_seconds
    engine.fail_sleep = args.fail_sleep
    engine.crash_in_sleep = args.crash_in_sleep
    engine.fail_wake = args.fail_wake
    config = uvicorn.Config(
        create_app(engine),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    server = EngineServer(config, engine)
    # Installed before and restored after uvicorn's own handlers: a signal that comes
    # before uvicorn listens still stops it, and the signal uvicorn re-raises once shut
    # down lands here instead of killing the process, so SIGTERM exits with status 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.handle_exit)
    asyncio.run(serve(server, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
