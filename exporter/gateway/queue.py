"""The admission queue: at most max_concurrent requests at the provider at once, up to
max_waiting more waiting in priority order, none waiting longer than max_wait.

Order: a request of priority p that arrived at t is dispatched before one of priority q
that arrived at u exactly when t - p * aging < u - q * aging (ties: first come). Within a
priority that is first come, first served; across priorities, each step of priority is
worth `aging` seconds of waiting, so a request never waits behind one that arrived more
than (MAX_PRIORITY - p) * aging after it: no priority starves.

The core (arrive, release, withdraw) is synchronous and takes the time as an argument, so
its invariants can be checked step by step; admit() is the asynchronous door the proxy
uses.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import MAX_PRIORITY, MIN_PRIORITY, QueueConfig
from .stats import CANCELLED, DISPATCHED, REJECTED_FULL, REJECTED_TIMEOUT, QueueStats

WAITING = "waiting"
RELEASED = "released"
# Retry-After is never more than this (an hour), whatever the estimate.
MAX_RETRY_AFTER_SECONDS = 3600
# Weight of the newest service time in the moving average the service rate comes from.
SERVICE_TIME_WEIGHT = 0.2


class Rejected(Exception):
    """The queue turned a request away: full on arrival, or waited max_wait."""

    def __init__(self, outcome: str, retry_after: int) -> None:
        super().__init__(outcome)
        self.outcome = outcome  # REJECTED_FULL or REJECTED_TIMEOUT
        self.retry_after = retry_after  # whole seconds


@dataclass(eq=False)
class Ticket:
    """One request's place: waiting, dispatched (holding a slot), then released or gone."""

    priority: int
    arrived: float
    state: str = WAITING
    dispatched_at: float | None = None
    # Called once when a waiting ticket is dispatched (admit() wakes its request with it).
    on_dispatch: Callable[[], None] | None = field(default=None, repr=False)


def clamp_priority(priority: int) -> int:
    """A priority within MIN_PRIORITY..MAX_PRIORITY."""
    return max(MIN_PRIORITY, min(MAX_PRIORITY, priority))


class AdmissionQueue:
    """The slots of one provider and the requests waiting for them."""

    def __init__(self, config: QueueConfig, stats: QueueStats) -> None:
        self.config = config
        self.stats = stats
        self._heap: list[tuple[float, int, Ticket]] = []
        self._order = itertools.count()
        self._service_seconds: float | None = None  # moving average, dispatch to release
        self._publish_limits()

    @property
    def running(self) -> int:
        """Dispatched requests holding a slot."""
        return self.stats.running

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self.stats.waiting

    def configure(self, config: QueueConfig, now: float) -> None:
        """Take new limits; more slots dispatch waiting requests at once. Requests already
        waiting stay even if max_waiting shrank (new ones are refused until below it)."""
        self.config = config
        self._publish_limits()
        self._dispatch_next(now)

    def arrive(self, priority: int, now: float) -> Ticket:
        """A request asks for a slot: dispatched at once, waiting, or rejected (full)."""
        ticket = Ticket(clamp_priority(priority), now)
        if self.stats.running < self.config.max_concurrent and not self.stats.waiting:
            self._dispatch(ticket, now)
        elif self.stats.waiting >= self.config.max_waiting:
            self._end(ticket, REJECTED_FULL, now)
        else:
            order = now - ticket.priority * self.config.aging
            heapq.heappush(self._heap, (order, next(self._order), ticket))
            self.stats.add_waiting(ticket.priority, 1)
        return ticket

    def release(self, ticket: Ticket, now: float, *, served: bool = True) -> None:
        """A dispatched request is done with its slot: the next waiting one gets it. Its
        time at the provider counts towards the service rate if it was served there."""
        if ticket.state != DISPATCHED:
            return
        ticket.state = RELEASED
        self.stats.running -= 1
        if served:
            assert ticket.dispatched_at is not None
            seconds = now - ticket.dispatched_at
            average = self._service_seconds
            if average is not None:
                seconds = average + SERVICE_TIME_WEIGHT * (seconds - average)
            self._service_seconds = seconds
            rate = self.config.max_concurrent / seconds if seconds > 0 else None
            self.stats.service_rate = rate
        self._dispatch_next(now)

    def withdraw(self, ticket: Ticket, outcome: str, now: float) -> None:
        """A waiting request leaves: it timed out (REJECTED_TIMEOUT) or its client went
        away (CANCELLED)."""
        if ticket.state != WAITING:
            return
        self.stats.add_waiting(ticket.priority, -1)
        self._end(ticket, outcome, now)
        # Withdrawn tickets stay in the heap until popped; rebuild once most are dead.
        if len(self._heap) > 2 * self.stats.waiting + 64:
            self._heap = [entry for entry in self._heap if entry[2].state == WAITING]
            heapq.heapify(self._heap)

    def retry_after(self) -> int:
        """Whole seconds until a request turned away now could expect a slot: everything
        waiting, then itself, served at the recent service rate."""
        rate = self.stats.service_rate
        seconds = (self.stats.waiting + 1) / rate if rate else self.config.max_wait
        return max(1, min(MAX_RETRY_AFTER_SECONDS, math.ceil(seconds)))

    async def admit(
        self, priority: int, *, clock: Callable[[], float], loop: asyncio.AbstractEventLoop
    ) -> Ticket:
        """Wait for a slot; raises Rejected if the queue is full or the wait exceeds max_wait.
        A caller cancelled while waiting (its client went away) leaves the queue at once."""
        ticket = self.arrive(priority, clock())
        if ticket.state == DISPATCHED:
            return ticket
        if ticket.state == REJECTED_FULL:
            raise Rejected(REJECTED_FULL, self.retry_after())
        woken = loop.create_future()

        def wake() -> None:
            if not woken.done():
                woken.set_result(None)

        def time_out() -> None:
            self.withdraw(ticket, REJECTED_TIMEOUT, clock())
            wake()

        ticket.on_dispatch = wake
        timer = loop.call_later(self.config.max_wait, time_out)
        try:
            await woken
        except asyncio.CancelledError:
            if ticket.state == DISPATCHED:  # dispatched as the client left: pass the slot on
                self.release(ticket, clock(), served=False)
            else:
                self.withdraw(ticket, CANCELLED, clock())
            raise
        finally:
            timer.cancel()
        if ticket.state != DISPATCHED:
            raise Rejected(REJECTED_TIMEOUT, self.retry_after())
        return ticket

    def _publish_limits(self) -> None:
        self.stats.max_concurrent = self.config.max_concurrent
        self.stats.max_waiting = self.config.max_waiting

    def _dispatch_next(self, now: float) -> None:
        while self._heap and self.stats.running < self.config.max_concurrent:
            ticket = heapq.heappop(self._heap)[2]
            if ticket.state != WAITING:
                continue
            self.stats.add_waiting(ticket.priority, -1)
            self._dispatch(ticket, now)
            if ticket.on_dispatch is not None:
                ticket.on_dispatch()

    def _dispatch(self, ticket: Ticket, now: float) -> None:
        self.stats.running += 1
        ticket.dispatched_at = now
        self._end(ticket, DISPATCHED, now)

    def _end(self, ticket: Ticket, outcome: str, now: float) -> None:
        """The ticket's wait is over, as outcome says: counted once."""
        ticket.state = outcome
        self.stats.waited(outcome, now - ticket.arrived, now)
