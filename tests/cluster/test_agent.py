"""A host's agent as a plain object (Ray wraps it as an actor: switchd/cluster/agent.py)."""

from __future__ import annotations

import os
import time

from switchd.cluster.agent import HostAgent
from switchd.cluster.directory import HostSnapshot
from switchd.runtime.process import free_port


def test_a_switchd_that_does_not_answer_makes_its_host_unreachable_at_the_first_read() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    agent = HostAgent("h", url, node="n1", interval=0.05)
    try:
        deadline = time.monotonic() + 5
        while (answer := agent.snapshot())["error"] == "not read yet":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        snapshot = HostSnapshot.from_dict(answer)
        assert (snapshot.name, snapshot.url, snapshot.node) == ("h", url, "n1")
        assert snapshot.status is None
        assert snapshot.reachable is False
        assert (snapshot.error or "").startswith("ConnectError")
        assert answer["agent_pid"] == os.getpid()
    finally:
        agent.stop()
