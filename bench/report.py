#!/usr/bin/env python
"""One combined report: training, export parity, accuracy per backend, latency curves, scenarios.

    python bench/report.py                  # in-process accuracy/latency + a service it starts and stops
    python bench/report.py --no-load        # only the in-process part
    python bench/report.py --host http://127.0.0.1:3000   # load a service that is already running

Writes reports/<timestamp>/report.md and report.html (self-contained: plots embedded) with everything
the parts measured, and the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from bench.accuracy_report import accuracy_report, machine, one_line_errors
from bench.samples import cifar_test_samples
from lab.backends import default_backends
from lab.card import read_card
from lab.paths import REPO
from lab.report_html import command_line, render_html
from lab.store import get_model

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _training_section(card: dict, out: Path) -> list[str]:
    t = card.get("training", {})
    lines = ["## Training", "", command_line(_training_command(card)), "",
             f"- model `{card['architecture']['name']}` {json.dumps(card['architecture']['kwargs'])}: "
             f"{card['parameters']:,} parameters, {card['flops_per_image'] / 1e6:.0f} MFLOPs per image "
             f"({card['flops_per_image_with_tta'] / 1e6:.0f} with TTA level {card['tta_level']})",
             f"- data: {card['dataset']['name']}, {card['dataset']['train_images']} training images",
             f"- preset {t.get('preset')}: {t.get('epochs')} epochs in {t.get('train_seconds', 0):.0f} s of "
             f"training ({t.get('images_per_second', 0):.0f} images/s, {t.get('precision')} on {t.get('device')})",
             f"- test accuracy as served (model.sim.onnx): **{_pct(card['metrics']['test_accuracy'])}**", ""]
    run_dir = Path(card.get("run_dir", ""))
    for png in ("learning_curves.png", "confusion.png"):
        if (run_dir / png).exists():
            dst = out / f"training_{png}"
            dst.write_bytes((run_dir / png).read_bytes())
            lines += [f"![{png}]({dst.name})", ""]
    curve = REPO / "reports" / "train_accuracy_vs_time.png"
    if curve.exists():
        (out / curve.name).write_bytes(curve.read_bytes())
        lines += [f"![accuracy vs training time]({curve.name})", ""]
    return lines


def _training_command(card: dict) -> list[str]:
    return ["python", "training/run_all.py", "--preset", str(card.get("training", {}).get("preset", "quick")),
            "--model", card["architecture"]["name"], "--dataset", str(card.get("dataset", {}).get("name", "cifar10"))]


def _export_section(card: dict) -> list[str]:
    lines = ["## Export parity", "", command_line(
        ["python", "training/run_all.py", "--only", "export,publish", "--run-dir", card.get("run_dir") or "runs/<run>"]) +
        " (the export stage of the training run above)", "", "| file | max abs logit diff | tolerance | top-1 agreement | images |",
             "|---|---|---|---|---|"]
    for name, p in card.get("parity", {}).items():
        lines.append(f"| {name} | {p['max_abs_diff']:.2e} | {p['atol']:g} | {100 * p['top1_agreement']:.1f}% | {p['images']} |")
    i8 = card.get("int8")
    if i8:
        recipe = (i8.get("recipe") or {}).get("name", "minmax/per-channel/u8")
        lines += ["", f"INT8 (static, recipe `{recipe}` chosen on held-out training images, calibrated on "
                      f"{i8['calibration_images']} training images): "
                      f"{_pct(i8['accuracy'])} vs {_pct(i8['fp32_accuracy'])} FP32, {100 * i8['drop']:+.2f} points "
                      f"lost, {i8['top1_disagreements_vs_fp32']} test images change top-1; "
                      f"{'published' if i8['accepted'] else 'not published'}."]
    files = card.get("files", {})
    if files:
        lines += ["", "Files (sha256 checked by the service at load): " +
                  ", ".join(f"`{k}` {v['bytes'] / 1e6:.2f} MB" for k, v in files.items())]
    return lines + [""]


def _load_section(url: str, backends: list[str], out: Path, args, in_process: dict, log) -> tuple[list[str], dict]:
    from bench import scenarios as S

    samples = cifar_test_samples(args.images)
    results = {"sweep": {}, "scenarios": {}}
    log("concurrency sweep:")
    for b in backends:
        results["sweep"][b] = S.sweep(url, samples, b, duration=args.sweep_seconds, log=log)
    S.plot_sweep(results["sweep"], out / "latency_vs_throughput.png")
    lines = ["## Serving: concurrency sweep", "", command_line(args.command), "",
             f"`bentoml serve` on this machine, adaptive batching on; each level runs {args.sweep_seconds:g} s of "
             f"closed-loop clients sending real test images; every answer checked against the true label.", "",
             "![latency vs throughput](latency_vs_throughput.png)", "",
             "| backend | concurrency | req/s | p50 ms | p90 ms | p99 ms | errors | mean batch | accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b, rows in results["sweep"].items():
        for r in rows:
            lines.append(f"| {b} | {r['concurrency']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {r['errors']} | {r['mean_batch_size'] or 1:.1f} | {_pct(r['accuracy'])} |")
    lines += ["", "Service throughput at concurrency 64 as a fraction of in-process batch-64 throughput:", ""]
    for b in backends:
        c64 = next((r for r in results["sweep"][b] if r["concurrency"] == 64), None)
        ip = in_process.get(b, {}).get("ms_per_image_batch64")
        if c64 and ip:
            lines.append(f"- {b}: {c64['throughput_rps']:.0f} req/s vs {1000 / ip:.0f} images/s in process = "
                         f"{100 * c64['throughput_rps'] * ip / 1000:.0f}%")
    log("MLPerf-style scenarios:")
    lines += ["", "## Serving: MLPerf-style scenarios", "", command_line(args.command), "",
              "| backend | scenario | settings | result | accuracy of the answers | errors |", "|---|---|---|---|---|---|"]
    for b in backends:
        c64 = next((r for r in results["sweep"][b] if r["concurrency"] == 64), None)
        start = max(2.0, 0.5 * c64["throughput_rps"]) if c64 else 10.0
        ss = S.single_stream(url, samples, b, args.single_stream_queries)
        sv = S.server(url, samples, b, args.server_bound_ms, start, duration=args.server_seconds,
                      steps=args.server_steps, log=log)
        off = S.offline(url, samples[:args.offline_images], b)
        results["scenarios"][b] = {"single_stream": ss, "server": sv, "offline": off}
        log(f"  {b}: single-stream p90 {ss['p90_ms']:.1f} ms; server {sv['value']:.1f} QPS within "
            f"{args.server_bound_ms:.0f} ms p99; offline {off['value']:.0f} images/s")
        lines += [
            f"| {b} | single-stream | {ss['settings']['queries']} queries, one at a time | p90 {ss['p90_ms']:.1f} ms "
            f"(p50 {ss['p50_ms']:.1f}) | {_pct(ss['accuracy'])} | {ss['errors']} |",
            f"| {b} | server | Poisson arrivals, p99 bound {args.server_bound_ms:.0f} ms, {args.server_seconds:.0f} s "
            f"per trial, {len(sv['trials'])} trials | {sv['value']:.1f} QPS (p99 {sv['p99_ms_at_best'] or float('nan'):.1f} ms) "
            f"| {_pct(sv['accuracy'])} | {_trial_errors(sv['trials'])} |",
            f"| {b} | offline | {off['settings']['images']} images in batches of 64 | {off['value']:.0f} images/s "
            f"| {_pct(off['accuracy'])} | {off['errors']} |"]
    if args.locust_seconds:
        from bench.load_test import run_locust

        log("Locust:")
        lines += ["", "## Locust (headless)", "", command_line(
            ["python", "bench/load_test.py", "--host", url, "--backends", ",".join(backends), "--users",
             str(args.locust_users), "--run-time", str(args.locust_seconds), "--images", str(args.images)]) +
            " (one headless Locust run per backend)", "", "| backend | users | seconds | requests | failures | req/s | p50 ms | "
                  "p99 ms | accuracy under load |", "|---|---|---|---|---|---|---|---|---|"]
        results["locust"] = {}
        for b in backends:
            r = run_locust(url, b, args.locust_users, args.locust_users, args.locust_seconds, out / "locust",
                           images=args.images, data_root=str(args.data_root or ""))
            results["locust"][b] = r
            log(f"  {b}: {r['requests']} requests, {r['failures']} failures, accuracy {_pct(r['accuracy'])}")
            lines.append(f"| {b} | {args.locust_users} | {args.locust_seconds} | {r['requests']} | {r['failures']} | "
                         f"{r.get('rps') or 0:.1f} | {r.get('p50_ms') or 0:.0f} | {r.get('p99_ms') or 0:.0f} | "
                         f"{_pct(r['accuracy'])} |")
    return lines + [""], results


def _trial_errors(trials: list[dict]) -> str:
    """Non-200 answers over all server-scenario trials, by status (503s: trials above capacity)."""
    by: dict[str, int] = {}
    for t in trials:
        for status, n in t["statuses"].items():
            if status != "200":
                by[status] = by.get(status, 0) + n
    if not by:
        return "0 in all trials"
    return ", ".join(f"{n} x {'connection error' if s == '0' else s}" for s, n in sorted(by.items())) + \
        " over all trials (503: overload answers in trials above capacity)"


def to_html(md: str, folder: Path, title: str) -> str:
    """Markdown -> one HTML page with a table of contents and every image inlined (lab.report_html)."""
    return render_html(md, folder, title)


def build_report(args, log=print) -> Path:
    m = get_model(args.model)
    tag, card = m.tag, read_card(m.path).to_dict()
    out = args.out / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mach = machine()
    if not getattr(args, "command", None):
        args.command = ["python", "bench/report.py", "--model", args.model]
    md = [f"# Model lab report: `{tag}`", "", command_line(args.command), "",
          f"Generated {datetime.now().isoformat(timespec='seconds')} on {mach['cpu']} ({mach['cores']} cores), "
          f"{mach['platform']}; " + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()) + ".", ""]
    md += _training_section(card, out)
    md += _export_section(card)
    acc = accuracy_report(tag, out, data_root=args.data_root, limit=args.limit, log=log)
    acc_md = (out / "accuracy.md").read_text().split("\n", 1)[1]
    acc_cmd = ["python", "bench/accuracy_report.py", "--model", tag] + (["--limit", str(args.limit)] if args.limit else []) \
        + (["--data-root", str(args.data_root)] if args.data_root else [])
    md += ["## Accuracy and latency per backend (in process)", "", command_line(acc_cmd), "",
           *(f"#{line}" if line.startswith("## ") else line for line in acc_md.strip().splitlines()), ""]
    results = {"model": tag, "machine": mach, "accuracy": acc}
    if args.ladder:
        from bench.ladder import ladder

        results["ladder"] = ladder(tag, out, data_root=args.data_root, limit=args.limit, rounds=args.ladder_rounds,
                                   log=log)
        lad_cmd = ["python", "bench/ladder.py", "--model", tag] + (["--limit", str(args.limit)] if args.limit else [])
        lad_md = (out / "ladder.md").read_text().split("\n", 1)[1]
        lad_md = lad_md.split("```", 2)[2] if lad_md.lstrip().startswith("```") else lad_md  # its own command line
        md += ["## The optimization ladder (in process)", "", command_line(lad_cmd), "",
               *(f"#{line}" if line.startswith("## ") else line for line in lad_md.strip().splitlines()), ""]
    if args.load:
        backends = [b for b in args.backends.split(",") if b in acc["backends"]]
        server = None
        if args.host:
            from bench.load_test import check_host
            url = check_host(args.host, allow_remote=False)
        else:
            from bench.server import Server
            env = dict(os.environ, PYTHONPATH=str(REPO), LAB_DEFAULT_MODEL=tag.split(":")[0])
            server = Server(env, out / "serve.log")
            url = server.url
        try:
            load_md, load = _load_section(url, backends, out, args, acc["backends"], log)
            md += load_md
            results.update(load)
        finally:
            if server is not None:
                results["service_rss_mb"] = server.rss_bytes() / 2**20
                server.stop()
    md += [f"_Report built in {time.perf_counter() - t0:.0f} s._", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "report.html").write_text(to_html("\n".join(md), out, f"Model lab report: {tag}"))
    log(f"report: {out / 'report.md'} and {out / 'report.html'}")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-airbench:latest")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=0, help="test images for the accuracy part (0 = all)")
    ap.add_argument("--no-load", dest="load", action="store_false", help="skip the service part")
    ap.add_argument("--no-ladder", dest="ladder", action="store_false", help="skip the optimization ladder")
    ap.add_argument("--ladder-rounds", type=int, default=5, help="interleaved speed rounds of the ladder")
    ap.add_argument("--host", default="", help="a running service on 127.0.0.1 (default: start one)")
    ap.add_argument("--backends", default=",".join(default_backends()), help="backends the load part exercises")
    ap.add_argument("--images", type=int, default=1000, help="test images the load part cycles through")
    ap.add_argument("--sweep-seconds", type=float, default=6.0)
    ap.add_argument("--single-stream-queries", type=int, default=200)
    ap.add_argument("--server-bound-ms", type=float, default=100.0)
    ap.add_argument("--server-seconds", type=float, default=8.0)
    ap.add_argument("--server-steps", type=int, default=6)
    ap.add_argument("--offline-images", type=int, default=1000)
    ap.add_argument("--locust-seconds", type=int, default=10, help="0 skips the Locust runs")
    ap.add_argument("--locust-users", type=int, default=8)
    ap.add_argument("--out", type=Path, default=REPO / "reports")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.command = ["python", "bench/report.py", *(sys.argv[1:] if argv is None else argv)]
    return one_line_errors(lambda: build_report(args))


if __name__ == "__main__":
    sys.exit(main())
