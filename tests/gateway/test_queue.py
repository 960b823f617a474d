"""The admission queue: its order, its bounds, its answers to time and to clients leaving,
and its invariants under any sequence of events (hypothesis)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import MAX_PRIORITY, MIN_PRIORITY, QueueConfig
from exporter.gateway.queue import WAITING, AdmissionQueue, Rejected, Ticket
from exporter.gateway.stats import (
    CANCELLED,
    DISPATCHED,
    QUEUE_OUTCOMES,
    REJECTED_FULL,
    REJECTED_TIMEOUT,
    QueueStats,
)
from llamacpp_server import LlamaCppServer
from tests.gateway.helpers import chat_body, gatewayed, own_metrics, through_gateway
from tests.helpers import Running
from tests.standins import StandIn, delayed, json_reply, ollama_routes


def queue_of(**options: object) -> AdmissionQueue:
    config = QueueConfig(**{"max_concurrent": 1, "max_waiting": 8, **options})  # type: ignore[arg-type]
    return AdmissionQueue(config, QueueStats())


def test_requests_beyond_the_slots_wait_and_take_slots_as_they_free() -> None:
    queue = queue_of(max_concurrent=2)
    first, second, third = (queue.arrive(0, now=0.0) for _ in range(3))
    assert (first.state, second.state, third.state) == (DISPATCHED, DISPATCHED, WAITING)
    assert (queue.running, queue.waiting) == (2, 1)
    queue.release(first, now=1.0)
    assert third.state == DISPATCHED
    assert (queue.running, queue.waiting) == (2, 0)
    assert queue.stats.wait[DISPATCHED].observed == 3
    assert queue.stats.wait[DISPATCHED].total == pytest.approx(1.0)  # only the third waited


def test_higher_priority_goes_first_and_equal_priority_in_arrival_order() -> None:
    queue = queue_of(aging=10.0)
    holder = queue.arrive(0, now=0.0)
    low_a, low_b = queue.arrive(-1, now=1.0), queue.arrive(-1, now=1.5)
    high_a, high_b = queue.arrive(3, now=2.0), queue.arrive(3, now=2.5)
    order = []
    current = holder
    for step in range(4):
        queue.release(current, now=3.0 + step)
        current = next(t for t in (low_a, low_b, high_a, high_b) if t.state == DISPATCHED)
        order.append(current)
    assert order == [high_a, high_b, low_a, low_b]


def test_aging_lets_a_low_priority_request_pass_later_high_ones() -> None:
    """Documented rule: a request never waits behind one that arrived more than
    (MAX_PRIORITY - its priority) * aging after it."""
    aging = 2.0
    queue = queue_of(aging=aging, max_waiting=1000)
    holder = queue.arrive(0, now=0.0)
    low = queue.arrive(MIN_PRIORITY, now=0.0)
    bound = (MAX_PRIORITY - MIN_PRIORITY) * aging  # 40 s
    # Top-priority requests keep arriving, one a second, and one slot serves one a second.
    current, now = holder, 0.0
    highs: list[Ticket] = []
    served_first: list[Ticket] = []
    while low.state == WAITING and now < 10 * bound:
        now += 1.0
        highs.append(queue.arrive(MAX_PRIORITY, now=now))
        queue.release(current, now=now)
        current = next(t for t in (low, *highs) if t.state == DISPATCHED)
        if current is not low:
            served_first.append(current)
    assert low.state == DISPATCHED
    assert served_first, "the high priority went first while it could"
    assert max(t.arrived for t in served_first) < low.arrived + bound
    assert low.dispatched_at == pytest.approx(bound)


def test_a_full_queue_rejects_at_once() -> None:
    queue = queue_of(max_waiting=1)
    queue.arrive(0, now=0.0)
    queue.arrive(0, now=0.0)
    rejected = queue.arrive(5, now=0.0)  # priority does not buy a place beyond max_waiting
    assert rejected.state == REJECTED_FULL
    assert queue.stats.wait[REJECTED_FULL].observed == 1
    assert queue.stats.recent_rejections(now=30.0) == 1
    assert queue.stats.recent_rejections(now=61.0) == 0


def test_retry_after_follows_the_service_rate() -> None:
    queue = queue_of(max_concurrent=2, max_waiting=8, max_wait=45.0)
    assert queue.retry_after() == 45  # nothing served yet: the longest a request would wait
    tickets = [queue.arrive(0, now=0.0) for _ in range(2)]
    for ticket in tickets:
        queue.release(ticket, now=4.0)  # each took 4 s: two slots serve 0.5 requests a second
    assert queue.stats.service_rate == pytest.approx(0.5)
    for _ in range(2):
        queue.arrive(0, now=4.0)
    for _ in range(5):
        queue.arrive(0, now=4.0)
    assert queue.waiting == 5
    assert queue.retry_after() == math.ceil((5 + 1) / 0.5)


def test_more_slots_on_reconfigure_dispatch_waiting_requests() -> None:
    queue = queue_of(max_concurrent=1)
    queue.arrive(0, now=0.0)
    waiting = [queue.arrive(0, now=0.0) for _ in range(3)]
    queue.configure(QueueConfig(max_concurrent=3, max_waiting=8), now=1.0)
    assert [t.state for t in waiting] == [DISPATCHED, DISPATCHED, WAITING]
    assert queue.stats.max_concurrent == 3


async def test_a_waiting_request_times_out_with_a_retry_after() -> None:
    queue = queue_of(max_wait=0.05)
    loop = asyncio.get_running_loop()
    holder = await queue.admit(0, clock=loop.time, loop=loop)
    with pytest.raises(Rejected) as rejected:
        await queue.admit(0, clock=loop.time, loop=loop)
    assert rejected.value.outcome == REJECTED_TIMEOUT
    assert rejected.value.retry_after >= 1
    assert (queue.waiting, queue.running) == (0, 1)
    queue.release(holder, loop.time())
    assert queue.running == 0


async def test_a_cancelled_wait_leaves_the_queue_at_once() -> None:
    queue = queue_of()
    loop = asyncio.get_running_loop()
    holder = await queue.admit(0, clock=loop.time, loop=loop)
    waiter = asyncio.ensure_future(queue.admit(0, clock=loop.time, loop=loop))
    await asyncio.sleep(0)
    assert queue.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.waiting == 0
    assert queue.stats.wait[CANCELLED].observed == 1
    queue.release(holder, loop.time())
    assert queue.running == 0  # the slot went to nobody


async def test_a_request_cancelled_as_it_is_dispatched_passes_its_slot_on() -> None:
    queue = queue_of()
    loop = asyncio.get_running_loop()
    holder = await queue.admit(0, clock=loop.time, loop=loop)
    first = asyncio.ensure_future(queue.admit(0, clock=loop.time, loop=loop))
    second = asyncio.ensure_future(queue.admit(0, clock=loop.time, loop=loop))
    await asyncio.sleep(0)
    queue.release(holder, loop.time())  # dispatches first, which is cancelled before it runs
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    ticket = await asyncio.wait_for(second, 1)
    assert ticket.state == DISPATCHED
    assert queue.running == 1


# Property-based: any sequence of arrivals, releases, timeouts, cancellations, time passing
# and reconfigurations; each step is (what, a number, another number).
# Arrivals and releases weigh most, so queues form and drain often.
ACTIONS = ("arrive",) * 4 + ("release",) * 3 + ("time_out", "cancel", "tick", "reconfigure")
steps_of = st.lists(
    st.tuples(st.sampled_from(ACTIONS), st.integers(-15, 1000), st.integers(0, 6)), max_size=200
)


@settings(max_examples=300, deadline=None)
@given(
    max_concurrent=st.integers(1, 4),
    max_waiting=st.integers(0, 6),
    aging=st.floats(0.01, 20),
    steps=steps_of,
)
def test_queue_invariants(
    max_concurrent: int, max_waiting: int, aging: float, steps: list[tuple[str, int, int]]
) -> None:
    queue = queue_of(max_concurrent=max_concurrent, max_waiting=max_waiting, aging=aging)
    tickets: list[Ticket] = []
    ends: dict[int, list[str]] = {}
    now = 0.0

    def order(ticket: Ticket) -> float:
        return ticket.arrived - ticket.priority * queue.config.aging

    for action, number, other in steps:
        before = {id(t): t.state for t in tickets}
        waiting_before = [t for t in tickets if t.state == WAITING]
        held = [t for t in tickets if t.state == DISPATCHED]
        if action == "arrive":  # a priority from -12 to 12 (the queue clamps to -10..10)
            tickets.append(queue.arrive(number % 25 - 12, now))
        elif action == "release" and held:
            queue.release(held[number % len(held)], now)
        elif action in ("time_out", "cancel") and waiting_before:
            outcome = REJECTED_TIMEOUT if action == "time_out" else CANCELLED
            queue.withdraw(waiting_before[number % len(waiting_before)], outcome, now)
        elif action == "tick":
            now += abs(number) % 30 / 3
        elif action == "reconfigure":
            slots = 1 + abs(number) % 4
            config = QueueConfig(max_concurrent=slots, max_waiting=other, aging=aging)
            queue.configure(config, now)
        # Each ticket's wait ends exactly once: waiting -> one outcome, then maybe released.
        for ticket in tickets:
            old = before.get(id(ticket))
            if ticket.state != old and ticket.state in QUEUE_OUTCOMES:
                ends.setdefault(id(ticket), []).append(ticket.state)
            if old is not None and old != WAITING:
                assert ticket.state in (old, "released"), (old, ticket.state)
        # Dispatched in order: each newly dispatched waiter came before every one still waiting.
        newly = [t for t in waiting_before if t.state == DISPATCHED]
        still = [t for t in tickets if t.state == WAITING]
        for ticket in newly:
            assert all(order(ticket) <= order(other) for other in still)
        running = sum(t.state == DISPATCHED for t in tickets)
        waiting = sum(t.state == WAITING for t in tickets)
        assert running == queue.running
        # Never more dispatched than max_concurrent (fewer slots after a reconfigure leave
        # those already dispatched to finish, and dispatch nothing more until below it).
        if any(t.state == DISPATCHED and before.get(id(t)) != DISPATCHED for t in tickets):
            assert running <= queue.config.max_concurrent
        assert waiting == queue.waiting
        # New arrivals never push the waiting beyond max_waiting (a reconfigure that shrank
        # it lets those already waiting stay).
        if action == "arrive":
            assert tickets[-1].state != WAITING or waiting <= queue.config.max_waiting
        # No slot idles while a request waits.
        assert not waiting or running >= queue.config.max_concurrent
        assert sum(queue.stats.waiting_by_priority.values()) == waiting
    assert all(len(outcomes) == 1 for outcomes in ends.values())
    ended = sum(1 for t in tickets if t.state != WAITING)
    assert sum(queue.stats.wait[o].observed for o in QUEUE_OUTCOMES) == ended


# Through the gateway: a real one-slot llama.cpp server behind a queue, and stand-ins where a
# provider's answer must be held for a known time.


async def waiting_gauge(exporter: Running, priority: str | None = None) -> float:
    """The gateway's waiting requests (of one priority, or all)."""
    scrape = await exporter.scrape()
    labels = (
        {"provider": "llama"} if priority is None else {"provider": "llama", "priority": priority}
    )
    return sum(v for _, v in scrape.all("llm_gateway_queue_waiting", **labels))


async def until(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 10) -> None:
    """Poll check() until it is true (bounded in time and count)."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.02) + 1):
        if await check():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@asynccontextmanager
async def holding_the_slot(gateway: str) -> AsyncIterator[None]:
    """A long streamed generation through the gateway, holding the one slot until the block
    ends (its client then leaves, which frees the slot at once)."""
    async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
        body = chat_body(0, True, max_tokens=4000, ignore_eos=True)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.aiter_lines()
            await anext(lines)  # generating: it holds the slot
            yield


async def test_the_cap_keeps_the_queue_in_the_gateway_not_in_the_server(
    long_generation: LlamaCppServer,
) -> None:
    queue = "queue: {max_concurrent: 1, max_waiting: 8}"
    seen: dict[str, list[float]] = {"processing": [], "deferred": [], "waiting": []}
    with long_generation as server:
        async with through_gateway(server, queue) as (exporter, gateway):

            async def watch() -> None:
                for _ in range(5000):
                    own = await own_metrics(server.url)
                    seen["processing"].append(own["llamacpp:requests_processing"])
                    seen["deferred"].append(own["llamacpp:requests_deferred"])
                    seen["waiting"].append(await waiting_gauge(exporter))
                    await asyncio.sleep(0.02)

            async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:
                watcher = asyncio.ensure_future(watch())
                bodies = [chat_body(i, False, max_tokens=150, ignore_eos=True) for i in range(6)]
                answers = await asyncio.gather(
                    *(client.post("/v1/chat/completions", json=body) for body in bodies)
                )
                watcher.cancel()
            scrape = await exporter.scrape()
    assert [a.status_code for a in answers] == [200] * 6
    assert [a.json()["usage"]["completion_tokens"] for a in answers] == [150] * 6
    assert max(seen["processing"]) == 1
    assert max(seen["deferred"]) == 0, "requests queued in llama.cpp, not in the gateway"
    assert max(seen["waiting"]) >= 4
    dispatched = scrape.value(
        "llm_gateway_queue_wait_seconds_count", provider="llama", outcome="dispatched"
    )
    assert dispatched == 6
    assert scrape.value("llm_gateway_queue_running", provider="llama") == 0
    rate = scrape.value("llm_gateway_queue_service_rate", provider="llama")
    assert rate is not None and rate > 0


async def test_higher_priorities_are_dispatched_first(long_generation: LlamaCppServer) -> None:
    queue = "queue: {max_concurrent: 1, priority_header: X-Priority}"
    finished: list[str] = []
    with long_generation as server:
        async with through_gateway(server, queue) as (exporter, gateway):
            async with httpx.AsyncClient(base_url=gateway, timeout=120) as client:

                async def ask(name: str, priority: int) -> None:
                    body = chat_body(len(finished), False, max_tokens=20, ignore_eos=True)
                    headers = {"X-Priority": str(priority)}
                    answer = await client.post("/v1/chat/completions", json=body, headers=headers)
                    assert answer.status_code == 200
                    finished.append(name)

                tasks = []
                async with holding_the_slot(gateway):
                    for name, priority, waiting in (
                        ("low-1", -5, 1), ("low-2", -5, 2), ("high-1", 5, 3), ("high-2", 5, 4)
                    ):  # fmt: skip
                        tasks.append(asyncio.ensure_future(ask(name, priority)))

                        async def queued(count: int = waiting) -> bool:
                            return await waiting_gauge(exporter) == count

                        await until(queued, f"{waiting} waiting")
                    assert await waiting_gauge(exporter, "-5") == 2
                    assert await waiting_gauge(exporter, "5") == 2
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
    # One slot: each finished before the next was dispatched.
    assert finished == ["high-1", "high-2", "low-1", "low-2"]


async def test_a_client_leaving_the_queue_never_reaches_the_server(
    long_generation: LlamaCppServer,
) -> None:
    queue = "queue: {max_concurrent: 1}"
    with long_generation as server:
        async with through_gateway(server, queue) as (exporter, gateway):
            async with httpx.AsyncClient(base_url=gateway, timeout=60) as client:
                async with holding_the_slot(gateway):
                    prompts_before = await prompt_tokens(server.url)
                    body = chat_body(42, False, max_tokens=20)
                    leaving = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))

                    async def one_waiting() -> bool:
                        return await waiting_gauge(exporter) == 1

                    await until(one_waiting, "the request to wait")
                    leaving.cancel()  # the client closes its connection

                    async def none_waiting() -> bool:
                        return await waiting_gauge(exporter) == 0

                    await until(none_waiting, "the queue to drop it", seconds=2)
            # The slot is free now; give a leaked request time to reach the server.
            await asyncio.sleep(0.5)
            prompts_after = await prompt_tokens(server.url)
            scrape = await exporter.scrape()
    assert prompts_after == prompts_before, "the request that left reached the server"
    cancelled = scrape.value(
        "llm_gateway_queue_wait_seconds_count", provider="llama", outcome="cancelled"
    )
    assert cancelled == 1
    abandoned = scrape.all("llm_gateway_requests_total", provider="llama", outcome="abandoned")
    assert sum(v for _, v in abandoned) == 2  # the waiting one and the slot holder


async def prompt_tokens(url: str) -> float:
    """Every prompt token llama.cpp has taken in, evaluated or from its cache."""
    own = await own_metrics(url)
    return own["llamacpp:prompt_tokens_total"] + own["llamacpp:prompt_tokens_cached_total"]


async def test_overflow_and_timeout_answer_with_retry_after_in_the_apis_shape() -> None:
    slow = delayed(1.5, json_reply({"choices": [], "usage": {}}))
    ollama_slow = delayed(1.5, json_reply({"done": True}))
    routes = ollama_routes(**{"/v1/chat/completions": slow, "/api/chat": ollama_slow})
    gateway = "queue: {max_concurrent: 1, max_waiting: 1, max_wait: 300ms, overflow_status: %d}"
    for status in (429, 503):
        async with (
            StandIn(routes) as upstream,
            gatewayed(upstream.url, kind="ollama", gateway=gateway % status) as (exporter, client),
        ):
            holder = asyncio.ensure_future(client.post("/v1/chat/completions", json={"model": "m"}))
            await until(lambda: _running(exporter), "the slot to be taken")
            waiter = asyncio.ensure_future(client.post("/api/chat", json={"model": "m"}))
            await until(lambda: _waiting(exporter), "a request to wait")
            full = await client.post("/v1/chat/completions", json={"model": "m"})
            timed_out = await waiter
            assert (await holder).status_code == 200
            scrape = await exporter.scrape()
            health = (await exporter.http.get("/health")).json()
        assert (full.status_code, timed_out.status_code) == (status, status)
        assert full.json()["error"]["code"] == status
        assert full.json()["error"]["type"] in ("rate_limit_error", "unavailable_error")
        assert isinstance(timed_out.json()["error"], str)  # Ollama's shape for /api/
        for answer in (full, timed_out):
            assert int(answer.headers["Retry-After"]) >= 1
        # Only the holder got through.
        assert (upstream.hits["/v1/chat/completions"], upstream.hits.get("/api/chat")) == (1, None)
        rejections = {
            labels["reason"]: value
            for labels, value in scrape.all("llm_gateway_queue_rejections_total", provider="p")
        }
        assert rejections == {"queue_full": 1, "wait_timeout": 1}
        assert sum(v for _, v in scrape.all("llm_gateway_requests_total", outcome="rejected")) == 2
        provider = health["components"]["provider/p"]
        assert provider["status"] == "degraded"
        assert "gateway queue turned away 2 requests" in provider["reason"]


async def _running(exporter: Running) -> bool:
    return (await exporter.scrape()).value("llm_gateway_queue_running", provider="p") == 1


async def _waiting(exporter: Running) -> bool:
    scrape = await exporter.scrape()
    return sum(v for _, v in scrape.all("llm_gateway_queue_waiting", provider="p")) == 1
