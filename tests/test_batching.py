"""The batching queue (serving/batching.py), the answer types (serving/schema.py) and the client address
of per-client limits, in process: no server, a backend that records what it was given."""
from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from lab.preprocess import Preprocessing, normalize
from serving.batching import Batcher, QueueFull
from serving.middleware import client_address
from serving.schema import Failure, Prediction, batch_answer, render

SPEC = Preprocessing(size=(4, 4), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), channels=3)


class Recorder:
    """A backend that returns the batch's first pixel as the logit of class 1, remembers each batch's
    size, and can be held until released."""

    def __init__(self):
        self.sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a batch is in predict (held there while gate is clear)
        self.seen: list[np.ndarray] = []
        self.threads: list[str] = []  # the thread that ran each batch

    async def busy(self) -> None:
        """Until the inference thread has taken a batch into predict."""
        assert await asyncio.to_thread(self.entered.wait, 30)

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(30)
        self.sizes.append(len(x))
        self.seen.append(x.copy())
        self.threads.append(threading.current_thread().name)
        out = np.zeros((len(x), 3), np.float32)
        out[:, 1] = x[:, 0, 0, 0]
        return out


def model(backend, tag="m:1"):
    return SimpleNamespace(tag=tag, name=tag.split(":")[0], spec=SPEC, classes=["a", "b", "c"], backends={"rec": backend})


def image(value: int) -> np.ndarray:
    return np.full((4, 4, 3), value, np.uint8)


def run(coro):
    return asyncio.run(coro)


async def hold(b: Batcher, m, rec: Recorder) -> list:
    """Queue one image and wait until the backend holds it (until rec.gate is set): its futures."""
    rec.gate.clear()
    rec.entered.clear()  # an earlier batch set it: wait for this one
    futures = b.submit(m, "rec", [(image(0), 1, 0.0)])
    await rec.busy()
    return futures


def test_a_batch_is_what_waits_in_order_normalised_as_one_array():
    rec = Recorder()
    b = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10)
    m = model(rec)

    async def go():
        rec.gate.clear()  # the first image holds the backend while the next 10 queue up behind it
        first = b.submit(m, "rec", [(image(0), 3, 0.0)])
        await rec.busy()
        rest = b.submit(m, "rec", [(image(v), 2, 0.0) for v in range(1, 11)])
        rec.gate.set()
        return await asyncio.gather(*first, *rest)

    answers = run(go())
    b.close()
    assert rec.sizes == [1, 8, 2]  # a full batch of what waited, then the rest, first in first out
    firsts = np.concatenate([x[:, 0, 0, 0] for x in rec.seen])
    np.testing.assert_allclose(firsts, normalize(np.stack([image(v) for v in range(11)]), SPEC)[:, 0, 0, 0])
    assert all(isinstance(a, Prediction) for a in answers)
    assert [a.batch_size for a in answers] == [1] + [8] * 8 + [2] * 2
    assert len(answers[0].predictions) == 3 and len(answers[1].predictions) == 2
    probs = [p.probability for p in answers[5].predictions]
    assert probs == sorted(probs, reverse=True) and answers[5].model == "m:1" and answers[5].backend == "rec"


def test_a_lone_request_runs_on_the_caller_once_its_backend_is_known_to_be_fast():
    rec = Recorder()
    b = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10, inline_max_s=5.0)
    m = model(rec)

    async def go():
        first = await asyncio.gather(*b.submit(m, "rec", [(image(1), 1, 0.0)], alone=True))  # its time unknown yet
        here = b.submit(m, "rec", [(image(2), 1, 0.0)], alone=True)
        assert all(f.done() for f in here)  # answered before submit returned: run on this thread
        beside = await asyncio.gather(*b.submit(m, "rec", [(image(3), 1, 0.0)]))  # not alone: the queue
        pair = await asyncio.gather(*b.submit(m, "rec", [(image(4), 1, 0.0)] * 2, alone=True))  # 2 x its time: fits
        return first + [here[0].result()] + beside + pair

    answers = run(go())
    b.close()
    assert rec.threads == ["lab-inference", threading.current_thread().name, "lab-inference",
                           threading.current_thread().name]
    assert all(isinstance(a, Prediction) and len(a.predictions) == 1 for a in answers)
    assert [a.batch_size for a in answers] == [1, 1, 1, 2, 2] and all(a.queue_ms >= 0 for a in answers)
    np.testing.assert_allclose(rec.seen[1], normalize(image(2)[None], SPEC))


def test_a_lone_request_waits_its_turn_behind_a_running_batch_and_slow_models_stay_on_the_thread():
    rec = Recorder()
    b = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10, inline_max_s=5.0)
    slow = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10, inline_max_s=1e-9)
    off = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10)  # inline_max_s 0: never
    waits = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10, wait_s=0.001, inline_max_s=5.0)
    m = model(rec)

    async def go():
        await asyncio.gather(*b.submit(m, "rec", [(image(1), 1, 0.0)]))  # its batch of one is timed
        held = await hold(b, m, rec)  # the thread runs a batch
        lone = b.submit(m, "rec", [(image(2), 1, 0.0)], alone=True)
        assert not any(f.done() for f in lone) and b.waiting() == 1  # queued behind it, not run beside it
        rec.gate.set()
        out = await asyncio.gather(*held, *lone)
        for other in (slow, off, waits):  # too slow; told never; told to wait for more images
            for v in (3, 4):
                out += await asyncio.gather(*other.submit(m, "rec", [(image(v), 1, 0.0)], alone=True))
        return out

    answers = run(go())
    for x in (b, slow, off, waits):
        x.close()
    assert rec.threads == ["lab-inference"] * 9 and all(isinstance(a, Prediction) for a in answers)


def test_a_full_queue_refuses_the_whole_request_exactly_at_its_bound():
    rec = Recorder()
    b = Batcher(max_batch=4, max_queue=6, max_bytes=1 << 20, max_wait_s=10)
    m = model(rec)

    async def go():
        held = await hold(b, m, rec)
        queued = b.submit(m, "rec", [(image(1), 1, 0.0)] * 5)  # 5 of 6 places
        with pytest.raises(QueueFull, match="holds 5 images"):
            b.submit(m, "rec", [(image(2), 1, 0.0)] * 2)  # all or none: 7 > 6
        assert b.waiting() == 5
        queued += b.submit(m, "rec", [(image(3), 1, 0.0)])  # exactly the 6th fits
        other = b.submit(model(rec, "m:2"), "rec", [(image(4), 1, 0.0)])  # another model: its own queue
        rec.gate.set()
        return await asyncio.gather(*held, *queued, *other)

    assert all(isinstance(a, Prediction) for a in run(go()))
    b.close()


def test_the_byte_bound_counts_every_queue_of_the_worker():
    rec = Recorder()
    one = image(0).nbytes
    b = Batcher(max_batch=4, max_queue=100, max_bytes=3 * one, max_wait_s=10)

    async def go():
        held = await hold(b, model(rec), rec)
        futures = b.submit(model(rec, "m:2"), "rec", [(image(1), 1, 0.0)] * 2)
        futures += b.submit(model(rec, "m:3"), "rec", [(image(1), 1, 0.0)])
        with pytest.raises(QueueFull, match="bytes"):
            b.submit(model(rec, "m:4"), "rec", [(image(1), 1, 0.0)])
        rec.gate.set()
        await asyncio.gather(*held, *futures)
        assert b.bytes == 0

    run(go())
    b.close()


def test_an_image_past_its_deadline_is_answered_503_without_running():
    rec = Recorder()
    b = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=0.3)
    m = model(rec)

    async def go():
        first = await hold(b, m, rec)
        late = b.submit(m, "rec", [(image(1), 1, 0.0)] * 3)
        await asyncio.sleep(0.5)  # past their 0.3 s while the backend is held
        rec.gate.set()
        return await asyncio.gather(*first, *late)

    answers = run(go())
    b.close()
    assert isinstance(answers[0], Prediction)
    assert all(isinstance(a, Failure) and a.status == 503 and "batching queue" in a.error for a in answers[1:])
    assert rec.sizes == [1]  # the late ones never reached the backend


def test_images_of_a_request_that_has_gone_are_not_run():
    rec = Recorder()
    b = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10)
    m = model(rec)

    async def go():
        first = await hold(b, m, rec)
        gone = b.submit(m, "rec", [(image(1), 1, 0.0)] * 4)
        for f in gone:
            f.cancel()  # the client disconnected, or its request timed out
        kept = b.submit(m, "rec", [(image(2), 1, 0.0)])
        rec.gate.set()
        return await asyncio.gather(*first, *kept)

    run(go())
    b.close()
    assert rec.sizes == [1, 1]


def test_a_failing_backend_answers_500_for_its_batch_and_the_queue_goes_on():
    class Broken:
        def predict(self, x):
            raise RuntimeError("boom")

    b = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10)

    async def go():
        bad = await asyncio.gather(*b.submit(model(Broken()), "rec", [(image(0), 1, 0.0)] * 2))
        good = await asyncio.gather(*b.submit(model(Recorder(), "m:2"), "rec", [(image(0), 1, 0.0)]))
        return bad, good

    bad, good = run(go())
    b.close()
    assert all(isinstance(a, Failure) and a.status == 500 and "RuntimeError" in a.error for a in bad)
    assert isinstance(good[0], Prediction)


def test_a_free_model_waits_batch_wait_for_more_images():
    rec = Recorder()
    b = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10, wait_s=1.0)
    m = model(rec)

    async def go():
        futures = b.submit(m, "rec", [(image(0), 1, 0.0)])
        await asyncio.sleep(0.05)
        futures += b.submit(m, "rec", [(image(1), 1, 0.0)] * 2)
        return await asyncio.gather(*futures)

    t0 = time.perf_counter()
    run(go())
    b.close()
    assert rec.sizes == [3] and time.perf_counter() - t0 >= 1.0


def test_close_answers_what_is_queued_then_refuses():
    rec = Recorder()
    b = Batcher(max_batch=2, max_queue=64, max_bytes=1 << 20, max_wait_s=10)

    async def go():
        rec.gate.clear()
        futures = b.submit(model(rec), "rec", [(image(0), 1, 0.0)] * 5)
        closer = threading.Thread(target=b.close)
        closer.start()
        while not b._closing:  # close() has begun in its thread
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="shutting down"):
            b.submit(model(rec), "rec", [(image(0), 1, 0.0)])
        rec.gate.set()
        answers = await asyncio.gather(*futures)
        closer.join(10)
        return answers, closer

    answers, closer = run(go())
    assert all(isinstance(a, Prediction) for a in answers) and not closer.is_alive()
    assert sum(rec.sizes) == 5


def test_a_batch_answer_is_200_when_any_image_was_classified():
    ok = Prediction(model="m:1", backend="onnx", predictions=[], inference_ms=2.0, batch_size=2, preprocess_ms=0.1,
                    queue_ms=0.0)
    status, answer = batch_answer([ok, Failure(415, "not an image")], ["a.png", "b.txt"])
    body = render(answer).decode()
    assert status == 200 and '"errors":1' in body and '"status":415' in body and '"filename":"b.txt"' in body
    status, answer = batch_answer([Failure(415, "not an image"), Failure(413, "too big")], ["a", "b"])
    assert status == 415 and answer.error == "not an image" and len(answer.results) == 2
    assert "filename" not in render(ok).decode()  # None fields are left out


@pytest.mark.parametrize("peer,forwarded,trusted,expected", [
    ("10.0.0.5", None, (), "10.0.0.5"),
    ("10.0.0.5", "1.2.3.4", (), "10.0.0.5"),                         # an untrusted peer cannot name another
    ("10.0.0.1", "1.2.3.4", ("10.0.0.1",), "1.2.3.4"),
    ("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", ("10.0.0.1", "10.0.0.2"), "1.2.3.4"),  # the nearest untrusted
    ("10.0.0.1", None, ("10.0.0.1",), "10.0.0.1"),
])
def test_per_client_limits_key_on_a_trusted_proxys_forwarded_address(peer, forwarded, trusted, expected):
    headers = [(b"host", b"x")] + ([(b"x-forwarded-for", forwarded.encode())] if forwarded else [])
    assert client_address({"client": (peer, 1234), "headers": headers}, trusted) == expected


def test_one_client_may_use_the_room_nobody_else_wants_but_not_the_last_half():
    import json

    from serving import catalog as C
    from serving.config import Settings
    from serving.middleware import FrontDoor

    door = FrontDoor(None, Settings(max_inflight=8, max_inflight_per_client=2))

    def ask(inflight: int) -> str:
        door.inflight, door.by_client = inflight, {"1.2.3.4": inflight}
        scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": b"", "client": ("1.2.3.4", 9),
                 "headers": [(b"content-type", b"image/png"), (b"content-length", b"0")]}
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        run(door(scope, receive, send))
        return json.loads(sent[1]["body"])["error"]

    C.CURRENT = None  # an admitted request goes on to parsing, which says the service is starting
    assert "still starting" in ask(3)                        # 3 of this client's, the worker under half full
    assert "2 requests in flight from your address" in ask(4)  # half full: the per-client cap holds


def test_a_backend_that_prepares_each_shape_is_called_at_every_batch_size_before_serving():
    from serving.catalog import warm_up

    rec = Recorder()
    card = SimpleNamespace(preprocessing=SPEC)
    warm_up(rec, card, 5)
    assert rec.sizes == [1, 2, 3, 4, 5] and rec.seen[4].shape == (5, 3, 4, 4)


def test_a_batch_that_fails_past_the_backend_is_answered_500_and_the_thread_goes_on():
    class TooWide:  # more logits than the model has classes: building the answers fails
        def predict(self, x):
            return np.zeros((len(x), 5), np.float32)

    b = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10)

    async def go():
        bad = await asyncio.gather(*b.submit(model(TooWide()), "rec", [(image(0), 5, 0.0)]))
        good = await asyncio.gather(*b.submit(model(Recorder(), "m:2"), "rec", [(image(0), 1, 0.0)]))
        return bad, good

    bad, good = run(go())
    b.close()
    assert isinstance(bad[0], Failure) and bad[0].status == 500 and isinstance(good[0], Prediction)


def test_a_classify_request_past_lab_timeout_is_answered_504_by_the_front_door():
    """The front door bounds its own routes (BentoML's timeout middleware comes after it): a request
    still unanswered after LAB_TIMEOUT gets a JSON 504 and closes its connection."""
    import json

    from serving import catalog as C
    from serving.config import Settings
    from serving.middleware import FrontDoor

    settings = Settings(timeout=1, read_timeout=30, body_timeout=60)
    door = FrontDoor(None, settings)
    scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": b"", "client": ("1.2.3.4", 9),
             "headers": [(b"content-type", b"image/png"), (b"content-length", b"100")]}
    sent = []

    async def receive():  # a body that never comes
        await asyncio.sleep(60)

    async def send(message):
        sent.append(message)

    C.CURRENT = SimpleNamespace(settings=settings)
    try:
        t0 = time.perf_counter()
        run(door(scope, receive, send))
    finally:
        C.CURRENT = None
    assert sent[0]["status"] == 504 and (b"connection", b"close") in sent[0]["headers"]
    assert "1 seconds" in json.loads(sent[1]["body"])["error"] and time.perf_counter() - t0 < 30
    assert door.inflight == 0 and door.by_client == {}


def test_the_front_door_runs_a_request_on_the_loop_only_when_no_other_is_in_flight():
    """Two requests read in the same turn of the loop both go through the queue (the first one to
    reach the queue yields before deciding, and sees the second); a lone one runs on the loop."""
    import io
    import json

    from PIL import Image

    from serving import batching
    from serving import catalog as C
    from serving.config import Settings
    from serving.middleware import FrontDoor

    settings = Settings()
    rec = Recorder()
    m = SimpleNamespace(tag="m:1", name="m", spec=SPEC, classes=["a", "b", "c"], backends={"rec": rec},
                        default_backend=lambda configured="": "rec")
    cat = SimpleNamespace(settings=settings, loaded=lambda name, version: m, backend=lambda model, b: rec)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, "PNG")
    png = buf.getvalue()
    door = FrontDoor(None, settings)

    async def post() -> dict:
        sent = []

        async def receive():
            return {"type": "http.request", "body": png, "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/classify", "query_string": b"", "client": ("1.2.3.4", 9),
                 "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(png)).encode())]}
        await door(scope, receive, send)
        assert sent[0]["status"] == 200
        return json.loads(sent[1]["body"])

    async def go():
        first = await post()                             # times the backend's batch of one
        together = await asyncio.gather(post(), post())  # read in the same turn of the loop
        lone = await post()
        return [first, *together, lone]

    C.CURRENT = cat
    batching.CURRENT = Batcher(max_batch=8, max_queue=64, max_bytes=1 << 20, max_wait_s=10, inline_max_s=5.0)
    try:
        answers = run(go())
    finally:
        batching.CURRENT.close()
        C.CURRENT = batching.CURRENT = None
    here = threading.current_thread().name
    assert rec.threads[:1] == ["lab-inference"] and rec.threads[-1] == here
    assert here not in rec.threads[1:-1] and sum(rec.sizes[1:-1]) == 2  # the pair: on the thread
    assert len({json.dumps(a["predictions"]) for a in answers}) == 1 and door.inflight == 0
