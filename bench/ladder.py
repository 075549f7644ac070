#!/usr/bin/env python
"""The optimization ladder of a stored model: every way the lab can run it, measured side by side.

    python bench/ladder.py                                   # cifar10-airbench:latest, the whole test set
    python bench/ladder.py --model cifar10-custom-cnn --limit 2000
    python bench/ladder.py --from-card                       # the page from the export's measurements, no timing

Every backend of the registry that this model has a file for and this machine can run is one rung:
torch fp32 / bf16 / torch.compile, ONNX Runtime on the exported and simplified graphs, INT8, the
one-view (no test-time augmentation) graphs, OpenVINO fp32 / bf16 / INT8. Per rung, in one process
with the speed runs interleaved round by round (training/ladder.py): accuracy on the test set, its
top-1 changes and the 95 % interval of its accuracy difference against the served fp32 graph (paired
per image), latency at batch 1 (p50, p99), throughput at batch 64, load (compile) and warm-up time,
file size; the CPU's flags; the card's INT8 recipes. A rung the model has no file for, or this machine
cannot run, is listed with the reason. Writes ladder.md, ladder.html (self-contained), ladder.json and
ladder.png (the Pareto plot: accuracy lost against images/s) into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from lab.backends import BackendUnavailable, get_backend, list_backends, load_backend
from lab.card import read_card
from lab.hardware import cores, cpu_name
from lab.paths import REPO
from lab.store import get_model

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")


def labelled_folder(folder: Path, card, limit: int = 0):
    """Labelled images DIR/<class>/<image> through the card's preprocessing, as a test split."""
    import torch

    from training.data import ArrayDataset
    from training.import_onnx import read_folder

    images, labels = read_folder(folder, card.classes, card.preprocessing, limit)
    return ArrayDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                        list(card.classes), folder.name)


def ladder(tag: str, out: Path, *, data_root: Path | None = None, limit: int = 0, backends: list[str] | None = None,
           rounds: int = 5, max_drop: float = 0.005, images: Path | None = None, log=print) -> dict:
    from training.data import load_dataset, shuffled
    from training.ladder import best_rung, cpu_flags, measure, verdict

    m = get_model(tag)
    path, card = m.path, read_card(m.path)
    folder = images or (card.dataset.get("accuracy_folder") if card.imported else None)
    if folder:
        test = labelled_folder(Path(folder), card, limit)
    elif card.imported:
        raise ValueError(f"{m.tag} was imported without an accuracy folder: name labelled images with "
                         f"--images DIR (DIR/<class>/<image>)")
    else:
        test = load_dataset(card.dataset["name"], "test", data_root, progress=False)
    if limit and limit < len(test):
        test = shuffled(test, 0).subset(slice(0, limit))  # spread over the classes
    threads = cores()
    builders, files, reasons = {}, {}, {}
    for name in backends or list_backends():
        cls = get_backend(name)
        if cls.file not in card.files:
            reasons[name] = f"the model has no {cls.file}"
            continue
        try:
            cls.check_available()
        except BackendUnavailable as e:
            reasons[name] = str(e)
            continue
        builders[name] = lambda name=name: load_backend(name, path, card, threads)
        files[name] = path / cls.file
    log(f"ladder: {m.tag}, {len(test)} {test.name or card.dataset['name']} test images, {threads} threads, "
        f"rungs {', '.join(builders)}")
    t0 = time.perf_counter()
    rungs = measure(builders, test, card.preprocessing, reference="onnx", files=files, rounds=rounds, log=log)
    best, rule = best_rung(rungs, "onnx", max_drop)
    report = {"model": m.tag, "images": len(test), "threads": threads, "cpu": cpu_name(), "cpu_flags": cpu_flags(),
              "tta_level": card.tta_level, "reference": "onnx", "best": best, "rule": rule, "max_drop": max_drop,
              "card_best_rung": card.best_rung, "seconds": round(time.perf_counter() - t0, 1),
              "rungs": {n: r.to_dict() for n, r in rungs.items()},
              "absent": reasons, "int8": card.int8, "source": "measured by bench/ladder.py"}
    return write_page(report, card, out, log)


def from_card(tag: str, out: Path, *, max_drop: float = 0.005, log=print) -> dict:
    """The page from what the export measured and stored in the card (every published rung, in one process,
    on the whole test set, on the machine that exported it): no measuring. The export's own record (CPU,
    threads, time) is read from the run folder when it is still there."""
    from training.ladder import Rung, best_rung

    m = get_model(tag)
    card = read_card(m.path)
    if not card.rungs:
        raise ValueError(f"{m.tag}'s card has no rungs: it was published before the export measured them")
    known = set(Rung.__dataclass_fields__) - {"correct"}
    rungs = {n: Rung(**{**{k: v for k, v in r.items() if k in known}, "diff_ci95": tuple(r["diff_ci95"])})
             for n, r in card.rungs.items()}
    best, rule = best_rung(rungs, "onnx", max_drop)
    record = {}
    if card.run_dir:
        from lab.runfiles import ExportRecord, RunFiles

        if (Path(card.run_dir) / ExportRecord.FILE).is_file():
            record = RunFiles(Path(card.run_dir)).export().hooks.get("ladder") or {}
    report = {"model": m.tag, "images": (card.dataset or {}).get("test_images") or "all the",
              "threads": record.get("threads", "?"), "cpu": record.get("cpu", "the exporting machine"),
              "cpu_flags": record.get("cpu_flags", {}),
              "tta_level": card.tta_level, "reference": "onnx", "best": best, "rule": rule, "max_drop": max_drop,
              "card_best_rung": card.best_rung, "seconds": float(record.get("seconds", 0.0)),
              "rungs": dict(card.rungs), "absent": {}, "int8": card.int8,
              "source": "measured at export (the card's `rungs`), read from the store by `--from-card`"}
    return write_page(report, card, out, log)


def write_page(report: dict, card, out: Path, log=print) -> dict:
    """ladder.json, ladder.png (the Pareto plot), ladder.md and ladder.html of one report into `out`."""
    from training.ladder import verdict

    for r in report["rungs"].values():
        r["verdict"] = verdict(r["diff"], tuple(r["diff_ci95"])) if not r["note"] else ""
        r["description"] = get_backend(r["backend"]).description
        r.update({k: v for k, v in ((card.rungs or {}).get(r["backend"]) or {}).items()  # what the rung is
                  if k in ("network", "method", "views", "macs_per_image", "parameters", "train_seconds",
                           "train_epochs")})
    report["model_level"] = model_level_gain(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ladder.json").write_text(json.dumps(report, indent=1))
    pareto_plot(report, out / "ladder.png")
    (out / "ladder.md").write_text(markdown(report))
    from lab.report_html import write_html

    write_html(out / "ladder.md", f"Optimization ladder: {report['model']}")
    log(f"best rung: {report['best']} ({report['rule']}); written: {out / 'ladder.md'}, {out / 'ladder.html'}")
    return report


def model_level_gain(report: dict) -> dict | None:
    """The fastest rung within the bound over all rungs against the fastest within it that runs the served
    network (the runtime rungs alone): the speed-up the model-level rungs add, at batch 64."""
    bound = report["rungs"][report["reference"]]["accuracy"] - report["max_drop"] - 1e-12
    ok = [r for r in report["rungs"].values() if not r["note"] and r["accuracy"] >= bound]
    runtime = [r for r in ok if r.get("network", "served") == "served"]
    if not ok or not runtime:
        return None
    best, best_runtime = (max(rs, key=lambda r: r["images_per_s_b64"]) for rs in (ok, runtime))
    return {"best": best["backend"], "best_runtime": best_runtime["backend"],
            "speedup": best["images_per_s_b64"] / best_runtime["images_per_s_b64"]}


OFF_CHART_POINTS = 10.0  # rungs losing more accuracy than this are listed on the plot, not drawn


def pareto_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rungs = [r for r in report["rungs"].values() if not r["note"]]
    # a broken rung (tens of points lost) would squash every other onto the axis: it is named, not drawn
    off = [r for r in rungs if -100 * r["diff"] > OFF_CHART_POINTS]
    rungs = [r for r in rungs if r not in off]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(sorted(rungs, key=lambda r: r["images_per_s_b64"])):
        lost = -100 * r["diff"]
        lo, hi = -100 * r["diff_ci95"][1], -100 * r["diff_ci95"][0]
        ax.errorbar(r["images_per_s_b64"], lost, yerr=[[lost - lo], [hi - lost]], fmt="o",
                    color="C3" if r["backend"] == report["best"] else
                    "C0" if r.get("network", "served") == "served" else "C2", capsize=3)
        ax.annotate(r["backend"], (r["images_per_s_b64"], lost), textcoords="offset points",
                    xytext=(4, 6 + 10 * (i % 3)), fontsize=8)  # staggered: neighbours on the axis do not overlap
    front, best_acc = [], -np.inf  # the Pareto front: no other rung is both faster and more accurate
    for r in sorted(rungs, key=lambda r: -r["images_per_s_b64"]):
        if r["accuracy"] > best_acc:
            front.append(r)
            best_acc = r["accuracy"]
    ax.plot([r["images_per_s_b64"] for r in front], [-100 * r["diff"] for r in front], "--", color="0.6",
            label="Pareto front")
    ax.axhline(100 * report["max_drop"], color="C3", lw=0.8, ls=":", label="accuracy bound of the best rung")
    ax.axhline(0, color="0.3", lw=0.6)
    ax.plot([], [], "o", color="C0", label="runtime rungs (the served network)")
    ax.plot([], [], "o", color="C2", label="model-level rungs (students)")
    ax.set_xscale("log")
    ax.set_xlabel("images/s at batch 64 (log scale)")
    ax.set_ylabel(f"accuracy lost vs {report['reference']}, points (95 % CI)")
    ax.set_title(f"{report['model']}: {report['images']} test images, {report['threads']} threads", fontsize=10)
    if off:
        ax.text(0.01, 0.98, "off the chart: " + ", ".join(f"{r['backend']} ({-100 * r['diff']:.1f} points lost)"
                                                         for r in off),
                transform=ax.transAxes, fontsize=8, va="top", color="C3")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict) -> str:
    ref = report["rungs"][report["reference"]]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in report["cpu_flags"].items())
    lines = [f"# Optimization ladder: {report['model']}", "",
             "```", f"python bench/ladder.py --model {report['model']}"
             + (" --from-card" if "--from-card" in report.get("source", "") else ""), "```", "",
             f"Figures {report.get('source', 'measured by bench/ladder.py')}. "
             f"{report['images']} test images, {report['threads']} threads, {report['cpu']} ({flags}); "
             f"TTA level {report['tta_level']} in the served graph. Accuracy differences are against "
             f"`{report['reference']}` (the served fp32 graph, {100 * ref['accuracy']:.2f}%), paired per image "
             f"with a 95 % interval; speed runs interleaved over every rung, {report['seconds']:.0f} s in all.", "",
             f"**Best rung: `{report['best']}`**, {report['rule']}"
             + (f"; the card marks `{report['card_best_rung']}` (measured at export)." if report["card_best_rung"]
                else "."), "",
             "![Pareto plot: accuracy lost against throughput](ladder.png)", "",
             *([f"**Model-level rungs:** the fastest rung within the bound, `{gain['best']}`, runs "
                f"{gain['speedup']:.2f}x the images/s of the fastest within it that runs the served network "
                f"(`{gain['best_runtime']}`). A student is one trained network (one seed): its interval is over "
                f"test images only, not over training seeds.", ""] if (gain := report.get("model_level")) else []),
             "| rung | what | network / method / views | M MACs per image | parameters | training | accuracy "
             "| vs fp32, points (95 % CI) | verdict | top-1 changes | ms at batch 1, p50 / p99 "
             "| images/s at batch 64 | x fp32 | load s | warm-up s | MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rungs = sorted((r for r in report["rungs"].values() if not r["note"]), key=lambda r: -r["images_per_s_b64"])
    for r in rungs:
        lo, hi = r["diff_ci95"]
        macs = f"{r['macs_per_image'] / 1e6:.1f}" if r.get("macs_per_image") else ""
        params = f"{r['parameters']:,}" if r.get("parameters") else ""
        cost = (f"{r['train_epochs']:g} epochs, {r['train_seconds'] / 60:.1f} min" if r.get("train_seconds")
                else "")
        what = (f"{r['network']} / {r['method']} / {r['views']}" if r.get("network") else "")
        lines.append(f"| `{r['backend']}`{' **best**' if r['backend'] == report['best'] else ''} | {r['description']} "
                     f"| {what} | {macs} | {params} | {cost} | {100 * r['accuracy']:.2f}% | {100 * r['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] "
                     f"| {r['verdict']} | {r['top1_changes']} | {r['ms_b1_p50']:.2f} / {r['ms_b1_p99']:.2f} "
                     f"| {r['images_per_s_b64']:.0f} | {r['images_per_s_b64'] / ref['images_per_s_b64']:.2f}x "
                     f"| {r['load_s']:.1f} | {r['warmup_s']:.1f} | {r['bytes'] / 1e6:.1f} |")
    missing = {**{r["backend"]: r["note"] for r in report["rungs"].values() if r["note"]}, **report["absent"]}
    if missing:
        lines += ["", "Rungs not measured here:", ""] + [f"- `{n}`: {why}" for n, why in sorted(missing.items())]
    int8 = report.get("int8") or {}
    if int8.get("recipes"):
        lines += ["", "## INT8 recipes", "",
                  f"Chosen on held-out training images (never the test set): "
                  f"`{(int8.get('recipe') or {}).get('name', '?')}`; its test accuracy "
                  f"{100 * int8.get('accuracy', 0):.2f}% ({100 * int8.get('drop', 0):+.2f} points lost; "
                  f"{'published' if int8.get('accepted') else 'NOT published: over the bound'}).", "",
                  "| recipe | held-out agreement with fp32 | test points lost | quantize s |", "|---|---|---|---|"]
        for rec in int8["recipes"]:
            score = rec.get("held_out_agreement", rec.get("score"))
            drop = rec.get("test_drop", rec.get("drop"))
            lines.append(f"| `{rec.get('name')}` | {100 * score:.2f}% | "
                         f"{'' if drop is None else f'{100 * drop:+.2f}'} | {rec.get('quantize_seconds', '')} |"
                         if score is not None else f"| `{rec.get('name')}` | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cifar10-airbench:latest")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=0, help="use this many test images (0 = all)")
    ap.add_argument("--images", type=Path, default=None,
                    help="labelled test images DIR/<class>/<image> (an imported model's accuracy folder by default)")
    ap.add_argument("--backends", default="", help=f"comma-separated subset of {', '.join(list_backends())}")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    ap.add_argument("--max-drop", type=float, default=0.5, help="accuracy bound of the best rung, points")
    ap.add_argument("--out", type=Path, default=None, help="default reports/ladder/<model name>")
    ap.add_argument("--from-card", action="store_true",
                    help="measure nothing: the page from the rungs the export measured, stored in the card")
    args = ap.parse_args()
    from bench.accuracy_report import backends_or_exit, one_line_errors

    backends = backends_or_exit(args.backends)
    if backends and "onnx" not in backends:
        backends = ["onnx", *backends]  # the reference every difference is measured against
    out = args.out or REPO / "reports" / "ladder" / args.model.split(":")[0]
    if args.from_card:
        return one_line_errors(lambda: from_card(args.model, out, max_drop=args.max_drop / 100))
    return one_line_errors(lambda: ladder(args.model, out, data_root=args.data_root, limit=args.limit,
                                          backends=backends, rounds=args.rounds, max_drop=args.max_drop / 100,
                                          images=args.images))


if __name__ == "__main__":
    sys.exit(main())
