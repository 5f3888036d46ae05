"""OpenAI stream pieces: where an SSE event ends, error events, progress chunks, ids.

Bytes in, bytes out: what the proxy and the in-stream progress send inside an
OpenAI-compatible `text/event-stream` answer.
"""

from __future__ import annotations

import json
from typing import Any

from switchd.errors import SERVER_ERROR, openai_event


def event_boundary(buffer: bytes) -> int:
    """Where the last complete Server-Sent Event in `buffer` ends (0: none yet)."""
    return max(
        buffer.rfind(b"\n\n") + 2 if b"\n\n" in buffer else 0,
        buffer.rfind(b"\r\n\r\n") + 4 if b"\r\n\r\n" in buffer else 0,
    )


class WholeEvents:
    """Pieces of an event stream in, whole events out: an engine dying mid-event
    leaves no half event behind."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, piece: bytes) -> bytes:
        """The whole events that `piece` completes (b"": none yet)."""
        if not self._pending and piece.endswith(b"\n\n"):  # whole ones: most pieces
            return piece
        self._pending += piece
        end = event_boundary(self._pending)
        whole, self._pending = self._pending[:end], self._pending[end:]
        return whole


def error_event(message: str, code: str, kind: str = SERVER_ERROR) -> bytes:
    """An OpenAI-shaped error as one stream event (the SDKs raise it as an APIError)."""
    return openai_event(message, code, kind)


def cut_short_event(model: str) -> bytes:
    """What a stream cut by its engine's death ends with."""
    return error_event(
        f"{model} stopped in the middle of this answer; it is incomplete", "engine_died"
    )


def reasoning_chunk(
    chunk_id: str, created: int, model: str, text: str, *, first: bool = False
) -> bytes:
    """A chat completion chunk whose delta carries `text` as reasoning, never content."""
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    delta["reasoning_content"] = text
    chunk = {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def with_id(events: bytes, chunk_id: str) -> bytes:
    """Complete SSE events with the `id` of each JSON chunk set to `chunk_id`; every
    other line (comments, `[DONE]`, data that is not a JSON object) as it was."""
    lines = events.split(b"\n")
    for index, line in enumerate(lines):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload.startswith(b"{"):
            continue
        try:
            chunk = json.loads(payload)
        except ValueError:
            continue
        if isinstance(chunk, dict) and "id" in chunk and chunk["id"] != chunk_id:
            chunk["id"] = chunk_id
            ending = b"\r" if line.endswith(b"\r") else b""
            lines[index] = b"data: " + json.dumps(chunk).encode() + ending
    return b"\n".join(lines)


def with_response_id(events: bytes, response_id: str) -> bytes:
    """Complete Responses API events with the id of each event's `response` object
    set to `response_id` (its lifecycle events must all name one response, or the
    SDKs refuse the stream); every other line as it was."""
    lines = events.split(b"\n")
    for index, line in enumerate(lines):
        if not line.startswith(b"data:"):
            continue
        try:
            event = json.loads(line[5:].strip())
        except ValueError:
            continue
        response = event.get("response") if isinstance(event, dict) else None
        if isinstance(response, dict) and response.get("id") != response_id:
            response["id"] = response_id
            ending = b"\r" if line.endswith(b"\r") else b""
            lines[index] = b"data: " + json.dumps(event).encode() + ending
    return b"\n".join(lines)
