#!/usr/bin/env python
"""Triton's own client against the service: real test images sent as binary BYTES over the Open Inference
Protocol, each answer compared with /classify's for the same file on the same backend.

    python bench/v2_agreement.py                                   # cifar10-airbench, 1,000 images, onnx + onnx_int8
    python bench/v2_agreement.py --model cifar10-airbench --images 1000 --backends onnx,onnx_int8,torch

It starts `bentoml serve` on 127.0.0.1 (one worker), then per backend sends every image with
`tritonclient.http` twice, one image per request and in requests of `--batch` images (binary tensors in,
binary `probabilities` out), and once to `POST /classify?backend=` with all ten probabilities. Per backend
it counts the images whose top-1 differs between the protocol and /classify (the bar: none), the largest
probability difference, and each route's accuracy against the labels. Writes
reports/v2_agreement/v2_agreement.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.samples import cifar_test_samples
from bench.server import Server

REPO = Path(__file__).resolve().parent.parent


def classify_probabilities(session, url: str, model: str, backend: str, body: bytes, classes: int) -> np.ndarray:
    """/classify's probabilities (all `classes` of them) for one image file, by class index."""
    r = session.post(f"{url}/classify", data=body, params={"model": model, "backend": backend, "top_k": classes},
                     headers={"Content-Type": "application/octet-stream"}, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"/classify answered {r.status_code}: {r.text[:200]}")
    answer = r.json()
    p = np.zeros(len(answer["predictions"]))
    for pred in answer["predictions"]:
        p[pred["index"]] = pred["probability"]
    return p


def v2_probabilities(client, model: str, backend: str, bodies: list[bytes]) -> np.ndarray:
    """The protocol's `probabilities` for these files, sent as one binary BYTES tensor [N]."""
    import tritonclient.http as triton

    x = triton.InferInput("image", [len(bodies)], "BYTES")
    x.set_data_from_numpy(np.array(bodies, dtype=np.object_), binary_data=True)
    out = triton.InferRequestedOutput("probabilities", binary_data=True)
    result = client.infer(model, [x], outputs=[out], parameters={"backend": backend})
    if result.get_response()["parameters"]["backend"] != backend:
        raise RuntimeError(f"asked for {backend}, answered by {result.get_response()['parameters']['backend']}")
    return result.as_numpy("probabilities").astype(np.float64)


def agree(url: str, model: str, backend: str, samples, labels: list[str], batch: int) -> dict:
    import requests
    import tritonclient.http as triton

    bodies = [s.body for s in samples]
    client = triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120)
    t0 = time.perf_counter()
    single = np.stack([v2_probabilities(client, model, backend, [b])[0] for b in bodies])
    batched = np.concatenate([v2_probabilities(client, model, backend, bodies[i:i + batch])
                              for i in range(0, len(bodies), batch)])
    with requests.Session() as session:
        ref = np.stack([classify_probabilities(session, url, model, backend, b, len(labels)) for b in bodies])
    truth = np.array([labels.index(s.label) if s.label in labels else -1 for s in samples])
    row = {"backend": backend, "images": len(bodies), "batch": batch, "seconds": round(time.perf_counter() - t0, 1)}
    for name, got in (("single", single), ("batched", batched)):
        row[f"{name}_top1_differs"] = int((got.argmax(1) != ref.argmax(1)).sum())
        row[f"{name}_max_prob_diff"] = float(np.abs(got - ref).max())
        row[f"{name}_accuracy"] = float((got.argmax(1) == truth).mean())
    row["classify_accuracy"] = float((ref.argmax(1) == truth).mean())
    return row


def markdown(report: dict) -> str:
    lines = ["# tritonclient against the service: the Open Inference Protocol's answers against /classify's", "",
             "```", report["command"], "```", "",
             f"{report['images']} CIFAR-10 test images (`bench/samples.py`, seed 0), model `{report['model']}`, "
             f"tritonclient {report['tritonclient']}, binary BYTES in, binary `probabilities` out; one image per "
             f"request, then requests of {report['batch']} images; each image also sent to "
             f"`POST /classify?backend=`. {report['cpu']}, {report['date']}.", "",
             "| backend | top-1 differs, 1 per request | top-1 differs, batched | max prob diff (1 / batched) "
             "| accuracy v2 (1 / batched) | accuracy /classify | seconds |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| `{r['backend']}` | {r['single_top1_differs']} of {r['images']} "
                     f"| {r['batched_top1_differs']} of {r['images']} "
                     f"| {r['single_max_prob_diff']:.1e} / {r['batched_max_prob_diff']:.1e} "
                     f"| {100 * r['single_accuracy']:.2f}% / {100 * r['batched_accuracy']:.2f}% "
                     f"| {100 * r['classify_accuracy']:.2f}% | {r['seconds']} |")
    met = all(r["single_top1_differs"] == 0 and r["batched_top1_differs"] == 0 for r in report["rows"])
    lines += ["", f"Bar: the top-1 equals /classify's on every image, every backend: **{'MET' if met else 'NOT MET'}**."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar10-airbench", help="a model name in the store")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64, help="images per batched request (at most 64)")
    p.add_argument("--backends", default="onnx,onnx_int8")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "v2_agreement")
    args = p.parse_args(argv)
    if not 1 <= args.batch <= 64 or args.images < 1:
        p.error("--batch must be 1..64 and --images at least 1")
    from importlib.metadata import version

    from lab.hardware import cpu_name

    samples = cifar_test_samples(args.images)
    if any(s.label is None for s in samples):
        p.error("no CIFAR-10 test images here (bench/samples.py found none): nothing to compare against labels")
    backends = [b for b in args.backends.split(",") if b]
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), LAB_BACKENDS=",".join(backends), LAB_WORKERS="1",
               LAB_DEFAULT_MODEL=args.model)
    with Server(env, args.out / "service.log") as srv:
        import requests

        meta = requests.get(f"{srv.url}/v2/models/{args.model}", timeout=30).json()
        labels = meta["parameters"]["labels"]
        rows = []
        for backend in backends:
            row = agree(srv.url, args.model, backend, samples, labels, args.batch)
            print(json.dumps(row), flush=True)
            rows.append(row)
        served = meta["versions"][0]
    report = {"command": "python bench/v2_agreement.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": f"{args.model}:{served}", "images": len(samples), "batch": args.batch,
              "tritonclient": version("tritonclient"), "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"),
              "rows": rows}
    (args.out / "v2_agreement.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "v2_agreement.md").write_text(text)
    print(text)
    return 0 if all(r["single_top1_differs"] == 0 and r["batched_top1_differs"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
