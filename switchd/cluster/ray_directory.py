"""The directory on Ray: one named, detached agent actor per host.

Membership is Ray's: an agent is a named actor in the `switchd` namespace
(`switchd-agent:<host>`), so a gateway started or restarted anywhere in the
cluster finds every host by listing the names. A host whose node dies loses
its agent: the call to it fails and the host is unreachable at once; a host
whose switchd dies keeps its agent, whose failed reads say so within half a
second. Ray's blocking calls (connect, list, look up) run off the event loop.

`ray` is imported here only: this module is loaded by `switchd gateway` and
`switchd agent`, never by single-host switchd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from switchd.cluster.agent import HostAgent
from switchd.cluster.directory import (
    POLL_SECONDS,
    HostSnapshot,
    read_error,
    watch_by_polling,
)

NAMESPACE = "switchd"
PREFIX = "switchd-agent:"
CALL_TIMEOUT_SECONDS = 1.0  # an agent answers from memory: a slow one is a lost node
AGENT_START_SECONDS = 60.0

log = logging.getLogger(__name__)


def connect(address: str | None, namespace: str = NAMESPACE) -> None:
    """Join the Ray cluster at `address` ("auto": the one this machine runs) as a
    driver in `namespace`; nothing is scheduled on our behalf."""
    if not ray.is_initialized():
        ray.init(
            address=address,
            namespace=namespace,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )


def start_agent(
    host: str,
    url: str,
    key: str | None = None,
    node: str | None = None,
    namespace: str = NAMESPACE,
) -> Any:
    """Start `host`'s agent on `node` (default: this process's node), replacing one
    left from before (its node may be gone: a restarted node has a new id)."""
    node = node or ray.get_runtime_context().get_node_id()
    name = PREFIX + host
    with contextlib.suppress(ValueError):  # none yet
        ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    remote: Any = ray.remote(HostAgent)
    agent = remote.options(
        name=name,
        namespace=namespace,
        lifetime="detached",  # outlives the process that made it
        num_cpus=0,  # takes nothing from Ray's accounting: the host's GPUs are switchd's
        num_gpus=0,
        max_restarts=-1,  # Ray brings it back when its worker dies
        max_concurrency=4,  # one caller's `snapshot` does not wait behind another's
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(host, url, key, node)
    ray.get(agent.snapshot.remote(), timeout=AGENT_START_SECONDS)
    return agent


def stop_agent(host: str, namespace: str = NAMESPACE) -> bool:
    try:
        ray.kill(ray.get_actor(PREFIX + host, namespace=namespace), no_restart=True)
    except ValueError:
        return False
    return True


def agent_names(namespace: str) -> list[str]:
    return sorted(
        name[len(PREFIX) :]
        for name in ray.util.list_named_actors(all_namespaces=False)
        if isinstance(name, str) and name.startswith(PREFIX)
    )


class RayDirectory:
    def __init__(self, address: str | None, namespace: str = NAMESPACE) -> None:
        self._address = address
        self._namespace = namespace
        self._handles: dict[str, Any] = {}
        self._last: dict[str, HostSnapshot] = {}
        self._connected = False

    async def _ensure(self) -> None:
        if not self._connected:
            await asyncio.to_thread(connect, self._address, self._namespace)
            self._connected = True

    async def _handle(self, host: str) -> Any:
        if host not in self._handles:
            self._handles[host] = await asyncio.to_thread(
                ray.get_actor, PREFIX + host, self._namespace
            )
        return self._handles[host]

    async def _ask(self, host: str, method: str) -> HostSnapshot:
        try:
            handle = await self._handle(host)
            ref = getattr(handle, method).remote()
            answer = await asyncio.wait_for(asyncio.wrap_future(ref.future()), CALL_TIMEOUT_SECONDS)
        except (RayError, GetTimeoutError, TimeoutError, ValueError) as exc:
            # The agent is gone (its node with it) or stuck: forget the handle, so a
            # new agent under the same name is found next time.
            self._handles.pop(host, None)
            previous = self._last.get(host)
            reason = f"agent unreachable: {read_error(exc)}"
            if previous is None:
                return HostSnapshot(host, "", None, None, reason)
            return previous.down(reason)
        snapshot = HostSnapshot.from_dict(answer)
        self._last[host] = snapshot
        return snapshot

    async def hosts(self) -> list[HostSnapshot]:
        await self._ensure()
        names = await asyncio.to_thread(agent_names, self._namespace)
        for gone in set(self._last) - set(names):
            del self._last[gone]  # its agent was stopped on purpose: no longer a host
            self._handles.pop(gone, None)
        return list(await asyncio.gather(*(self._ask(name, "snapshot") for name in names)))

    def watch(self, interval: float = POLL_SECONDS) -> AsyncIterator[list[HostSnapshot]]:
        return watch_by_polling(self, interval)

    async def close(self) -> None:
        self._handles.clear()
        if self._connected:
            await asyncio.to_thread(ray.shutdown)
            self._connected = False
