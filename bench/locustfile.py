"""Locust load test of the service: simulated users send real test images and check every answer.

    locust -f bench/locustfile.py --host http://127.0.0.1:3000                      # web UI on :8089
    locust -f bench/locustfile.py --host http://127.0.0.1:3000 --headless -u 16 -r 8 -t 30s \
        --backends onnx,torch --csv reports/locust
    # distributed: one master, N workers (on this or other machines)
    locust -f bench/locustfile.py --master --expect-workers 2 --headless -u 32 -r 16 -t 30s --host ...
    locust -f bench/locustfile.py --worker --master-host 127.0.0.1

Any Open Inference Protocol (KServe v2) server instead of /classify, with the same request builder and
answer checker as bench/loadgen.py (bench/v2client.py: the image as a BYTES input, binary tensors unless
--encoding json; class names from the model's metadata, else the classification extension):

    locust -f bench/locustfile.py --host http://127.0.0.1:3000 --protocol v2 --model cifar10-airbench \
        --backends onnx,onnx_int8 --headless -u 16 -r 8 -t 30s
    locust -f bench/locustfile.py --host http://127.0.0.1:8080 --protocol v2 --model m --backends "" \
        --encoding json --headless -u 16 -r 8 -t 30s          # a KServe or MLServer server

Each request is named "classify[<backend>]" ("infer[<backend>]" in v2) in Locust's statistics. An answer counts as a failure
unless it is a 200 whose top-1 label can be read; whether that label is the image's true label is
tallied separately (accuracy under load), per backend, and written to --accuracy-out at the end
(workers report their tallies to the master). The tally starts afresh with each run (and with Locust's
"reset stats").

In the web UI (http://127.0.0.1:8089) the tally is the "Accuracy" tab beside Statistics, Charts, ...,
updated live with the other statistics; GET /accuracy gives it as JSON and /accuracy/csv as CSV
(also under Download Data). This uses Locust's public web UI extension points: extendedTabs,
extendedTables and extendedCsvFiles in the page's template arguments, and an "extendedStats" entry
added to /stats/requests, which the page polls.
"""
from __future__ import annotations

import json
import random

import threading
from pathlib import Path

from locust import events, task
from locust.contrib.fasthttp import FastHttpUser

from bench.samples import cifar_test_samples

_lock = threading.Lock()
TALLY: dict[str, dict[str, int]] = {}   # backend -> {"checked": n, "correct": n}
SAMPLES: list = []


@events.init_command_line_parser.add_listener
def _args(parser):
    parser.add_argument("--backends", default="onnx", help="comma-separated backends to spread users over")
    parser.add_argument("--images", type=int, default=500, help="test images sampled from the data root")
    parser.add_argument("--data-root", default="", help="data root (default: $LAB_DATA_ROOT or ../shared/data)")
    parser.add_argument("--accuracy-out", default="", help="write per-backend accuracy JSON here at the end")
    parser.add_argument("--model", default="", help="model name or name:version (default: the service's); "
                                                     "with --protocol v2, the v2 model name (needed)")
    parser.add_argument("--protocol", default="classify", choices=("classify", "v2"),
                        help="POST /classify, or /v2/models/<model>/infer (the Open Inference Protocol)")
    parser.add_argument("--encoding", default="binary", choices=("binary", "json"),
                        help="v2: binary tensors (the binary data extension) or JSON (the image base64)")


@events.init.add_listener
def _load_samples(environment, **_):
    opts = environment.parsed_options
    if opts is None:
        return
    SAMPLES[:] = cifar_test_samples(opts.images, Path(opts.data_root) if opts.data_root else None)


def _count(backend: str, correct: bool) -> None:
    with _lock:
        t = TALLY.setdefault(backend, {"checked": 0, "correct": 0})
        t["checked"] += 1
        t["correct"] += int(correct)


def accuracy_rows() -> list[dict]:
    """The tally as rows for the web UI and /accuracy: one per backend."""
    with _lock:
        tally = {b: dict(t) for b, t in sorted(TALLY.items())}
    rows = [{"backend": b, "checked": t["checked"], "correct": t["correct"],
             "accuracy": f"{100 * t['correct'] / t['checked']:.2f}%" if t["checked"] else "n/a"}
            for b, t in tally.items()]
    if SAMPLES and all(s.label is None for s in SAMPLES):
        rows.append({"backend": "(none)", "checked": 0, "correct": 0,
                     "accuracy": "no labelled test images under the data root: answers cannot be checked"})
    return rows


@events.test_start.add_listener
def _fresh_tally(**_):
    with _lock:
        TALLY.clear()


@events.reset_stats.add_listener
def _reset_tally(**_):
    with _lock:
        TALLY.clear()


@events.init.add_listener
def _web_ui_accuracy(environment, web_ui=None, **_):
    """The accuracy tally in Locust's web UI: an "Accuracy" tab, a JSON and a CSV route."""
    if web_ui is None:
        return
    from flask import Response, jsonify, request

    web_ui.template_args["extendedTabs"] = [{"title": "Accuracy", "key": "accuracy"}]
    web_ui.template_args["extendedTables"] = [{"key": "accuracy", "structure": [
        {"key": "backend", "title": "Backend"},
        {"key": "checked", "title": "Answers checked"},
        {"key": "correct", "title": "Top-1 = true label"},
        {"key": "accuracy", "title": "Accuracy under load"}]}]
    web_ui.template_args["extendedCsvFiles"] = [{"href": "./accuracy/csv", "title": "Download accuracy CSV"}]

    @web_ui.app.after_request
    def _with_accuracy(response):
        if request.path == "/stats/requests" and response.is_json:
            data = response.get_json()
            data["extendedStats"] = [{"key": "accuracy", "data": accuracy_rows()}]
            response.set_data(json.dumps(data))
        return response

    @web_ui.app.route("/accuracy")
    def _accuracy_json():
        return jsonify(accuracy_rows())

    @web_ui.app.route("/accuracy/csv")
    def _accuracy_csv():
        lines = ["backend,checked,correct,accuracy"] + [
            f"{r['backend']},{r['checked']},{r['correct']},{r['accuracy']}" for r in accuracy_rows()]
        return Response("\n".join(lines) + "\n", mimetype="text/csv",
                        headers={"Content-Disposition": "attachment; filename=accuracy.csv"})


@events.report_to_master.add_listener
def _to_master(client_id, data):
    with _lock:
        data["accuracy_tally"] = {b: dict(t) for b, t in TALLY.items()}
        TALLY.clear()


@events.worker_report.add_listener
def _from_worker(client_id, data):
    with _lock:
        for b, t in data.get("accuracy_tally", {}).items():
            mine = TALLY.setdefault(b, {"checked": 0, "correct": 0})
            mine["checked"] += t["checked"]
            mine["correct"] += t["correct"]


@events.quitting.add_listener
def _write_accuracy(environment, **_):
    opts = environment.parsed_options
    if opts is None or not opts.accuracy_out or getattr(environment, "runner", None) is None:
        return
    from locust.runners import WorkerRunner

    if isinstance(environment.runner, WorkerRunner):
        return  # the master writes the totals
    with _lock:
        out = {b: dict(t, accuracy=t["correct"] / t["checked"] if t["checked"] else None)
               for b, t in TALLY.items()}
    Path(opts.accuracy_out).write_text(json.dumps(out, indent=1))


class ClassifyUser(FastHttpUser):
    """Sends one image at a time, back to back (no think time): a closed-loop client."""

    connection_timeout = 10.0
    network_timeout = 60.0

    def on_start(self):
        opts = self.environment.parsed_options
        backends = [b.strip() for b in (opts.backends if opts else "onnx").split(",") if b.strip()] or [""]
        self.backend = backends[self._user_index() % len(backends)]
        self.model = opts.model if opts else ""
        self.rng = random.Random()
        self.v2 = None
        if opts is not None and opts.protocol == "v2":
            self.v2 = self._v2_protocol(opts.encoding)

    def _v2_protocol(self, encoding: str):
        """The v2 request builder and checker for this user's backend; class names from the model's
        metadata (this service gives them), else each answer's classification extension."""
        from bench.v2client import V2

        if not self.model:
            raise SystemExit("--protocol v2 needs --model (the v2 model name)")
        labels = None
        with self.client.get(f"/v2/models/{self.model}", name="v2 metadata", catch_response=True) as r:
            try:
                got = (r.json().get("parameters") or {}).get("labels") if r.status_code == 200 else None
                labels = list(got) if isinstance(got, list) and got else None
            except (ValueError, AttributeError):
                labels = None
            r.success()
        return V2(input="image", binary=encoding == "binary", labels=labels, backend=self.backend or None,
                  output="probabilities" if labels else "classification")

    def _user_index(self) -> int:
        # spread users evenly over the backends, whatever order they are spawned in
        ClassifyUser._spawned = getattr(ClassifyUser, "_spawned", -1) + 1
        return ClassifyUser._spawned

    @task
    def classify(self):
        if self.v2 is not None:
            return self.infer()
        sample = self.rng.choice(SAMPLES)
        params = f"?backend={self.backend}" + (f"&model={self.model}" if self.model else "")
        with self.client.post(f"/classify{params}", data=sample.body, name=f"classify[{self.backend}]",
                              headers={"Content-Type": sample.content_type}, catch_response=True) as r:
            self._judge(r, sample, lambda: r.json()["predictions"][0]["label"], "a readable prediction")

    def infer(self):
        """One Open Inference Protocol request (bench/v2client.py builds it and reads its answer)."""
        from bench.v2client import read_answer, top1

        sample = self.rng.choice(SAMPLES)
        body, headers = self.v2.request(sample)
        with self.client.post(f"/v2/models/{self.model}/infer", data=body, headers=headers,
                              name=f"infer[{self.backend}]", catch_response=True) as r:
            def label():
                size = r.headers.get("Inference-Header-Content-Length")
                return top1(read_answer(r.content, None if size is None else int(size)), self.v2.output,
                            self.v2.labels)

            self._judge(r, sample, label, "a readable v2 answer")

    def _judge(self, r, sample, read_label, what: str) -> None:
        """A failure for a non-200 or an unreadable answer; else a success, its top-1 counted against the label."""
        if r.status_code != 200:
            r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
            return
        try:
            label = read_label()
        except (ValueError, KeyError, IndexError, TypeError):
            r.failure(f"200 without {what}")
            return
        r.success()
        if sample.label is not None:
            _count(self.backend, label == sample.label)
