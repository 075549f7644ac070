"""Greedy adaptive batching: a batch leaves as soon as the model is free.

BentoML's dispatcher (bentoml/_internal/marshal/dispatcher.py, pinned 1.4.40) batches requests that
arrive while the model is busy, which is what we want, and on top of that holds requests back by a
learned `wait`: the average queueing time of recent batches. After a burst of load that average is
large (a request queued behind a full batch), so afterwards even a lone request is held back about as
long (measured here: 116 ms at concurrency 1 after a concurrency-64 run, against 7 ms before it), and
since each held request feeds the average again it recovers only slowly. Capping the learned wait
(default: at 0) keeps the batching under load and removes the added latency when load is light.
"""
from __future__ import annotations

from bentoml._internal.marshal import dispatcher as _dispatcher


class GreedyOptimizer(_dispatcher.Optimizer):
    max_wait_s = 0.0

    def trigger_refresh(self):
        super().trigger_refresh()
        self.wait = min(self.wait, self.max_wait_s)


def install(max_wait_ms: int) -> None:
    """Use GreedyOptimizer in every CorkDispatcher created from now on (call before serving starts)."""
    GreedyOptimizer.max_wait_s = max_wait_ms / 1000.0
    _dispatcher.Optimizer = GreedyOptimizer
