"""`switchd` main(argv): serve's refusals in-process, and real servers with client subprocesses."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml

from switchd import __version__
from switchd.cli import (
    GRACEFUL_SHUTDOWN_SECONDS,
    bind_error,
    demo_settings,
    demo_state,
    is_loopback,
    main,
)
from switchd.config import Settings
from switchd.runtime.process import free_port
from tests.integration.server import Server, engine_cmd, write_config
from tests.processes import gone

ENGINE = "${PYTHON} -m switchd.demo.engine --port ${PORT} --model ${MODEL} --load-seconds 0.3"
MODELS: dict[str, Any] = {
    "alpha": {"cmd": ENGINE, "size_gb": 30, "load_time_seconds": 1},
    "beta": {"cmd": engine_cmd(0.3), "size_gb": 30},
}
FULL = "[########################] 100%"
STAGE_LINE = re.compile(r"^\[([#.]{24})\] +(\d+)%  (\S+) +(.*)$")
CLIENT_TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def no_switchd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SWITCHD_API_KEYS", "SWITCHD_API_KEY", "SWITCHD_URL"):
        monkeypatch.delenv(name, raising=False)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def process_config(tmp_path: Path, **settings: Any) -> Path:
    data: dict[str, Any] = {
        "runtime": "process",
        "gpu": "simulated",
        "state_dir": str(tmp_path / "state"),
        "models": MODELS,
        **settings,
    }
    return write_yaml(tmp_path / "switchd.yaml", data)


def wait_gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ---- serve in-process: refusals happen before anything starts ----------------------------


class RecordingServer:
    """Stands in for uvicorn.Server: records what it was given, serves nothing."""

    made: list[RecordingServer] = []  # noqa: RUF012
    starts = True

    def __init__(self, config: uvicorn.Config) -> None:
        self.config = config
        self.started = False
        self.ran = False
        RecordingServer.made.append(self)

    def handle_exit(self, sig: int, frame: object) -> None:
        raise AssertionError("not expected to be called")

    def run(self) -> None:
        self.ran = True
        self.started = RecordingServer.starts


@pytest.fixture
def recording_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[RecordingServer]]:
    """uvicorn.Server replaced; the signal handlers serve() installs are put back."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    RecordingServer.made = []
    RecordingServer.starts = True
    monkeypatch.setattr(uvicorn, "Server", RecordingServer)
    yield RecordingServer
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("serve() went on to start a server")


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """No uvicorn server may be made (create_app's checks still run)."""
    monkeypatch.setattr(uvicorn, "Server", refuse)


@pytest.fixture
def nothing_may_start(monkeypatch: pytest.MonkeyPatch, no_server: None) -> None:
    """Not even the app may be made."""
    monkeypatch.setattr("switchd.cli.create_app", refuse)


@pytest.mark.usefixtures("nothing_may_start")
@pytest.mark.parametrize(
    ("listen", "host"),
    [("0.0.0.0", "0.0.0.0"), ("[::]", "::"), ("192.0.2.10", "192.0.2.10")],
)
def test_serve_refuses_a_public_address_without_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str, host: str
) -> None:
    config = process_config(tmp_path)
    port = free_port()
    assert main(["serve", "--config", str(config), "--listen", f"{listen}:{port}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"switchd: refusing to listen on {host}:{port} without API keys; set api_keys "
        "(or SWITCHD_API_KEYS) or pass --insecure\n"
    )


@pytest.mark.usefixtures("nothing_may_start")
def test_serve_refuses_a_public_listen_from_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = process_config(tmp_path, listen="0.0.0.0:18080")
    assert main(["serve", "--config", str(config)]) == 2
    assert "refusing to listen on 0.0.0.0:18080 without API keys" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "keys", "env_keys"),
    [
        (["--insecure"], None, None),
        ([], ["k1"], None),
        ([], None, "k1,k2"),
    ],
    ids=["insecure", "config-keys", "env-keys"],
)
@pytest.mark.usefixtures("recording_server")
def test_serve_starts_on_a_public_address_when_allowed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: list[str],
    keys: list[str] | None,
    env_keys: str | None,
) -> None:
    config = process_config(tmp_path, **({"api_keys": keys} if keys else {}))
    if env_keys:
        monkeypatch.setenv("SWITCHD_API_KEYS", env_keys)
    port = free_port()
    argv = ["serve", "--config", str(config), "--listen", f"0.0.0.0:{port}", *extra]
    assert main(argv) == 0
    [server] = RecordingServer.made
    assert server.ran
    assert (server.config.host, server.config.port) == ("0.0.0.0", port)
    assert server.config.lifespan == "on"
    assert server.config.timeout_graceful_shutdown == GRACEFUL_SHUTDOWN_SECONDS
    # A SIGTERM lands in uvicorn's own handler, for an orderly exit 0.
    assert signal.getsignal(signal.SIGTERM) == server.handle_exit
    assert signal.getsignal(signal.SIGINT) == server.handle_exit


@pytest.mark.parametrize(
    ("listen", "host"),
    [("127.0.0.1", "127.0.0.1"), ("localhost", "localhost"), ("[::1]", "::1")],
)
def test_serve_on_loopback_needs_no_keys(
    tmp_path: Path, recording_server: type[RecordingServer], listen: str, host: str
) -> None:
    if host == "::1" and bind_error("::1", 0) is not None:
        pytest.skip("this host has no IPv6 loopback")
    config = process_config(tmp_path)
    port = free_port()
    assert main(["serve", "--config", str(config), "--listen", f"{listen}:{port}"]) == 0
    [server] = recording_server.made
    assert (server.config.host, server.config.port) == (host, port)


def test_serve_listens_where_the_config_says(
    tmp_path: Path, recording_server: type[RecordingServer]
) -> None:
    port = free_port()
    config = process_config(tmp_path, listen=f"127.0.0.2:{port}")
    assert main(["serve", "--config", str(config)]) == 0
    [server] = recording_server.made
    assert (server.config.host, server.config.port) == ("127.0.0.2", port)


def test_serve_returns_1_when_the_server_never_started(
    tmp_path: Path, recording_server: type[RecordingServer]
) -> None:
    recording_server.starts = False  # as when the port is taken after switchd tried it
    config = process_config(tmp_path, listen=f"127.0.0.1:{free_port()}")
    assert main(["serve", "--config", str(config)]) == 1


# ---- serve and demo in-process: a busy port, before anything starts ---------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a listening socket holds for the test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def suggested(err: str) -> str:
    """The address a busy-port message suggests: a free one after the busy one."""
    match = re.search(r"--listen (\S+)", err)
    assert match is not None, err
    return match.group(1)


@pytest.mark.usefixtures("nothing_may_start")
def test_demo_on_a_busy_port_exits_2_with_one_line_naming_another_address(
    capsys: pytest.CaptureFixture[str], busy_port: int
) -> None:
    assert main(["demo", "--listen", f"127.0.0.1:{busy_port}"]) == 2
    captured = capsys.readouterr()
    other = suggested(captured.err)
    assert captured.out == ""
    assert captured.err == (
        f"switchd: 127.0.0.1:{busy_port} is already in use; pick another address: "
        f"switchd demo --listen {other} (make demo LISTEN={other})\n"
    )
    host, _, port = other.rpartition(":")
    assert host == "127.0.0.1"
    assert busy_port < int(port) <= busy_port + 100
    assert bind_error(host, int(port)) is None


@pytest.mark.usefixtures("nothing_may_start")
def test_serve_on_a_busy_port_names_its_config_in_the_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], busy_port: int
) -> None:
    config = process_config(tmp_path, listen=f"127.0.0.1:{busy_port}")
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    other = suggested(err)
    assert err == (
        f"switchd: 127.0.0.1:{busy_port} is already in use; pick another address: "
        f"switchd serve --config {config} --listen {other}\n"
    )


@pytest.mark.usefixtures("nothing_may_start")
def test_serve_on_an_address_this_host_lacks_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = process_config(tmp_path, api_keys=["k1"])
    port = free_port()
    assert main(["serve", "--config", str(config), "--listen", f"192.0.2.10:{port}"]) == 2
    assert capsys.readouterr().err == (
        f"switchd: cannot listen on 192.0.2.10:{port}: Cannot assign requested address\n"
    )


def test_bind_error_sees_a_busy_port_and_lets_a_free_one_be(busy_port: int) -> None:
    error = bind_error("127.0.0.1", busy_port)
    assert error is not None
    assert error.errno == errno.EADDRINUSE
    assert bind_error("127.0.0.1", free_port()) is None


def test_demo_on_a_busy_port_prints_nothing_else_and_starts_nothing(busy_port: int) -> None:
    """The real command: its only output is the one line, before any start-up banner."""
    done = switchd("demo", "--listen", f"127.0.0.1:{busy_port}")
    assert done.returncode == 2
    assert done.stdout == ""
    other = suggested(done.stderr)
    assert done.stderr == (
        f"switchd: 127.0.0.1:{busy_port} is already in use; pick another address: "
        f"switchd demo --listen {other} (make demo LISTEN={other})\n"
    )


# ---- demo: a state directory of its own per run ------------------------------------------


def test_each_demo_run_gets_a_fresh_state_dir_removed_at_exit() -> None:
    with demo_state(None) as first, demo_state(None) as second:
        assert first != second
        assert first.is_dir()
        assert second.is_dir()
        assert list(first.iterdir()) == []
        assert demo_settings(1, first).state_dir == first
        assert demo_settings(2, second).state_dir == second
    assert not first.exists()
    assert not second.exists()


def test_demo_state_dir_given_is_kept(tmp_path: Path) -> None:
    given = tmp_path / "kept"
    with demo_state(str(given)) as state_dir:
        assert state_dir == given
        given.mkdir()
        (given / "learned.json").write_text("{}")
    assert (given / "learned.json").exists()


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Settings, str | None]]:
    """serve() replaced: the settings and start-up line of each call, and whether
    the state directory existed while it served."""
    calls: list[tuple[Settings, str | None]] = []

    def fake_serve(
        settings: Settings,
        listen: str | None,
        insecure: bool,
        log_level: str,
        *,
        elsewhere: str = "",
        startup: str | None = None,
        log_format: str | None = None,
    ) -> int:
        assert settings.state_dir.is_dir()
        calls.append((settings, startup))
        return 0

    monkeypatch.setattr("switchd.cli.serve", fake_serve)
    return calls


def test_demo_serves_each_run_from_its_own_state_dir_and_says_where(
    tmp_path: Path, served: list[tuple[Settings, str | None]]
) -> None:
    assert main(["demo"]) == 0
    assert main(["demo", "--gpus", "2"]) == 0
    given = tmp_path / "state"
    given.mkdir()
    assert main(["demo", "--state-dir", str(given)]) == 0
    (first, first_line), (second, _), (kept, kept_line) = served
    assert first.state_dir != second.state_dir
    assert not first.state_dir.exists()
    assert not second.state_dir.exists()
    assert first_line == (
        f"demo state (learned load times) in {first.state_dir}, fresh for this run, "
        "removed at exit (--state-dir DIR keeps it)"
    )
    assert kept.state_dir == given
    assert given.is_dir()
    assert kept_line == f"demo state (learned load times) in {given}"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# ---- serve in-process: bad configuration ------------------------------------------------


@pytest.mark.usefixtures("nothing_may_start")
@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            {"runtime": "process", "models": {"x": {"cmd": "engine", "size_gb": "big"}}},
            "models.x.size_gb: must be a number, got 'big'",
        ),
        (
            {"runtime": "process", "models": {"x": {"cmd": "engine", "size_gb": -1}}},
            "models.x.size_gb: must be >= 0, got -1",
        ),
        (
            {"runtime": "process", "models": {"x": {"cmd": "engine"}}},
            "models.x.size_gb: is required (a number)",
        ),
        (
            {"listen": "nowhere", "models": {"x": {"cmd": "engine", "size_gb": 1}}},
            "listen: must be HOST:PORT, got 'nowhere'",
        ),
    ],
    ids=["not-a-number", "negative", "missing", "listen"],
)
def test_serve_with_a_bad_config_exits_2_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data: dict[str, Any], problem: str
) -> None:
    config = write_yaml(tmp_path / "bad.yaml", data)
    assert main(["serve", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"switchd: bad configuration: {config}: {problem}\n"


@pytest.mark.usefixtures("nothing_may_start")
def test_serve_with_a_missing_or_unreadable_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    assert main(["serve", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"switchd: bad configuration: {missing}: cannot be read: No such file or directory\n"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("models:\n  x: [unclosed\n")
    assert main(["serve", "--config", str(broken)]) == 2
    assert re.fullmatch(
        rf"switchd: bad configuration: {re.escape(str(broken))}: is not valid YAML at line \d+\n",
        capsys.readouterr().err,
    )


@pytest.mark.usefixtures("no_server")
def test_serve_without_a_docker_daemon_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    socket = tmp_path / "no-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket}")
    data = {"runtime": "docker", "models": {"x": {"container": "vllm-x", "size_gb": 10}}}
    config = write_yaml(tmp_path / "docker.yaml", data)
    assert main(["serve", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"switchd: no Docker daemon answers at unix://{socket}: start it (`dockerd`), or, "
        "with switchd in a container, mount the socket: "
        "-v /var/run/docker.sock:/var/run/docker.sock\n"
    )


@pytest.mark.usefixtures("no_server")
def test_serve_docker_runtime_needs_a_container_or_image_for_every_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {"runtime": "docker", "models": {"x": {"cmd": "engine", "size_gb": 1}}}
    config = write_yaml(tmp_path / "nocontainer.yaml", data)
    assert main(["serve", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"switchd: bad configuration: {config}: models.x: "
        "the docker runtime needs `container` or `image` for every model\n"
    )


@pytest.mark.usefixtures("no_server")
def test_serve_process_runtime_needs_cmd_for_every_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "runtime": "process",
        "models": {"x": {"cmd": "engine", "size_gb": 1}, "y": {"container": "c", "size_gb": 1}},
    }
    config = write_yaml(tmp_path / "nocmd.yaml", data)
    assert main(["serve", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"switchd: bad configuration: {config}: models.y: "
        "the process runtime needs `cmd` for every model\n"
    )


def test_version_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0
    assert capsys.readouterr().out == f"switchd {__version__}\n"
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2
    assert "usage: switchd" in capsys.readouterr().err


def test_client_command_in_process_against_a_closed_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--url", url]) == 2
    assert capsys.readouterr().err.startswith(f"switchd: cannot reach switchd at {url}: ")


BAD_URL_HINT = "give http://HOST:PORT, https://HOST:PORT or HOST:PORT ([::1]:PORT for IPv6)"


@pytest.mark.parametrize("command", [["status"], ["switch", "alpha"], ["unload", "all"]])
def test_a_bad_url_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    assert main([*command, "--url", "http://x:abc"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err == f"switchd: bad --url 'http://x:abc': invalid port: 'abc'; {BAD_URL_HINT}\n"
    )


def test_a_bad_switchd_url_is_named_and_url_wins_over_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWITCHD_URL", "::1:8080")
    assert main(["status"]) == 2
    assert capsys.readouterr().err == (
        f"switchd: bad SWITCHD_URL '::1:8080': an IPv6 address goes in brackets; {BAD_URL_HINT}\n"
    )
    port = free_port()
    assert main(["status", "--url", f"127.0.0.1:{port}"]) == 2
    assert capsys.readouterr().err.startswith(
        f"switchd: cannot reach switchd at http://127.0.0.1:{port}: "
    )


# ---- real servers and client subprocesses ------------------------------------------------


def switchd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m switchd ARGS` to completion (killed past CLIENT_TIMEOUT)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHD_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "switchd", *args],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        env=environment,
        check=False,
    )


ServerFactory = Callable[..., Server]


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Real `switchd serve` processes; each is stopped with SIGTERM and must exit 0."""
    started: list[Server] = []

    def factory(**settings: Any) -> Server:
        folder = tmp_path / f"server{len(started)}"
        folder.mkdir()
        server = write_config(folder, MODELS, **settings)
        started.append(server)
        server.start()
        return server

    yield factory
    codes: list[int | None] = []
    for server in started:
        try:
            codes.append(server.stop() if server.process is not None else 0)
        except subprocess.TimeoutExpired:
            codes.append(None)
    logs = "\n".join(server.log() for server in started)
    assert codes == [0] * len(started), logs


def stage_lines(stdout: str) -> list[tuple[str, int, str, str]]:
    """(bar, percent, stage, message) of each stage line; log lines left out."""
    found = []
    for line in stdout.splitlines():
        if line.startswith("    | "):
            continue
        match = STAGE_LINE.match(line)
        assert match is not None, f"not a stage line: {line!r}"
        bar, percent, name, message = match.groups()
        found.append((bar, int(percent), name, message))
    return found


def status_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    assert lines[0].startswith("GPU (simulated): ")
    assert lines[1].split() == ["MODEL", "STATUS", "SIZE", "GB", "LOAD", "S", "IN", "FLIGHT"]
    return {line.split()[0]: line.split()[1:] for line in lines[2:]}


def engine_pid(server: Server, model: str) -> int:
    status = httpx.get(f"{server.url}/v1/models/status", timeout=10).json()
    pid: int = status["models"][model]["engine"]["pid"]
    return pid


def test_switch_shows_each_stage_then_status_lists_the_model_running(
    make_server: ServerFactory,
) -> None:
    server = make_server()
    switched = switchd("switch", "alpha", "--url", server.url)
    assert switched.returncode == 0, switched.stderr
    assert switched.stderr == ""
    stages = stage_lines(switched.stdout)
    names = [name for _, _, name, _ in stages]
    assert set(names) <= {"memory_check", "start", "loading", "ready", "result"}
    assert [n for n in names if n != "loading"] == ["memory_check", "start", "ready", "result"]
    percents = [percent for _, percent, _, _ in stages]
    assert percents == sorted(percents)
    assert percents[0] == 5
    assert stages[-1] == ("#" * 24, 100, "result", "Model 'alpha' is ready")
    assert switched.stdout.splitlines()[-1].startswith(f"{FULL}  result ")
    assert switched.stdout.splitlines()[-2].startswith(f"{FULL}  ready ")
    assert "    | INFO Model alpha loaded in " in switched.stdout  # the engine's log

    status = switchd("status", "--url", server.url)
    assert status.returncode == 0, status.stderr
    assert status.stdout.splitlines()[0] == (
        "GPU (simulated): 30.00 of 95.59 GB used, 65.59 GB free"
    )
    rows = status_rows(status.stdout)
    assert set(rows) == {"alpha", "beta"}
    assert rows["alpha"][:2] == ["running", "30"]
    assert rows["beta"][:2] == ["exited", "30"]
    # HOST:PORT, as --listen takes it, from the flag or the environment.
    host_port = server.url.removeprefix("http://")
    assert switchd("status", "--url", host_port).stdout == status.stdout
    assert switchd("status", env={"SWITCHD_URL": host_port}).stdout == status.stdout


def test_unload_stops_the_engine(make_server: ServerFactory) -> None:
    server = make_server()
    assert switchd("switch", "alpha", "--url", server.url).returncode == 0
    pid = engine_pid(server, "alpha")
    assert not gone(pid)
    unloaded = switchd("unload", "alpha", "--url", server.url)
    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout.splitlines()[-1] == f"{FULL}  result       Unloaded alpha"
    assert gone(pid)
    rows = status_rows(switchd("status", "--url", server.url).stdout)
    assert rows["alpha"][0] == "exited"


def test_switch_to_an_unknown_model_exits_1(make_server: ServerFactory) -> None:
    server = make_server()
    result = switchd("switch", "nope", "--url", server.url)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "switchd: Unknown model 'nope'; known models: alpha, beta (HTTP 404)\n"
    )


def test_status_against_a_closed_port_exits_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = switchd("status", "--url", url)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"switchd: cannot reach switchd at {url}: ")


def test_api_keys_are_needed_and_taken_from_flag_or_environment(
    make_server: ServerFactory,
) -> None:
    server = make_server(api_keys=["s3cret"])
    refused = switchd("status", "--url", server.url)
    assert refused.returncode == 2
    assert "401" in refused.stderr
    assert "--key" in refused.stderr
    wrong = switchd("status", "--url", server.url, "--key", "wrong")
    assert wrong.returncode == 2
    assert "401" in wrong.stderr
    switch_refused = switchd("switch", "alpha", "--url", server.url)
    assert switch_refused.returncode == 2
    assert "401" in switch_refused.stderr

    with_flag = switchd("status", "--url", server.url, "--key", "s3cret")
    assert with_flag.returncode == 0, with_flag.stderr
    assert status_rows(with_flag.stdout)["alpha"][0] == "exited"
    with_env = switchd("status", "--url", server.url, env={"SWITCHD_API_KEY": "s3cret"})
    assert with_env.returncode == 0, with_env.stderr
    # SWITCHD_URL stands in for --url.
    from_env = switchd("status", env={"SWITCHD_API_KEY": "s3cret", "SWITCHD_URL": server.url})
    assert from_env.returncode == 0, from_env.stderr
    switched = switchd("switch", "alpha", "--url", server.url, "--key", "s3cret")
    assert switched.returncode == 0, switched.stderr
    assert switched.stdout.splitlines()[-1].startswith(f"{FULL}  result ")


def test_sigterm_stops_the_server_and_its_engines(make_server: ServerFactory) -> None:
    server = make_server()
    assert switchd("switch", "alpha", "--url", server.url).returncode == 0
    pid = engine_pid(server, "alpha")
    assert server.stop() == 0, server.log()
    assert wait_gone(pid, 5)


def test_serve_insecure_really_listens_on_every_address(tmp_path: Path) -> None:
    config = process_config(tmp_path)
    port = free_port()
    log_path = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "switchd", "serve", "--config", str(config)]
    argv += ["--listen", f"0.0.0.0:{port}", "--insecure"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert response.status_code == 200
        assert response.json()["status"] == "ok"
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
