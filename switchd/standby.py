"""Standby tiers: put an engine aside without stopping it, and bring it back.

Two parts. `EngineStandby` speaks each engine's documented HTTP API (vLLM's
sleep mode, SGLang's memory release); `choose` decides, purely, which victims
of a plan sleep and which stop. switchd measures what each sleep freed and
each wake cost (switchd.steps, switchd.loading) and learns it (switchd.stats).

The choice, per victim (in the plan's order):

- A tier is allowed when the model lists it, and for `sleep1` (weights kept in
  host RAM) only while the host-RAM budget has room for its weights.
- A model whose learned residue is over MAX_RESIDUE_SHARE of what it holds
  (pooling models keep 80-87% at vLLM's level 1) is stopped: sleeping frees
  too little. vLLM's level 0 (pause only) frees nothing, so it can never make
  room and is no tier here: a model that may stay simply keeps running.
- Among allowed tiers, the one with the shortest expected wake wins; a tier that
  would wake no faster than a cold load is not worth the residue it keeps.
- What sleeping frees is what the victim holds minus its residue (learned;
  unknown before its first sleep, then the sleep is tried and measured, and
  the switch stops it if the memory is still short). While the plan's devices
  would stay short, the sleeper leaving the most residue there is stopped
  instead: stopping frees everything. A level-1 sleeper stopped so gives its
  share of the budget back to the sleepers refused level 1 for want of it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from switchd.config import ModelSpec, Tier
from switchd.units import with_article

log = logging.getLogger(__name__)

# Until a wake is measured: the vLLM blog's figures (level 1: 0.1-0.8 s, level 2:
# about 1-3 s), and at most UNMEASURED_WAKE_SHARE of the model's cold load.
DEFAULT_WAKE_SECONDS: Mapping[Tier, float] = {
    Tier.SLEEP1: 1.0,
    Tier.SLEEP2: 3.0,
    Tier.RELEASE: 3.0,
}
UNMEASURED_WAKE_SHARE = 0.1  # of the cold load, at most, before a wake is measured
HOST_RAM_SHARE = 0.5  # of MemAvailable at start, when standby_host_ram_gb is not set
IS_SLEEPING_SECONDS = 5.0  # a question, not work: at most this (and the call bound)
SLEEP_MODE = "wait"  # vLLM's /sleep `mode`: finish in-flight requests, never abort them
HEALTH_AFTER_SLEEP_SECONDS = 5.0
# A tier whose learned residue keeps more than this share of what the engine held
# frees too little to be worth it (pooling models keep 80-87% at level 1): stop it.
MAX_RESIDUE_SHARE = 0.5
MEMINFO = Path("/proc/meminfo")


def label(tier: Tier) -> str:
    """How events name a tier: 'level 1', 'level 2', 'released'."""
    return {Tier.SLEEP1: "level 1", Tier.SLEEP2: "level 2", Tier.RELEASE: "released"}[tier]


class StandbyFailed(RuntimeError):
    """A sleep, wake or wake check the engine refused or did not answer."""


# ---- the engines' APIs ------------------------------------------------------------


class EngineStandby:
    """The sleep and wake calls of vLLM (`--enable-sleep-mode`, VLLM_SERVER_DEV_MODE=1)
    and SGLang (`--enable-memory-saver`), as documented by each."""

    def __init__(self, http: httpx.AsyncClient, call_seconds: float) -> None:
        self._http = http
        # The longest a sleep (vLLM answers /sleep once the memory is released) or a
        # question may take: past it, the engine is taken as hung and is stopped.
        self._call_seconds = call_seconds

    async def sleep(self, spec: ModelSpec, url: str, tier: Tier) -> None:
        limit = self._call_seconds
        if tier is Tier.RELEASE:
            await self._post(spec, url, "/release_memory_occupation", json={}, within_seconds=limit)
        else:
            level = 1 if tier is Tier.SLEEP1 else 2
            # Recent vLLM aborts in-flight requests on /sleep unless told to wait; an
            # older one ignores the unknown parameter. switchd drains first anyway.
            await self._post(
                spec,
                url,
                "/sleep",
                params={"level": level, "mode": SLEEP_MODE},
                within_seconds=limit,
            )

    async def answers_health(self, spec: ModelSpec, url: str) -> bool:
        """Whether the engine still answers its health path (200) after a sleep or a
        release: a vLLM that crashed in its sleep once answered the sleep with 200
        (vLLM #45520), and a dead engine must not be counted as a sleeper."""
        try:
            response = await self._http.get(
                url + spec.health_path, headers=_headers(spec), timeout=HEALTH_AFTER_SLEEP_SECONDS
            )
        except (httpx.HTTPError, OSError, AttributeError):  # as Loader.healthy: a reset
            return False
        return response.status_code == 200

    async def wake(self, spec: ModelSpec, url: str, tier: Tier, within_seconds: float) -> None:
        """Wake it; after a level-2 sleep, reload the discarded weights in place first
        (vLLM's documented order: weights, reload_weights, then the KV cache)."""
        limit = within_seconds
        if tier is Tier.RELEASE:
            await self._post(spec, url, "/resume_memory_occupation", json={}, within_seconds=limit)
        elif tier is Tier.SLEEP1:
            await self._post(spec, url, "/wake_up", within_seconds=limit)
        else:
            weights, cache = {"tags": "weights"}, {"tags": "kv_cache"}
            reload = {"method": "reload_weights"}
            await self._post(spec, url, "/wake_up", params=weights, within_seconds=limit)
            await self._post(spec, url, "/collective_rpc", json=reload, within_seconds=limit)
            await self._post(spec, url, "/wake_up", params=cache, within_seconds=limit)

    async def is_sleeping(self, spec: ModelSpec, url: str) -> bool | None:
        """vLLM's own view; None where the engine cannot say (SGLang, an error)."""
        if Tier.RELEASE in spec.standby:
            return None
        limit = min(IS_SLEEPING_SECONDS, self._call_seconds)
        try:
            async with asyncio.timeout(limit):
                response = await self._http.get(
                    url + "/is_sleeping", headers=_headers(spec), timeout=limit
                )
            answer = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, OSError, AttributeError, TimeoutError, ValueError):
            return None
        value = answer.get("is_sleeping") if isinstance(answer, dict) else None
        return value if isinstance(value, bool) else None

    async def check(self, spec: ModelSpec, url: str, within_seconds: float) -> None:
        """One tiny request: a woken engine must answer it, not just its health path
        (a sleeping vLLM's /health says 200)."""
        path = spec.wake_check_path
        body: dict[str, Any] = {"model": spec.name}
        if path.endswith("/embeddings"):
            body["input"] = "ping"
        elif path.endswith("/chat/completions"):
            body |= {"messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        else:
            body |= {"prompt": "ping", "max_tokens": 1}
        await self._post(spec, url, path, json=body, within_seconds=within_seconds)

    async def _post(
        self,
        spec: ModelSpec,
        url: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        within_seconds: float,
    ) -> None:
        """One call, bounded as a whole: httpx's timeout bounds each read, not the call
        (an engine trickling bytes would outlast it)."""
        try:
            async with asyncio.timeout(within_seconds):
                response = await self._http.post(
                    url + path,
                    params=params,
                    json=json,
                    headers=_headers(spec),
                    timeout=within_seconds,
                )
        except TimeoutError as exc:
            raise StandbyFailed(f"POST {path} timed out after {within_seconds:g} s") from exc
        except (httpx.HTTPError, OSError, AttributeError) as exc:
            # AttributeError: httpcore on a connection reset as it is made (getpeername).
            raise StandbyFailed(f"POST {path} failed: {exc!r}") from exc
        if response.status_code >= 300:
            raise StandbyFailed(f"POST {path} answered {response.status_code}: {_said(response)}")


def _headers(spec: ModelSpec) -> dict[str, str]:
    return {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}


def _said(response: httpx.Response) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:200] if text else "(no body)"


# ---- the host-RAM budget ------------------------------------------------------------


async def host_ram_budget_gb(configured: float | None, meminfo: Path = MEMINFO) -> float:
    """`standby_host_ram_gb`, else half of what the host has available now."""
    if configured is not None:
        return configured
    available = await asyncio.to_thread(_mem_available_gb, meminfo)
    if available is None:
        log.warning("cannot read MemAvailable from %s: no level-1 sleeps", meminfo)
        return 0.0
    return round(HOST_RAM_SHARE * available, 2)


def _mem_available_gb(meminfo: Path) -> float | None:
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                return int(value.split()[0]) / (1024 * 1024)  # kB -> GiB
    except (OSError, ValueError, IndexError):
        return None
    return None


# ---- the choice -------------------------------------------------------------------------


@dataclass(frozen=True)
class Victim:
    """A model a plan unloads, and what the choice needs to know of it."""

    name: str
    tiers: tuple[Tier, ...]  # what its engine offers; () when asleep already or stop-only
    held_gb: Mapping[int, float]  # what it holds now, per device
    residue_gb: float | None  # what it held asleep when last measured; None: never
    wake_seconds: Mapping[Tier, float]  # learned or DEFAULT_WAKE_SECONDS
    load_seconds: float  # its cold load, learned or configured
    weights_gb: float  # what a level-1 sleep keeps in host RAM


@dataclass(frozen=True)
class PutAway:
    name: str
    tier: Tier | None  # None: stop it
    reason: str
    wake_seconds: float | None = None
    host_ram_gb: float = 0.0  # charged to the budget while it sleeps


def choose(
    victims: Sequence[Victim],
    short_gb: Mapping[int, float],
    host_ram_left_gb: float,
) -> list[PutAway]:
    """How to put each victim aside so the `short_gb` per device (need minus free,
    positive where short) are covered; see the module docstring."""
    choices: list[PutAway] = []
    ram_left = host_ram_left_gb
    for victim in victims:
        choice = _preferred(victim, ram_left)
        ram_left -= choice.host_ram_gb
        choices.append(choice)
    by_name = {v.name: v for v in victims}
    while True:
        short = _still_short(choices, by_name, short_gb)
        sleepers = [c for c in choices if c.tier is not None]
        if not short or not sleepers:
            return choices
        worst = max(
            sleepers,
            key=lambda c: (_residue_on(by_name[c.name], short), c.name),
        )
        kept = _residue_on(by_name[worst.name], short)
        index = choices.index(worst)
        choices[index] = PutAway(
            worst.name,
            None,
            f"stopping {worst.name}: asleep it would keep {kept:.2f} GB where memory is short",
        )
        if worst.host_ram_gb:
            choices = _with_budget_back(choices, by_name, host_ram_left_gb)


def _with_budget_back(
    choices: Sequence[PutAway], by_name: Mapping[str, Victim], host_ram_left_gb: float
) -> list[PutAway]:
    """A level-1 sleeper was stopped after all: its share of the budget is back, for
    the sleepers that were refused level 1 for want of it. They stay asleep, so what
    they keep on the devices does not change; only the tier, where it wakes faster."""
    ram_left = host_ram_left_gb - math.fsum(c.host_ram_gb for c in choices)
    again: list[PutAway] = []
    for choice in choices:
        victim = by_name[choice.name]
        if choice.tier is not None and not choice.host_ram_gb and Tier.SLEEP1 in victim.tiers:
            chosen = _preferred(victim, ram_left)
            ram_left -= chosen.host_ram_gb
            again.append(chosen)
        else:
            again.append(choice)
    return again


def _preferred(victim: Victim, ram_left: float) -> PutAway:
    if not victim.tiers:
        return PutAway(victim.name, None, f"stopping {victim.name}")
    allowed = [t for t in victim.tiers if not t.uses_host_ram or victim.weights_gb <= ram_left]
    if not allowed:
        return PutAway(
            victim.name,
            None,
            f"stopping {victim.name}: a level-1 sleep would hold {victim.weights_gb:.2f} GB of "
            f"host RAM, {max(0.0, ram_left):.2f} GB of the standby budget is left",
        )
    held = math.fsum(victim.held_gb.values())
    if victim.residue_gb is not None and held > 0 and victim.residue_gb > MAX_RESIDUE_SHARE * held:
        return PutAway(
            victim.name,
            None,
            f"stopping {victim.name}: asleep it kept {victim.residue_gb:.2f} of "
            f"{held:.2f} GB last time; a stop frees it all",
        )
    tier = min(allowed, key=lambda t: (victim.wake_seconds[t], victim.tiers.index(t)))
    wake = victim.wake_seconds[tier]
    if wake >= victim.load_seconds:
        return PutAway(
            victim.name,
            None,
            f"stopping {victim.name}: waking ({wake:g} s) is no faster than loading "
            f"({victim.load_seconds:g} s)",
        )
    refused = ""
    if Tier.SLEEP1 in victim.tiers and Tier.SLEEP1 not in allowed:
        refused = f"; level 1 would need {victim.weights_gb:.2f} GB of host RAM, over budget"
    return PutAway(
        victim.name,
        tier,
        f"sleeping {victim.name} ({label(tier)}): wakes in ~{wake:g} s instead of "
        f"{with_article(f'{victim.load_seconds:g}')} s load{refused}",
        wake,
        victim.weights_gb if tier.uses_host_ram else 0.0,
    )


def _residue_per_device(victim: Victim) -> dict[int, float]:
    """A sleeping engine keeps about the same on each of its devices (its context)."""
    residue = victim.residue_gb or 0.0  # unknown: tried, measured, stopped if short
    devices = list(victim.held_gb)
    return {d: min(victim.held_gb[d], residue / len(devices)) for d in devices}


def _residue_on(victim: Victim, devices: Sequence[int]) -> float:
    per_device = _residue_per_device(victim)
    return math.fsum(per_device.get(d, 0.0) for d in devices)


def _still_short(
    choices: Sequence[PutAway], by_name: Mapping[str, Victim], short_gb: Mapping[int, float]
) -> list[int]:
    """The devices still short once every choice is carried out."""
    freed: dict[int, float] = {}
    for choice in choices:
        victim = by_name[choice.name]
        kept = _residue_per_device(victim) if choice.tier is not None else {}
        for device, gb in victim.held_gb.items():
            freed[device] = freed.get(device, 0.0) + gb - kept.get(device, 0.0)
    return [d for d, gb in short_gb.items() if gb > 0 and freed.get(d, 0.0) < gb - 1e-9]
