"""The client commands' pieces: SSE parsing, progress bars, and output against a mock server."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from switchd.client import (
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    Client,
    ClientError,
    ServerEvent,
    SseParser,
    follow_job,
    parse_sse,
    parse_url,
    progress_bar,
    run_client,
    show_status,
)

BASE = "http://switchd.test"
Handler = Callable[[httpx.Request], httpx.Response]


def mock_client(handler: Handler, key: str | None = None) -> Client:
    """A Client as the commands make it, its HTTP answered by `handler`."""
    client = Client(BASE + "/", key)
    real = client._http
    client._http = httpx.Client(
        transport=httpx.MockTransport(handler), base_url=real.base_url, headers=real.headers
    )
    real.close()
    return client


def sse(*events: tuple[str, dict[str, Any]]) -> str:
    """A stream as the server writes it: numbered events, the first with the retry
    hint, then a ping."""
    parts = []
    for seq, (name, data) in enumerate(events, start=1):
        retry = "retry: 3000\n" if seq == 1 else ""
        parts.append(f"event: {name}\nid: {seq}\ndata: {json.dumps(data)}\n{retry}\n")
    parts.insert(1, ": ping - 2024-01-01 00:00:00.000000\n\n")
    return "".join(parts)


def stage(name: str, progress: float, message: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return name, {"stage": name, "progress": progress, "message": message, **extra}


def stream_response(text: str) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, text=text)


class TtyOutput(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---- SSE ---------------------------------------------------------------------------------

HAND_WRITTEN = [
    "retry: 3000",
    "",
    ": ping - 2024-05-01 10:00:00.000000",
    "",
    "event: memory_check",
    "id: 7",
    'data: {"progress": 0.05,',
    'data:  "message": "enough memory"}',
    "",
    ":a comment between events",
    "event: loading",
    ": a comment inside an event",
    'data:{"progress": 0.5, "url": "http://engine:8000"}',
    "retry: 1000",
    "",
    "id: 9",
    'data: {"n": 1}',
    "",
    "event: no-data-so-no-event",
    "id: 10",
    "",
    'data: {"after": true}',
    "",
    "",
    "unknown: field",
    "event: dangling",
    'data: {"never": "dispatched"}',
]


def test_parse_sse_on_a_hand_written_stream() -> None:
    assert list(parse_sse(iter(HAND_WRITTEN))) == [
        ServerEvent("memory_check", "7", {"progress": 0.05, "message": "enough memory"}),
        ServerEvent("loading", None, {"progress": 0.5, "url": "http://engine:8000"}),
        ServerEvent("message", "9", {"n": 1}),
        # The name and id of a block without data do not carry over.
        ServerEvent("message", None, {"after": True}),
    ]


def test_sse_parser_completes_an_event_only_at_the_blank_line() -> None:
    parser = SseParser()
    assert parser.feed("event: ready") is None
    assert parser.feed("id: 12") is None
    assert parser.feed('data: {"progress": 1.0}') is None
    assert parser.feed("") == ServerEvent("ready", "12", {"progress": 1.0})
    assert parser.feed("") is None  # a second blank line dispatches nothing
    assert parser.feed(": ping") is None
    assert parser.feed("retry: 5") is None
    assert parser.feed("") is None
    assert parser.feed("data: [1, 2]") is None
    assert parser.feed("") == ServerEvent("message", None, [1, 2])  # type: ignore[arg-type]


def test_sse_parser_keeps_spaces_after_the_first() -> None:
    parser = SseParser()
    parser.feed("event:  spaced")
    parser.feed('data:   "text"')
    assert parser.feed("") == ServerEvent(" spaced", None, "text")  # type: ignore[arg-type]


# ---- progress bar ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fraction", "bar"),
    [
        (0.0, "[........................]   0%"),
        (0.5, "[############............]  50%"),
        (1.0, "[########################] 100%"),
        (0.3, "[#######.................]  30%"),
    ],
)
def test_progress_bar(fraction: float, bar: str) -> None:
    assert progress_bar(fraction) == bar


# ---- follow_job ----------------------------------------------------------------------------

SWITCH_EVENTS = [
    stage("memory_check", 0.05, "alpha needs 30.00 GB; 95.59 GB free"),
    stage("start", 0.3, "Started alpha; loading takes about 1 s", pid=4242),
    stage("loading", 0.5, "Loading alpha: 0.5 s of about 1 s"),
    ("log", {"stage": "loading", "progress": 0.5, "message": "", "line": "INFO weights"}),
    stage("loading", 0.75, "Loading alpha: 0.8 s of about 1 s"),
    stage("ready", 1.0, "alpha is ready after 1.0 s"),
    stage("result", 1.0, "Model 'alpha' is ready", status="success"),
    stage("memory_check", 0.05, "an event after the result is not shown"),
]
SWITCH_LINES = [
    "[#.......................]   5%  memory_check alpha needs 30.00 GB; 95.59 GB free",
    "[#######.................]  30%  start        Started alpha; loading takes about 1 s",
    "[############............]  50%  loading      Loading alpha: 0.5 s of about 1 s",
    "    | INFO weights",
    "[##################......]  75%  loading      Loading alpha: 0.8 s of about 1 s",
    "[########################] 100%  ready        alpha is ready after 1.0 s",
    "[########################] 100%  result       Model 'alpha' is ready",
]


def test_follow_job_prints_each_stage_and_returns_0_on_result() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return stream_response(sse(*SWITCH_EVENTS))

    client = mock_client(handler, key="k1")
    out = io.StringIO()
    assert follow_job(client, "/v1/models/switch", {"target_model": "alpha"}, out) == 0
    assert out.getvalue() == "".join(line + "\n" for line in SWITCH_LINES)
    [request] = requests
    assert request.method == "POST"
    assert request.url == httpx.URL(f"{BASE}/v1/models/switch?target_model=alpha")
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["authorization"] == "Bearer k1"
    client.close()


def test_follow_job_on_a_terminal_overwrites_loading_lines() -> None:
    client = mock_client(lambda request: stream_response(sse(*SWITCH_EVENTS)))
    out = TtyOutput()
    assert follow_job(client, "/v1/models/switch", {"target_model": "alpha"}, out) == 0
    clear = "\r\x1b[2K"
    assert out.getvalue() == (
        SWITCH_LINES[0] + "\n" + SWITCH_LINES[1] + "\n"
        + SWITCH_LINES[2]
        + clear + SWITCH_LINES[3] + "\n"
        + SWITCH_LINES[4]
        + clear + SWITCH_LINES[5] + "\n"
        + SWITCH_LINES[6] + "\n"
    )  # fmt: skip
    client.close()


def test_follow_job_returns_1_on_an_error_event() -> None:
    events = [
        stage("memory_check", 0.05, "alpha needs 30.00 GB; 95.59 GB free"),
        stage("start", 0.3, "Started alpha"),
        stage("error", 0.3, "alpha exited with code 1 while loading", error="engine_exited"),
        stage("result", 1.0, "never reached"),
    ]
    client = mock_client(lambda request: stream_response(sse(*events)))
    out = io.StringIO()
    assert follow_job(client, "/v1/models/switch", {"target_model": "alpha"}, out) == EXIT_FAILED
    assert out.getvalue().splitlines() == [
        "[#.......................]   5%  memory_check alpha needs 30.00 GB; 95.59 GB free",
        "[#######.................]  30%  start        Started alpha",
        "[#######.................]  30%  error        alpha exited with code 1 while loading",
    ]
    client.close()


MAKING_ROOM = [
    stage(
        "memory_check",
        0.05,
        "gpt-oss-20b needs 24.00 GB, 15.59 GB free: sleeping gpt-oss-120b (level 1): wakes "
        "in ~0.82 s instead of a 8.15 s load; unloading mistral-7b",
        to_unload=["gpt-oss-120b", "mistral-7b"],
        to_sleep=["gpt-oss-120b"],
    ),
    stage(
        "sleep",
        0.05,
        "Sleeping gpt-oss-120b (level 1): wakes in ~0.82 s instead of a 8.15 s load",
    ),
    stage("unload", 0.05, "Unloading mistral-7b"),
    stage("result", 1.0, "Model 'gpt-oss-20b' is ready"),
]


def test_a_memory_check_leaves_each_models_plan_to_its_own_stage_line() -> None:
    client = mock_client(lambda request: stream_response(sse(*MAKING_ROOM)))
    out = io.StringIO()
    assert follow_job(client, "/v1/models/switch", {"target_model": "20b"}, out) == 0
    assert out.getvalue().splitlines() == [
        "[#.......................]   5%  memory_check gpt-oss-20b needs 24.00 GB, "
        "15.59 GB free: making room",
        "[#.......................]   5%  sleep        Sleeping gpt-oss-120b (level 1): wakes "
        "in ~0.82 s instead of a 8.15 s load",
        "[#.......................]   5%  unload       Unloading mistral-7b",
        "[########################] 100%  result       Model 'gpt-oss-20b' is ready",
    ]
    client.close()


@pytest.mark.parametrize(
    ("message", "to_unload"),
    [
        ("alpha needs 30.00 GB, 95.59 GB free: it fits", []),
        ("alpha needs 90.00 GB, 5.59 GB free: not enough even after unloading every model", []),
        ("alpha needs 30.00 GB; worded otherwise: unloading beta", ["beta"]),
    ],
    ids=["fits", "never-fits", "other-wording"],
)
def test_a_memory_check_without_a_plan_to_repeat_is_shown_whole(
    message: str, to_unload: list[str]
) -> None:
    events = [stage("memory_check", 0.05, message, to_unload=to_unload), stage("result", 1, "")]
    client = mock_client(lambda request: stream_response(sse(*events)))
    out = io.StringIO()
    assert follow_job(client, "/v1/models/switch", {"target_model": "alpha"}, out) == 0
    assert (
        out.getvalue().splitlines()[0] == f"[#.......................]   5%  memory_check {message}"
    )
    client.close()


def test_follow_job_unload_posts_the_model() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return stream_response(sse(stage("result", 1.0, "Unloaded alpha")))

    client = mock_client(handler)
    out = io.StringIO()
    assert follow_job(client, "/v1/models/unload", {"model": "alpha"}, out) == 0
    assert out.getvalue() == "[########################] 100%  result       Unloaded alpha\n"
    assert requests[0].url == httpx.URL(f"{BASE}/v1/models/unload?model=alpha")
    assert "authorization" not in requests[0].headers
    client.close()


def test_a_stream_ending_before_the_result_is_an_error() -> None:
    client = mock_client(lambda request: stream_response(sse(stage("start", 0.3, "Started"))))
    out = io.StringIO()
    with pytest.raises(ClientError, match="ended before the switch did") as caught:
        follow_job(client, "/v1/models/switch", {"target_model": "alpha"}, out)
    assert caught.value.exit_code == EXIT_UNREACHABLE
    assert out.getvalue() == "[#######.................]  30%  start        Started\n"
    client.close()


def test_a_stream_broken_midway_reports_cannot_reach() -> None:
    class Broken(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield sse(stage("start", 0.3, "Started")).encode()
            raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Broken())

    client = mock_client(handler)
    out = io.StringIO()
    with pytest.raises(ClientError) as caught:
        follow_job(client, "/v1/models/switch", {"target_model": "alpha"}, out)
    assert str(caught.value) == f"cannot reach switchd at {BASE}: connection reset"
    assert caught.value.exit_code == EXIT_UNREACHABLE
    assert out.getvalue() == "[#######.................]  30%  start        Started\n"
    client.close()


# ---- HTTP errors -----------------------------------------------------------------------------


def call_switch(client: Client) -> int:
    return follow_job(client, "/v1/models/switch", {"target_model": "nope"}, io.StringIO())


def call_status(client: Client) -> int:
    return show_status(client, io.StringIO())


COMMANDS = pytest.mark.parametrize("call", [call_switch, call_status], ids=["switch", "status"])


@COMMANDS
def test_401_asks_for_a_key_with_exit_code_2(call: Callable[[Client], int]) -> None:
    unauthorized = {"error": {"message": "Missing or invalid API key", "type": "auth"}}
    client = mock_client(lambda request: httpx.Response(401, json=unauthorized), key="wrong")
    with pytest.raises(ClientError) as caught:
        call(client)
    assert caught.value.exit_code == EXIT_UNREACHABLE == 2
    assert str(caught.value) == (
        f"{BASE} refused the API key (401): pass --key or set SWITCHD_API_KEY"
    )
    client.close()


@COMMANDS
@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (
            404,
            {"status": "error", "error": "unknown_model", "message": "Unknown model 'nope'"},
            "Unknown model 'nope' (HTTP 404)",
        ),
        (
            400,
            {"error": {"message": "model is required", "type": "invalid_request_error"}},
            "model is required (HTTP 400)",
        ),
        (502, "Bad Gateway", "Bad Gateway (HTTP 502)"),
        (409, {"status": "error", "error": "insufficient_memory"}, None),
    ],
    ids=["switchd-shape", "openai-shape", "not-json", "no-message"],
)
def test_an_http_error_surfaces_the_server_message(
    call: Callable[[Client], int], status: int, body: Any, message: str | None
) -> None:
    text = body if isinstance(body, str) else json.dumps(body)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, text=text, headers={"content-type": "application/json"})

    client = mock_client(handler)
    with pytest.raises(ClientError) as caught:
        call(client)
    assert caught.value.exit_code == EXIT_FAILED == 1
    assert str(caught.value) == (message or f"{text} (HTTP {status})")
    client.close()


@COMMANDS
def test_an_unreachable_server_is_exit_code_2(call: Callable[[Client], int]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    client = mock_client(handler)
    with pytest.raises(ClientError) as caught:
        call(client)
    assert caught.value.exit_code == EXIT_UNREACHABLE
    assert str(caught.value) == (f"cannot reach switchd at {BASE}: [Errno 111] Connection refused")
    client.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


@pytest.mark.parametrize(
    ("command", "model"), [("status", None), ("switch", "alpha"), ("unload", "alpha")]
)
def test_run_client_against_a_closed_port(
    capsys: pytest.CaptureFixture[str], command: str, model: str | None
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert run_client(command, url, None, model) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"switchd: cannot reach switchd at {url}: ")
    assert captured.err.count("\n") == 1


# ---- the address -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://gpu-box.example:8443/", "https://gpu-box.example:8443"),
        ("http://gpu-box/switchd/", "http://gpu-box/switchd"),
        ("127.0.0.1:8080", "http://127.0.0.1:8080"),  # the form --listen takes
        ("localhost:9000", "http://localhost:9000"),
        ("[::1]:8080", "http://[::1]:8080"),
        (" 10.0.0.5:80 ", "http://10.0.0.5:80"),
    ],
)
def test_parse_url_takes_a_url_or_host_port(given: str, url: str) -> None:
    assert parse_url("--url", given) == url


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("http://x:abc", "invalid port: 'abc'"),
        ("x:abc", "invalid port: 'abc'"),
        ("http://h:99999", "port 99999 is not in 1-65535"),
        ("h:0", "port 0 is not in 1-65535"),
        ("::1:8080", "an IPv6 address goes in brackets"),
        ("http://[::1", "invalid port: ':1'"),
        ("ftp://h:21", "switchd speaks http or https, not ftp"),
        ("http://", "it names no host"),
        ("", "it names no host"),
        ("gpu box:80", "it has a space"),
    ],
)
def test_parse_url_refuses_a_bad_address_in_one_line(given: str, problem: str) -> None:
    with pytest.raises(ClientError) as caught:
        parse_url("SWITCHD_URL", given)
    assert caught.value.exit_code == EXIT_UNREACHABLE == 2
    assert str(caught.value) == (
        f"bad SWITCHD_URL {given!r}: {problem}; give http://HOST:PORT, https://HOST:PORT "
        "or HOST:PORT ([::1]:PORT for IPv6)"
    )


@pytest.mark.parametrize("command", ["status", "switch", "unload"])
def test_run_client_with_a_bad_url_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    assert run_client(command, "http://x:abc", None, "alpha") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "switchd: bad --url 'http://x:abc': invalid port: 'abc'; give http://HOST:PORT, "
        "https://HOST:PORT or HOST:PORT ([::1]:PORT for IPv6)\n"
    )


def test_run_client_reads_host_port_as_http(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    assert run_client("status", f"127.0.0.1:{port}", None, None, "SWITCHD_URL") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"switchd: cannot reach switchd at http://127.0.0.1:{port}: ")


# ---- show_status --------------------------------------------------------------------------


def model(status: str, size: float, load: float, **extra: Any) -> dict[str, Any]:
    return {
        "status": status,
        "size_gb": size,
        "estimated_load_time_seconds": load,
        "pinned": False,
        "in_flight": 0,
        **extra,
    }


STATUS: dict[str, Any] = {
    "models": {
        "gpt-oss-120b": model("running", 80.0, 61, in_flight=2, health="healthy"),
        "gpt-oss-20b": model("exited", 24.0, 15.5, pinned=True),
        "mistral-7b": model(
            "failed",
            18.0,
            30,
            error="mistral-7b exited with code 1 while loading:\n"
            "ERROR torch.OutOfMemoryError: CUDA out of memory.\n"
            "ERROR Engine core initialization failed",
        ),
    },
    "gpu": {"used_gb": 80.0, "total_gb": 95.59, "available_gb": 15.59, "source": "simulated"},
    "switch": None,
}
STATUS_LINES = [
    "GPU (simulated): 80.00 of 95.59 GB used, 15.59 GB free",
    "MODEL         STATUS   SIZE GB  LOAD S  IN FLIGHT",
    "gpt-oss-120b  running  80       61      2",
    "gpt-oss-20b   exited   24       15.5    0          pinned",
    "mistral-7b    failed   18       30      0          "
    "mistral-7b exited with code 1 while loading:",
    "    | ERROR torch.OutOfMemoryError: CUDA out of memory.",
    "    | ERROR Engine core initialization failed",
]


def test_show_status_prints_the_gpu_and_a_table() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=STATUS)

    client = mock_client(handler, key="k1")
    out = io.StringIO()
    assert show_status(client, out) == 0
    assert out.getvalue() == "".join(line + "\n" for line in STATUS_LINES)
    [request] = requests
    assert request.method == "GET"
    assert request.url == httpx.URL(f"{BASE}/v1/models/status")
    assert request.headers["authorization"] == "Bearer k1"
    client.close()


def test_show_status_shows_a_running_switch_and_the_loads_beside_it() -> None:
    body = {
        **STATUS,
        "switch": {"id": "j1", "target": "gpt-oss-20b", "stage": "unload", "progress": 0.3},
        "beside": [{"id": "j2", "target": "mistral-7b", "stage": "loading", "progress": 0.5}],
    }
    client = mock_client(lambda request: httpx.Response(200, json=body))
    out = io.StringIO()
    assert show_status(client, out) == 0
    assert out.getvalue().splitlines() == [
        *STATUS_LINES,
        "switching to gpt-oss-20b: unload [#######.................]  30%",
        "loading mistral-7b beside it: loading [############............]  50%",
    ]
    client.close()


def test_show_status_on_a_multi_gpu_host_shows_each_device_and_each_models_devices() -> None:
    def device(index: int, used: float) -> dict[str, Any]:
        return {
            "index": index,
            "name": "Simulated GPU",
            "used_gb": used,
            "total_gb": 47.79,
            "available_gb": round(47.79 - used, 2),
        }

    body = {
        "models": {
            "gpt-oss-120b": model("running", 80.0, 8, gpus=[0, 1], devices=[0, 1]),
            "gpt-oss-20b": model("loading", 24.0, 3, gpus="all", devices=[1]),
            "mistral-7b": model("exited", 18.0, 2, gpus="all", devices=None),
            "pinned-7b": model("exited", 18.0, 2, gpus=[1], devices=None),
        },
        "gpu": {
            "used_gb": 104.0,
            "total_gb": 95.58,
            "available_gb": 0.0,
            "source": "simulated",
            "devices": [device(0, 40.0), device(1, 47.0)],
        },
        "switch": None,
    }
    client = mock_client(lambda request: httpx.Response(200, json=body))
    out = io.StringIO()
    assert show_status(client, out) == 0
    assert out.getvalue().splitlines() == [
        "GPU (simulated): 104.00 of 95.58 GB used, 0.00 GB free",
        "  GPU 0: 40.00 of 47.79 GB used, 7.79 GB free",
        "  GPU 1: 47.00 of 47.79 GB used, 0.79 GB free",
        "MODEL         STATUS   SIZE GB  LOAD S  IN FLIGHT  GPUS",
        "gpt-oss-120b  running  80       8       0          0,1",
        "gpt-oss-20b   loading  24       3       0          1",
        "mistral-7b    exited   18       2       0          -",
        "pinned-7b     exited   18       2       0          1",
    ]
    client.close()


def test_show_status_on_one_gpu_has_no_devices_column() -> None:
    one = {"index": 0, "name": "H200", "used_gb": 80.0, "total_gb": 95.59, "available_gb": 15.59}
    body = {**STATUS, "gpu": {**STATUS["gpu"], "devices": [one]}}
    client = mock_client(lambda request: httpx.Response(200, json=body))
    out = io.StringIO()
    assert show_status(client, out) == 0
    assert out.getvalue().splitlines() == STATUS_LINES
    client.close()
