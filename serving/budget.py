"""Byte budgets: how much memory the requests of one worker may hold at once.

Two per worker (serving/http_io.py): the bytes that in-flight requests hold (their bodies, the parsed
copies of them, their model inputs), taken without waiting by the event loop (a request that does not
fit is answered 503 at once); and the working memory of the images being decoded, taken by the decode
threads, which wait (up to a deadline) for room. A request can never hold a byte it has not reserved,
so the sum of the two budgets bounds what requests add to a worker's memory.
"""
from __future__ import annotations

import threading
import time


class BudgetExceeded(Exception):
    """No room in the budget (now, or before the deadline)."""


class ByteBudget:
    def __init__(self, capacity: int, name: str = "bytes"):
        self.capacity, self.name = int(capacity), name
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition(threading.Lock())

    def try_take(self, n: int) -> bool:
        """Reserve n bytes if they fit now (never waits: safe on the event loop)."""
        with self._cond:
            if self.used + n > self.capacity:
                return False
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def take(self, n: int, timeout: float) -> None:
        """Reserve n bytes, waiting up to `timeout` seconds for room (for worker threads only)."""
        if n > self.capacity:
            raise BudgetExceeded(f"{n} bytes is more than the whole {self.name} budget of {self.capacity}")
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.used + n > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    if self.used + n > self.capacity:
                        raise BudgetExceeded(f"no room for {n} bytes in the {self.name} budget "
                                             f"({self.used} of {self.capacity} in use) within {timeout:g} s")
            self.used += n
            self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        if n <= 0:
            return
        with self._cond:
            self.used = max(0, self.used - n)
            self._cond.notify_all()


class Reservation:
    """The bytes one request holds in a budget; grows as the request reads, released once."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: ByteBudget):
        self.budget, self.held = budget, 0

    def grow_to(self, n: int) -> bool:
        """Hold n bytes in all (no-op if already as many). False if the budget has no room now."""
        if n <= self.held:
            return True
        if not self.budget.try_take(n - self.held):
            return False
        self.held = n
        return True

    def shrink_to(self, n: int) -> None:
        if n < self.held:
            self.budget.give(self.held - n)
            self.held = n

    def release(self) -> None:
        self.shrink_to(0)
