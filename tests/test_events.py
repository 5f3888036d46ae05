"""The event bus: ids, the replay ring, and subscribers that read or do not."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator
from typing import cast

import pytest

from switchd import wire
from switchd.events import (
    LOG_QUEUE_SIZE,
    SUBSCRIBER_QUEUE_SIZE,
    Event,
    EventBus,
    LogRate,
    Subscription,
)

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
    # An event published without a time gets one: every event is self-describing.
    assert third == Event(3, "model_state", {"model": "m", "ts": third.data["ts"]})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", third.data["ts"])


def test_event_json_is_compact() -> None:
    event = Event(7, "ready", {"model": "m", "load_seconds": 1.5, "gpus": [0, 1]})
    assert event.json() == '{"id":7,"event":"ready","model":"m","load_seconds":1.5,"gpus":[0,1]}'


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
        bus.publish("loading", {"n": n})
        if n % 100 == 0:
            await asyncio.sleep(0)  # let the live reader keep up
    assert stalled.dropped is False  # exactly full, not yet overflowing
    assert bus.subscriber_count == 2

    bus.publish("loading", {"n": SUBSCRIBER_QUEUE_SIZE})  # one too many for the stalled one
    assert stalled.dropped is True
    assert bus.subscriber_count == 1

    for n in range(SUBSCRIBER_QUEUE_SIZE + 1, total):
        bus.publish("loading", {"n": n})

    # The dropped subscriber's iteration ends instead of hanging.
    assert await drain(stalled) == []
    await asyncio.wait_for(task, TIMEOUT)
    assert received == list(range(1, total + 1))
    assert reader.dropped is False


async def test_dropped_subscriber_waiting_in_iteration_wakes_up() -> None:
    bus = EventBus(first_id=0)
    subscription = bus.subscribe()
    for _ in range(SUBSCRIBER_QUEUE_SIZE):
        bus.publish("loading", {})

    # Read one event, then stall holding the iterator while the queue overflows.
    iterator = aiter(subscription)
    first = await asyncio.wait_for(anext(iterator), TIMEOUT)
    assert first.id == 1
    bus.publish("loading", {})  # fits: the reader took one
    assert subscription.dropped is False
    bus.publish("loading", {})  # overflows
    assert subscription.dropped is True

    rest = [event async for event in iterator]
    assert rest == []


def test_publish_never_blocks_on_a_stalled_subscriber() -> None:
    bus = EventBus(first_id=0)
    stalled = bus.subscribe()
    started = time.perf_counter()
    for n in range(SUBSCRIBER_QUEUE_SIZE * 3):
        bus.publish("loading", {"n": n})
    assert time.perf_counter() - started < 1.0
    assert stalled.dropped is True
    assert bus.last_id == SUBSCRIBER_QUEUE_SIZE * 3
    assert bus.subscriber_count == 0


async def test_replay_does_not_count_against_the_live_allowance() -> None:
    bus = EventBus(ring_size=SUBSCRIBER_QUEUE_SIZE * 2, first_id=0)
    for _ in range(SUBSCRIBER_QUEUE_SIZE + 5):
        bus.publish("loading", {})
    subscription = bus.subscribe(bus.missed_since(0))
    for _ in range(SUBSCRIBER_QUEUE_SIZE):
        bus.publish("loading", {})
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


# ---- log lines are droppable, stages are not -------------------------------------------


def log_data(n: int) -> dict[str, object]:
    """A log event's payload as the Emitter publishes it (the common job fields, line, source)."""
    line = f"line {n}"
    return {"job": "j", "stage": "log", "model": "m", "message": line, "line": line, "source": "m"}


def available(subscription: Subscription) -> list[Event]:
    """What a reader gets now, without waiting: everything queued for it."""
    got: list[Event] = []
    while (event := subscription._next()) is not None:
        got.append(event)
    return got


async def test_a_slow_reader_gets_every_stage_in_order_and_one_skipped_notice() -> None:
    bus = EventBus(first_id=0)
    slow = bus.subscribe()
    fast = bus.subscribe()
    fast_got: list[Event] = []

    async def read_fast() -> None:
        async for event in fast:
            fast_got.append(event)
            if event.name == "result":
                return

    reader = asyncio.create_task(read_fast())
    published = [bus.publish("start", {"job": "j"})]
    for n in range(5000):
        published.append(bus.publish(wire.LOG, log_data(n)))
        if n % 1000 == 999:
            published.append(bus.publish("loading", {"job": "j", "n": n}))
        if n % 50 == 0:
            await asyncio.sleep(0)  # the fast reader keeps up; the slow one reads nothing
    published += [bus.publish(name, {"job": "j"}) for name in ("ready", "result")]
    await asyncio.wait_for(reader, TIMEOUT)

    assert slow.dropped is False
    assert fast.dropped is False
    assert slow in bus._subscribers
    got = available(slow)
    logs = [e for e in published if e.name == wire.LOG]
    kept, skipped = logs[-LOG_QUEUE_SIZE:], logs[:-LOG_QUEUE_SIZE]
    # Every stage, in order, and the newest LOG_QUEUE_SIZE lines.
    stages = [e for e in published if e.name != wire.LOG]
    assert [e for e in got if e.name != wire.LOG] == stages
    assert [e.name for e in stages] == ["start"] + ["loading"] * 5 + ["ready", "result"]
    notices = [e for e in got if "skipped" in e.data]
    assert len(notices) == 1
    notice = notices[0]
    assert [e for e in got if e.name == wire.LOG and e is not notice] == kept
    # Told once, in order: where the last skipped line was, with that line's shape.
    assert notice.name == wire.LOG
    assert notice.id == skipped[-1].id
    assert [e.id for e in got] == sorted(e.id for e in got)
    text = f"{len(skipped)} engine log lines skipped: this reader fell behind"
    assert notice.data == {**skipped[-1].data, "line": text, "message": text, "skipped": 4744}
    assert slow.skipped_total == len(skipped) == 5000 - LOG_QUEUE_SIZE
    # A reader that kept up got everything, and no notice.
    assert fast_got == published
    assert fast.skipped_total == 0


async def test_the_notice_is_sent_once_per_gap_and_only_after_one() -> None:
    bus = EventBus(first_id=0)
    subscription = bus.subscribe()
    for n in range(LOG_QUEUE_SIZE):
        bus.publish(wire.LOG, log_data(n))
    got = available(subscription)
    assert [e.data["line"] for e in got] == [f"line {n}" for n in range(LOG_QUEUE_SIZE)]

    for n in range(LOG_QUEUE_SIZE + 3):
        bus.publish(wire.LOG, log_data(n))
    got = available(subscription)
    assert [e.data.get("skipped") for e in got[:2]] == [3, None]
    assert got[0].data["line"] == "3 engine log lines skipped: this reader fell behind"
    assert [e.data["line"] for e in got[1:]] == [f"line {n}" for n in range(3, LOG_QUEUE_SIZE + 3)]
    assert available(subscription) == []

    # The notice stands where the last skipped line stood: after a stage before it ...
    stage = bus.publish("loading", {"job": "j"})
    for n in range(LOG_QUEUE_SIZE + 10):
        bus.publish(wire.LOG, log_data(n))
    got = available(subscription)
    assert got[0] == stage
    assert got[1].data["skipped"] == 10
    assert len(got) == 2 + LOG_QUEUE_SIZE

    # ... and before a stage after it, with the lines that were kept on either side.
    for n in range(LOG_QUEUE_SIZE):
        bus.publish(wire.LOG, log_data(n))
    stage = bus.publish("loading", {"job": "j"})
    for n in range(10):
        bus.publish(wire.LOG, log_data(1000 + n))
    got = available(subscription)
    assert got[0].data["skipped"] == 10
    assert got[0].data["line"] == got[0].data["message"]
    assert [e.data["line"] for e in got[1 : LOG_QUEUE_SIZE - 9]] == [
        f"line {n}" for n in range(10, LOG_QUEUE_SIZE)
    ]
    assert got[LOG_QUEUE_SIZE - 9] == stage
    assert [e.data["line"] for e in got[LOG_QUEUE_SIZE - 8 :]] == [
        f"line {1000 + n}" for n in range(10)
    ]
    assert subscription.dropped is False


async def test_a_waiting_reader_is_woken_by_a_log_line_and_by_a_notice() -> None:
    bus = EventBus(first_id=0)
    subscription = bus.subscribe()
    reader = asyncio.create_task(take(subscription, 2))
    await asyncio.sleep(0)
    bus.publish(wire.LOG, log_data(0))
    bus.publish("ready", {"job": "j"})
    got = await asyncio.wait_for(reader, TIMEOUT)
    assert [e.name for e in got] == [wire.LOG, "ready"]


async def test_a_summary_that_is_skipped_counts_its_lines() -> None:
    bus = EventBus(first_id=0)
    subscription = bus.subscribe()
    bus.publish(wire.LOG, {**log_data(0), "line": "40 more lines from m", "skipped": 40})
    for n in range(LOG_QUEUE_SIZE):
        bus.publish(wire.LOG, log_data(n))
    got = available(subscription)
    assert got[0].data["skipped"] == 40
    assert got[0].data["line"] == "40 engine log lines skipped: this reader fell behind"


async def test_log_lines_never_get_a_reader_dropped() -> None:
    bus = EventBus(first_id=0)
    subscription = bus.subscribe()
    for n in range(SUBSCRIBER_QUEUE_SIZE * 10):
        bus.publish(wire.LOG, log_data(n))
    for _ in range(SUBSCRIBER_QUEUE_SIZE):  # exactly the stage allowance on top
        bus.publish("loading", {"job": "j"})
    assert subscription.dropped is False
    got = available(subscription)
    assert len(got) == 1 + LOG_QUEUE_SIZE + SUBSCRIBER_QUEUE_SIZE


async def test_a_reader_that_reads_nothing_while_1100_stages_pass_is_dropped() -> None:
    bus = EventBus(first_id=0)
    stalled = bus.subscribe()
    readers = [bus.subscribe(), bus.subscribe()]
    received: list[list[int]] = [[], []]
    total = 1100

    async def keep_reading(index: int) -> None:
        async for event in readers[index]:
            received[index].append(event.id)
            if event.name == "result":
                return

    tasks = [asyncio.create_task(keep_reading(i)) for i in range(2)]
    for n in range(total):
        bus.publish("loading", {"n": n})
        bus.publish(wire.LOG, log_data(n))
        if n % 100 == 0:
            await asyncio.sleep(0)
    last = bus.publish("result", {})
    assert stalled.dropped is True
    assert bus.subscriber_count == 2  # only the stalled one left the bus
    assert await drain(stalled) == []
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert received == [list(range(1, last.id + 1))] * 2
    assert [reader.dropped for reader in readers] == [False, False]


async def test_replayed_log_lines_do_not_count_against_the_live_allowance() -> None:
    bus = EventBus(first_id=0)
    for n in range(LOG_QUEUE_SIZE + 50):
        bus.publish(wire.LOG, log_data(n))
    subscription = bus.subscribe(bus.missed_since(0))
    for n in range(LOG_QUEUE_SIZE):
        bus.publish(wire.LOG, log_data(n))
    got = available(subscription)
    assert [e.id for e in got] == list(range(1, 2 * LOG_QUEUE_SIZE + 51))
    assert subscription.skipped_total == 0


def test_an_event_is_encoded_once() -> None:
    event = Event(1, "ready", {"model": "m"})
    assert event.json() is event.json()
    assert event == Event(1, "ready", {"model": "m"})


# ---- how many log lines a load publishes ----------------------------------------------


def test_log_rate_admits_a_burst_then_so_many_a_second() -> None:
    rate = LogRate(rate=100.0, burst=200, every=1.0)
    admitted = [rate.admit("job", "m", 0.0) for _ in range(250)]
    assert admitted == [(True, 0)] * 200 + [(False, 0)] * 50
    # Half a second later: 50 more tokens; the held lines are not due yet.
    assert [rate.admit("job", "m", 0.5) for _ in range(51)] == [(True, 0)] * 50 + [(False, 0)]
    # A second after the first held line: this line is admitted, the 51 held are due.
    assert rate.admit("job", "m", 1.0) == (True, 51)
    assert rate.flush("job") == ("m", 0)
    assert rate.flush("job") == ("", 0)  # forgotten
    assert rate.admit("job", "m", 1.0) == (True, 0)  # a fresh allowance


def test_log_rate_counts_held_lines_until_flushed_and_keeps_jobs_apart() -> None:
    rate = LogRate(rate=100.0, burst=2, every=1.0, max_keys=2)
    assert [rate.admit("a", "m", 0.0)[0] for _ in range(5)] == [True, True, False, False, False]
    assert rate.admit("b", "n", 0.0) == (True, 0)
    assert rate.flush("a") == ("m", 3)
    rate.admit("c", "o", 0.0)
    rate.admit("d", "p", 0.0)  # past max_keys: the oldest ("b") is forgotten
    assert rate.flush("b") == ("", 0)
