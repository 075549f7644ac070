"""The batching queue: images wait here, one FIFO queue per (model, backend), for the worker's inference thread.

`Batcher.submit` puts a request's images in their queue at once, or none of them: past `max_queue`
images in that queue, or `max_bytes` of images in all the queues, it raises QueueFull (the front door
answers 503 + Retry-After; the bound is exact, nothing is estimated). One inference thread per worker
takes the queue whose oldest image has waited longest and runs, as one batch, what waits there (up to
`max_batch` images; with `wait_s` > 0 a batch smaller than that waits up to that long for more). An
image whose deadline passed while it waited is answered 503 without running; one whose request has
gone (its future cancelled) is dropped. The inference itself: the uint8 images stacked and normalised
as one array (an input the Open Inference Protocol sent already normalised, float32, joins it as it
is), the backend's logits, softmax, top-k, one `Prediction` per image (or, for top_k=ROWS, its whole
`Scores`: logits and probabilities, for serving/v2.py); the answers go back to the event loop in one
callback per batch.

A lone request runs where it is: when the caller says no other request is in flight (`alone`), nothing
waits in any queue, the thread is idle, and the backend's last batch of one took at most `inline_max_s`
per image, `submit` runs the batch itself, on the event loop, and returns futures already answered.
That saves the two hand-offs to the thread and back (each wakes a sleeping thread, and the GIL changes
hands) when the service is idle. The loop does nothing else meanwhile: a request arriving then is read
after that one short model call, which it would have waited for anyway (one inference at a time).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from lab.backends import softmax
from lab.preprocess import normalize
from serving.schema import Failure, Label, Prediction

log = logging.getLogger("lab.serving")


class QueueFull(Exception):
    """No room in the queue for this request's images now: 503 with Retry-After."""


ROWS = 0  # a job's top_k asking for its whole rows of logits and probabilities (Scores), not a Prediction


@dataclass(slots=True)
class Scores:
    """One image's whole answer, for the Open Inference Protocol (serving/v2.py)."""
    logits: np.ndarray             # float64 (K,), the backend's logits
    probabilities: np.ndarray      # float64 (K,), softmax of the logits, as a Prediction's probabilities


@dataclass(slots=True)
class Job:
    x: np.ndarray                  # uint8 (H, W, C), the image at the model's size; or float32 (C, H, W) normalised
    top_k: int                     # or ROWS
    preprocess_ms: float
    enqueued: float                # time.perf_counter() when it joined the queue
    deadline: float                # time.perf_counter() past which it is answered 503 instead of run
    future: asyncio.Future


class Batcher:
    def __init__(self, max_batch: int, max_queue: int, max_bytes: int, max_wait_s: float, wait_s: float = 0.0,
                 inline_max_s: float = 0.0):
        self.max_batch, self.max_queue, self.max_bytes = max_batch, max_queue, max_bytes
        self.max_wait_s, self.wait_s, self.inline_max_s = max_wait_s, wait_s, inline_max_s
        self.bytes = 0                                   # bytes of images in all the queues
        self._queues: dict[tuple, deque[Job]] = {}       # (model tag, backend) -> jobs, oldest first
        self._models: dict[tuple, tuple] = {}            # (model tag, backend) -> (ServedModel, backend name)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._wake_scheduled = False
        self._busy = False                               # a batch is running, on the thread or on the caller
        self._one_s: dict[tuple, float] = {}             # (model name, backend) -> seconds of its last batch of 1

    # ------------------------------------------------------------ the event loop's side

    def submit(self, model, backend: str, images: list[tuple[np.ndarray, int, float]], alone: bool = False
               ) -> list[asyncio.Future]:
        """Queue a request's images, each (uint8 image, top_k, preprocess ms); one future per image,
        resolved to a Prediction or a Failure. Raises QueueFull; never waits (for the event loop) except
        for a lone request (`alone`: no other in flight) that runs here, see the module's docstring."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        key = (model.tag, backend)
        need = sum(x.nbytes for x, _, _ in images)
        jobs = [Job(x, k, ms, now, now + self.max_wait_s, loop.create_future()) for x, k, ms in images]
        with self._cond:
            if self._closing:
                raise QueueFull("the worker is shutting down")
            queue = self._queues.get(key)
            waiting = len(queue) if queue is not None else 0
            if waiting + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue of {model.tag} on {backend} holds {waiting} images (limit "
                                f"{self.max_queue})")
            if self.bytes + need > self.max_bytes:
                raise QueueFull(f"the queues of this worker hold {self.bytes} bytes of images (limit "
                                f"{self.max_bytes})")
            here = alone and self._may_run_here((model.name, backend), len(jobs))
            if here:
                self._busy = True  # the thread takes nothing until this batch is done
            else:
                if queue is None:
                    queue = self._queues[key] = deque()
                    self._models[key] = (model, backend)
                queue.extend(jobs)
                self.bytes += need
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="lab-inference", daemon=True)
                    self._thread.start()
        if here:
            return self._run_here(model, backend, jobs)
        if not self._wake_scheduled:  # one wake-up per turn of the event loop, whatever it queued
            self._wake_scheduled = True
            loop.call_soon(self._wake)
        return [j.future for j in jobs]

    def _may_run_here(self, key: tuple, images: int) -> bool:
        """Whether a lone request's batch may run on the caller: nothing queued, nothing running, no
        wait for more images asked for (wait_s), and its backend's batch of one known to take at most
        inline_max_s per image. Holds the lock."""
        one = self._one_s.get(key)
        return (not self._busy and self.bytes == 0 and self.wait_s == 0 and one is not None
                and images * one <= self.inline_max_s)

    def _run_here(self, model, backend: str, jobs: list[Job]) -> list[asyncio.Future]:
        try:
            results = self._timed(model, backend, jobs)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify()  # what another event loop queued meanwhile (tests run several)
        for job, result in zip(jobs, results):
            job.future.set_result(result)
        return [j.future for j in jobs]

    def _timed(self, model, backend: str, jobs: list[Job]) -> list[Prediction | Failure]:
        """predict(), remembering how long a batch of one took (what _may_run_here goes by)."""
        t0 = time.perf_counter()
        results = predict(model, backend, jobs)
        if len(jobs) == 1 and not isinstance(results[0], Failure):
            self._one_s[(model.name, backend)] = time.perf_counter() - t0
        return results

    def _wake(self) -> None:
        """Tell the inference thread what this turn of the event loop queued. Waking it once per turn
        rather than per request lets the requests parsed together go as one batch, and keeps the
        thread from taking the GIL between every two requests (with a 32 x 32 JPEG and no model, a
        wake-up per request cost more than the whole rest of the request)."""
        self._wake_scheduled = False
        with self._cond:
            self._cond.notify()

    def waiting(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def close(self, timeout: float = 30.0) -> None:
        """Answer what is queued, then stop the inference thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------ the inference thread

    def _next_batch(self) -> tuple[tuple, list[Job]] | None:
        """The oldest queue's batch (waiting for it); None once closing and empty. Holds the lock."""
        while True:
            ready = [k for k, q in self._queues.items() if q]
            if ready and not self._busy:
                break
            if self._closing and not ready:
                return None
            self._cond.wait()
        key = min(ready, key=lambda k: self._queues[k][0].enqueued)
        queue = self._queues[key]
        if self.wait_s > 0 and len(queue) < self.max_batch and not self._closing:
            until = queue[0].enqueued + self.wait_s
            while len(queue) < self.max_batch and (left := until - time.perf_counter()) > 0:
                self._cond.wait(left)
        batch = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
        self._busy = True
        self.bytes -= sum(j.x.nbytes for j in batch)
        pair = self._models[key]
        if not queue:  # a replaced model version leaves no queue behind
            del self._queues[key], self._models[key]
        return pair, batch

    def _run(self) -> None:
        while True:
            with self._cond:
                got = self._next_batch()
            if got is None:
                return
            (model, backend), jobs = got
            try:
                answers = self._answer(model, backend, jobs)
            except Exception as e:  # never leave a request waiting on a thread that has died
                log.exception("the batching queue failed on a batch of %d", len(jobs))
                answers = [(j, Failure(500, f"inference failed: {type(e).__name__}")) for j in jobs]
            with self._cond:
                self._busy = False
            for loop in {j.future.get_loop() for j, _ in answers}:  # one event loop per worker; tests run more
                try:
                    loop.call_soon_threadsafe(_deliver, [(j, r) for j, r in answers if j.future.get_loop() is loop])
                except RuntimeError:  # that loop has closed: nobody is waiting
                    pass

    def _answer(self, model, backend: str, jobs: list[Job]) -> list[tuple[Job, object]]:
        """Each job with its answer: 503 for one past its deadline (not run), the backend's for the rest
        (a job whose request has gone is dropped)."""
        now = time.perf_counter()
        late = [j for j in jobs if now > j.deadline]
        run = [j for j in jobs if now <= j.deadline and not j.future.cancelled()]
        answers = [(j, Failure(503, f"overloaded: waited {1000 * (now - j.enqueued):.0f} ms in the batching "
                                    f"queue, past its limit of {1000 * self.max_wait_s:.0f} ms; retry later"))
                   for j in late]
        if run:
            answers += zip(run, self._timed(model, backend, run))
        return answers


def _deliver(answers: list[tuple[Job, object]]) -> None:
    for job, result in answers:
        if not job.future.done():
            job.future.set_result(result)


def predict(model, backend: str, jobs: list[Job]) -> list[Prediction | Failure]:
    """One batch through the backend: a Prediction per job, or the same Failure for all of them."""
    from serving.metrics import observe_batch

    t0 = time.perf_counter()
    try:
        logits = np.asarray(model.backends[backend].predict(model_input(jobs, model.spec)), np.float64)
        probs = softmax(logits)
    except Exception as e:
        log.exception("inference failed on %s/%s for a batch of %d", model.tag, backend, len(jobs))
        return [Failure(500, f"inference failed: {type(e).__name__}")] * len(jobs)
    ms = (time.perf_counter() - t0) * 1000
    observe_batch(backend, len(jobs), ms / 1000)
    top = np.argsort(-probs, axis=1, kind="stable")  # ties: the lowest index first, as np.argmax
    classes, n = model.classes, len(jobs)
    return [Scores(logits=z, probabilities=row) if j.top_k == ROWS else
            Prediction(model=model.tag, backend=backend,
                       predictions=[Label(classes[c], int(c), float(row[c])) for c in order[:j.top_k]],
                       inference_ms=round(ms, 3), batch_size=n, preprocess_ms=round(j.preprocess_ms, 3),
                       queue_ms=round((t0 - j.enqueued) * 1000, 3))
            for j, z, row, order in zip(jobs, logits, probs, top)]


def model_input(jobs: list[Job], spec) -> np.ndarray:
    """A batch's model input: its uint8 images stacked and normalised as one array; inputs sent already
    normalised (float32 (C, H, W)) are taken as they are (the same values normalize gives, image by image)."""
    if all(j.x.dtype == np.uint8 for j in jobs):
        return normalize(np.stack([j.x for j in jobs]), spec)
    return np.stack([normalize(j.x, spec) if j.x.dtype == np.uint8 else j.x for j in jobs])


# One queue per worker process, made by the service at start-up; used by the front door.
CURRENT: Batcher | None = None
