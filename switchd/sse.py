"""Server-Sent Events on the wire, for every stream switchd writes (a job's, and
`/v1/events`): one event's block, the reconnection hint, the ping, the headers.

Lines end with `\\n` only. The format allows `\\r\\n` too, but a shell that cuts
an id out of the stream (`grep '^id:' | cut -c5-`) then keeps the `\\r`, and the
resume request it sends is refused. No imports of switchd's: the events module
encodes each event here, once for every reader.
"""

from __future__ import annotations

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx in front: do not buffer
]
PING = b": ping\n\n"  # a comment: clients skip it; proxies see the stream alive


def block(event_id: int | None, name: str, data: str) -> bytes:
    """One event as its block: `id`, `event`, `data` (one line: switchd's data is
    compact JSON), and the blank line that ends it."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {data}\n\n".encode()


def comment(text: str) -> bytes:
    """A comment line (`: loading 42%`): every parser skips it, and it keeps a waiting
    client's connection, and the proxies on its way, from timing out."""
    return f": {' '.join(text.split())}\n\n".encode()


def data_only(data: str) -> bytes:
    """One event of `data` alone, as llama.cpp's `/models/sse` and OpenAI streams
    write theirs: an EventSource hands it to `onmessage`."""
    return f"data: {data}\n\n".encode()


def with_retry(blocks: bytes, milliseconds: int) -> bytes:
    """`blocks` with the reconnection delay as the last field of the first block: a
    block of its own would reach httpx-sse and the like as an event with empty data."""
    end = blocks.index(b"\n\n") + 1
    return blocks[:end] + b"retry: %d\n" % milliseconds + blocks[end:]
