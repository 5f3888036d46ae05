"""The event bus: ids, the replay ring, and subscribers that read or do not."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import cast

import pytest

from switchd.events import SUBSCRIBER_QUEUE_SIZE, Event, EventBus, Subscription

TIMEOUT = 2.0


async def take(subscription: Subscription, count: int) -> list[Event]:
    """The next `count` events of `subscription`, or fail after TIMEOUT."""

    async def read() -> list[Event]:
        got: list[Event] = []
        async for event in subscription:
            got.append(event)
            if len(got) == count:
                break
        return got

    return await asyncio.wait_for(read(), TIMEOUT)


async def drain(subscription: Subscription) -> list[Event]:
    """Every event until the subscription's iteration ends, or fail after TIMEOUT."""

    async def read() -> list[Event]:
        return [event async for event in subscription]

    return await asyncio.wait_for(read(), TIMEOUT)


def ids(events: list[Event] | None) -> list[int] | None:
    return None if events is None else [event.id for event in events]


def test_ids_increase_by_one() -> None:
    bus = EventBus(first_id=0)
    assert bus.last_id == 0
    first = bus.publish("queued", {"job": "a"})
    second = bus.publish("memory_check", {"job": "a"})
    third = bus.publish("model_state", {"model": "m"})
    assert [first.id, second.id, third.id] == [1, 2, 3]
    assert bus.last_id == 3
    assert third == Event(3, "model_state", {"model": "m"})


def test_event_json_is_compact() -> None:
    event = Event(7, "ready", {"model": "m", "load_seconds": 1.5, "gpus": [0, 1]})
    assert event.json() == '{"model":"m","load_seconds":1.5,"gpus":[0,1]}'


def test_missed_since_returns_exactly_what_came_after() -> None:
    bus = EventBus(first_id=0)
    for n in range(5):
        bus.publish("log", {"n": n})
    missed = bus.missed_since(2)
    assert ids(missed) == [3, 4, 5]
    assert missed is not None
    assert [event.data["n"] for event in missed] == [2, 3, 4]
    assert ids(bus.missed_since(0)) == [1, 2, 3, 4, 5]
    assert bus.missed_since(5) == []


def test_missed_since_on_an_empty_bus() -> None:
    bus = EventBus(first_id=0)
    assert bus.missed_since(0) == []
    assert bus.missed_since(1) is None


def test_missed_since_an_id_older_than_the_ring() -> None:
    bus = EventBus(ring_size=3, first_id=0)
    for n in range(6):
        bus.publish("log", {"n": n})
    # The ring holds 4, 5, 6.
    assert ids(bus.missed_since(3)) == [4, 5, 6]  # the oldest id still replayable
    assert ids(bus.missed_since(5)) == [6]
    assert bus.missed_since(2) is None  # event 3 is gone
    assert bus.missed_since(0) is None
    assert bus.missed_since(6) == []


def test_missed_since_an_id_from_the_future() -> None:
    bus = EventBus(first_id=0)
    bus.publish("log", {})
    bus.publish("log", {})
    assert bus.missed_since(3) is None  # an id from before a restart
    assert bus.missed_since(1000) is None


async def test_subscribe_with_replay_then_live_in_order() -> None:
    bus = EventBus(first_id=0)
    for n in range(4):
        bus.publish("log", {"n": n})
    subscription = bus.subscribe(bus.missed_since(2))
    assert bus.subscriber_count == 1
    bus.publish("log", {"n": 4})
    bus.publish("log", {"n": 5})
    got = await take(subscription, 4)
    assert [event.id for event in got] == [3, 4, 5, 6]
    assert [event.data["n"] for event in got] == [2, 3, 4, 5]


async def test_subscribe_without_replay_gets_only_new_events() -> None:
    bus = EventBus(first_id=0)
    bus.publish("log", {"n": "old"})
    subscription = bus.subscribe()
    bus.publish("log", {"n": "new"})
    got = await take(subscription, 1)
    assert [(event.id, event.data["n"]) for event in got] == [(2, "new")]


async def test_live_events_reach_a_waiting_reader() -> None:
    bus = EventBus(first_id=0)
    subscription = bus.subscribe()
    reader = asyncio.create_task(take(subscription, 3))
    await asyncio.sleep(0)  # the reader is now waiting on an empty queue
    for name in ("queued", "memory_check", "start"):
        bus.publish(name, {})
    got = await asyncio.wait_for(reader, TIMEOUT)
    assert [(event.id, event.name) for event in got] == [
        (1, "queued"),
        (2, "memory_check"),
        (3, "start"),
    ]


async def test_a_subscriber_that_never_reads_is_dropped() -> None:
    bus = EventBus(first_id=0)
    stalled = bus.subscribe()
    reader = bus.subscribe()
    assert bus.subscriber_count == 2

    received: list[int] = []

    async def keep_reading() -> None:
        async for event in reader:
            received.append(event.id)
            if event.id == total:
                return

    total = SUBSCRIBER_QUEUE_SIZE + 10
    task = asyncio.create_task(keep_reading())
    for n in range(SUBSCRIBER_QUEUE_SIZE):
        bus.publish("log", {"n": n})
        if n % 100 == 0:
            await asyncio.sleep(0)  # let the live reader keep up
    assert stalled.dropped is False  # exactly full, not yet overflowing
    assert bus.subscriber_count == 2

    bus.publish("log", {"n": SUBSCRIBER_QUEUE_SIZE})  # one too many for the stalled one
    assert stalled.dropped is True
    assert bus.subscriber_count == 1

    for n in range(SUBSCRIBER_QUEUE_SIZE + 1, total):
        bus.publish("log", {"n": n})

    # The dropped subscriber's iteration ends instead of hanging.
    assert await drain(stalled) == []
    await asyncio.wait_for(task, TIMEOUT)
    assert received == list(range(1, total + 1))
    assert reader.dropped is False


async def test_dropped_subscriber_waiting_in_iteration_wakes_up() -> None:
    bus = EventBus(first_id=0)
    subscription = bus.subscribe()
    for _ in range(SUBSCRIBER_QUEUE_SIZE):
        bus.publish("log", {})

    # Read one event, then stall holding the iterator while the queue overflows.
    iterator = aiter(subscription)
    first = await asyncio.wait_for(anext(iterator), TIMEOUT)
    assert first.id == 1
    bus.publish("log", {})  # fits: the reader took one
    assert subscription.dropped is False
    bus.publish("log", {})  # overflows
    assert subscription.dropped is True

    rest = [event async for event in iterator]
    assert rest == []


def test_publish_never_blocks_on_a_stalled_subscriber() -> None:
    bus = EventBus(first_id=0)
    stalled = bus.subscribe()
    started = time.perf_counter()
    for n in range(SUBSCRIBER_QUEUE_SIZE * 3):
        bus.publish("log", {"n": n})
    assert time.perf_counter() - started < 1.0
    assert stalled.dropped is True
    assert bus.last_id == SUBSCRIBER_QUEUE_SIZE * 3
    assert bus.subscriber_count == 0


async def test_replay_does_not_count_against_the_live_allowance() -> None:
    bus = EventBus(ring_size=SUBSCRIBER_QUEUE_SIZE * 2, first_id=0)
    for _ in range(SUBSCRIBER_QUEUE_SIZE + 5):
        bus.publish("log", {})
    subscription = bus.subscribe(bus.missed_since(0))
    for _ in range(SUBSCRIBER_QUEUE_SIZE):
        bus.publish("log", {})
    assert subscription.dropped is False
    got = await take(subscription, SUBSCRIBER_QUEUE_SIZE * 2 + 5)
    assert [event.id for event in got] == list(range(1, SUBSCRIBER_QUEUE_SIZE * 2 + 6))


def test_close_unsubscribes() -> None:
    bus = EventBus(first_id=0)
    first = bus.subscribe()
    second = bus.subscribe()
    assert bus.subscriber_count == 2
    first.close()
    assert bus.subscriber_count == 1
    first.close()  # twice is harmless
    assert bus.subscriber_count == 1
    bus.unsubscribe(second)
    assert bus.subscriber_count == 0
    bus.publish("log", {})  # nobody is offered it, nothing fails


async def test_closing_the_iteration_unsubscribes() -> None:
    bus = EventBus(first_id=0)
    subscription = bus.subscribe()
    bus.publish("log", {})
    iterator = cast(AsyncGenerator[Event, None], aiter(subscription))
    first = await asyncio.wait_for(anext(iterator), TIMEOUT)
    assert first.id == 1
    assert bus.subscriber_count == 1
    await iterator.aclose()
    assert bus.subscriber_count == 0


async def test_cancelled_reader_unsubscribes() -> None:
    bus = EventBus(first_id=0)
    subscription = bus.subscribe()
    task = asyncio.create_task(drain(subscription))
    await asyncio.sleep(0.01)
    assert bus.subscriber_count == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    assert bus.subscriber_count == 0


async def test_closed_subscription_gets_no_new_events() -> None:
    bus = EventBus(first_id=0)
    subscription = bus.subscribe()
    bus.publish("log", {"n": 1})
    subscription.close()
    bus.publish("log", {"n": 2})
    got = await take(subscription, 1)
    assert [event.data["n"] for event in got] == [1]
    iterator = aiter(subscription)
    with pytest.raises(TimeoutError):  # nothing published after close() arrives
        await asyncio.wait_for(anext(iterator), 0.05)


def test_an_id_from_an_earlier_run_gets_a_snapshot_not_this_runs_events() -> None:
    before_restart = EventBus()
    for _ in range(5):
        before_restart.publish("loading", {"job": "old"})
    seen = before_restart.last_id
    after_restart = EventBus()
    for _ in range(20):
        after_restart.publish("model_state", {"model": "m"})
    assert after_restart.last_id - 20 > seen, "a later run's ids start above an earlier run's"
    assert after_restart.missed_since(seen) is None
