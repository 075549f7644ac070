#!/usr/bin/env python
"""Seconds of training to reach a target test accuracy (with TTA), over seeds, on whatever device runs it;
with airbench94 installed (pip airbench==0.1.8, optional, CUDA only) the same measurement of airbench94
in the same process, for the ratio.

    python -m bench.time_to_accuracy                      # the quick recipe, 3 seeds, target 90% with TTA
    python -m bench.time_to_accuracy --seeds 5 --target 0.91 --out reports
    python -m bench.time_to_accuracy --set compile=true   # any TrainConfig field, e.g. a speed lever
    python -m bench.time_to_accuracy --levers             # + each speed lever switched, epoch seconds
    python -m bench.time_to_accuracy --seeds 0 --levers compile --no-airbench   # the levers alone
    python -m bench.time_to_accuracy --train-limit 512 --test-limit 256 --epochs 1 --batch-size 64 \\
        --model-kwargs '{"widths": [16, 32, 32]}' --target 0.2    # a minute on a CPU

Definitions (the same for both models):
  training seconds  the data-dependent initialisation (the whitening fit) plus the optimisation steps,
                    the device synchronised before each clock reading, without any evaluation; for
                    airbench94 its own timer, which covers the same (whitening init + epochs)
  time to target    the training seconds at the end of the first epoch whose test accuracy with TTA
                    reaches the target (per seed; none if no epoch does); airbench94 trains a fixed
                    budget and is evaluated at its end, so its time to target is its training seconds
  the ratio         median time to target of this project / median of airbench94's

A warm-up run (not counted) comes first on a GPU, as airbench's own warmup94 does, so that cuDNN's
algorithm search and the first CUDA calls are not charged to the first seed.

Only torch, numpy and the project's training code are needed (no BentoML, no onnxsim): it runs on a bare
GPU machine with PYTHONPATH=. (bench/gpu_run.sh).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from lab.paths import REPO
from models import create_model, with_tta
from training.data import default_data_root
from training.engine import TrainConfig, pick_device, synchronize, train
from training.evaluate import eval_precision, predict_torch
from training.pipeline import Run, load_splits, make_spec
from training.presets import get_preset

AIRBENCH_VERSION = "0.1.8"

# name -> TrainConfig changes; the "baseline" is the recipe with every lever at its default
LEVERS = {
    "baseline": {},
    "data_on_host": {"data_device": "cpu"},
    "sync_every_step": {"finite_check": "step"},
    "unfused_optim": {"fused_optim": False},
    "no_cudnn_benchmark": {"cudnn_benchmark": False},
    "nchw": {"channels_last": False},
    "fp32": {"precision": "fp32"},
    "compile": {"compile": True},
    "compile_cudagraphs": {"compile": True, "compile_mode": "reduce-overhead"},
}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def summary(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def parse_set(items: list[str]) -> dict:
    """--set key=value pairs into TrainConfig fields, typed after the field's default."""
    types = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        if key not in types:
            raise SystemExit(f"error: --set {item}: unknown TrainConfig field {key!r}")
        default = types[key].default
        if raw.lower() in ("none", "null"):
            out[key] = None
        elif isinstance(default, bool) or key in ("fused_optim", "channels_last"):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"error: --set {item}: expected true or false")
            out[key] = raw.lower() in ("true", "1")
        elif isinstance(default, int):
            out[key] = int(raw)
        elif isinstance(default, float):
            out[key] = float(raw)
        else:
            out[key] = raw
    return out


# ---------------------------------------------------------------- data


def load(args) -> tuple:
    """The preset's splits (the quick preset: all 50,000 training and 10,000 test images) and its config."""
    p = get_preset(args.preset)
    over = {"train_limit": args.train_limit if args.train_limit is not None else p.train_limit,
            "test_limit": args.test_limit if args.test_limit is not None else p.test_limit}
    if args.model_kwargs is not None:
        over["model_kwargs"] = args.model_kwargs
    train_over = {k: v for k, v in dict(epochs=args.epochs, batch_size=args.batch_size).items() if v is not None}
    p = replace(p, **over, overrides={**p.overrides, **train_over, **parse_set(args.set)})
    run = Run(dir=Path(tempfile.gettempdir()), preset=p, data_root=args.data_root or default_data_root(),
              progress=False)
    train_set, _val, test = load_splits(run)
    return p, p.config(), train_set, test, make_spec(train_set)


def build(p, train_set, seed: int) -> torch.nn.Module:
    kwargs = dict(p.model_kwargs, num_classes=len(train_set.classes), in_channels=train_set.channels)
    kwargs.setdefault("image_size", train_set.size[0])
    return create_model(p.model, seed=seed, **kwargs)


# ---------------------------------------------------------------- this project


def tta_accuracy(model, test, spec, level: int, device) -> tuple[float, float]:
    """Test accuracy with TTA on the device (bf16 on a GPU) and its seconds (synchronised)."""
    synchronize(device)
    t0 = time.perf_counter()
    logits = predict_torch(with_tta(model, level), test, spec, precision=eval_precision(device), device=device)
    synchronize(device)
    seconds = time.perf_counter() - t0
    return float((logits.argmax(1) == test.labels.numpy()).mean()), seconds


def measure_ours(p, cfg, train_set, test, spec, seeds: list[int], target: float, device,
                 warmup: bool = True) -> dict:
    level = cfg.tta_level
    quiet = {"progress": False, "log": lambda *_: None, "device": device}
    out = {"model": p.model, "model_kwargs": p.model_kwargs, "recipe": cfg.recipe, "tta_level": level,
           "config": {k: v for k, v in cfg.__dict__.items()}, "runs": []}
    if warmup:
        t0 = time.perf_counter()
        warm = replace(cfg, epochs=min(cfg.epochs, 1.0), seed=10_000)
        res = train(build(p, train_set, 10_000), train_set, spec, warm, **quiet)
        tta_accuracy(res.model, test, spec, level, device)
        out["warmup_seconds"] = round(time.perf_counter() - t0, 2)
        log(f"warm-up run: {out['warmup_seconds']:.1f} s (not counted)")
    last_model = None
    for seed in seeds:
        def on_epoch_end(model, record):
            record["test_tta_acc"], record["tta_eval_seconds"] = tta_accuracy(model, test, spec, level, device)

        res = train(build(p, train_set, seed), train_set, spec, replace(cfg, seed=seed),
                    on_epoch_end=on_epoch_end, **quiet)
        hist = res.history
        reached = next((r for r in hist if r["test_tta_acc"] >= target), None)
        run = {"seed": seed, "train_seconds": res.train_seconds, "final_tta_acc": hist[-1]["test_tta_acc"],
               "time_to_target": reached["train_seconds"] if reached else None,
               "epoch_reached": reached["epoch"] if reached else None,
               "epoch_seconds": [r["seconds"] for r in hist], "images_per_second": res.images_per_second,
               "curve": [[r["train_seconds"], r["test_tta_acc"]] for r in hist],
               "tta_eval_seconds": [r["tta_eval_seconds"] for r in hist], "wall_seconds": res.wall_seconds,
               "device": res.device, "precision": res.precision}
        out["runs"].append(run)
        tt = f"{run['time_to_target']:.2f} s (epoch {run['epoch_reached']})" if reached else "not reached"
        log(f"seed {seed}: {res.train_seconds:.2f} s of training, TTA accuracy {100 * run['final_tta_acc']:.2f}%, "
            f"time to {100 * target:.1f}%: {tt}; epochs {', '.join(f'{s:.2f}' for s in run['epoch_seconds'])} s")
        last_model = res.model
    runs = out["runs"]
    out["time_to_target"] = summary([r["time_to_target"] for r in runs if r["time_to_target"] is not None])
    out["reached"] = sum(r["time_to_target"] is not None for r in runs)
    out["train_seconds"] = summary([r["train_seconds"] for r in runs])
    out["final_tta_acc"] = summary([r["final_tta_acc"] for r in runs])
    out["first_epoch_seconds"] = summary([r["epoch_seconds"][0] for r in runs])
    out["later_epoch_seconds"] = summary([s for r in runs for s in r["epoch_seconds"][1:]])
    return out, last_model


def measure_levers(p, cfg, train_set, spec, device, names: list[str], epochs: float = 3,
                   deadline: float | None = None) -> dict:
    """Each lever switched on its own (the rest at their defaults): seconds of the first epoch (which
    carries compilation and cuDNN's search) and the median of the later ones. Past `deadline` (a
    time.perf_counter() reading; compilation wants 150 s before it) the remaining levers are skipped."""
    out = {}
    quiet = {"progress": False, "log": lambda *_: None, "device": device}
    for name in names:
        change = LEVERS[name]
        if deadline is not None and time.perf_counter() > deadline - (150 if change.get("compile") else 15):
            out[name] = {"change": change, "skipped": "out of time"}
            log(f"lever {name:<20} skipped: out of time")
            continue
        try:
            t0 = time.perf_counter()
            res = train(build(p, train_set, 0), train_set, spec, replace(cfg, epochs=epochs, seed=0, **change),
                        **quiet)
            secs = [r["seconds"] for r in res.history]
            later = statistics.median(secs[1:]) if len(secs) > 1 else None
            out[name] = {"change": change, "epoch_seconds": secs, "first_epoch": secs[0], "later_epoch_median": later,
                         "first_epoch_extra": secs[0] - later if later is not None else None,
                         "train_seconds": res.train_seconds, "wall_seconds": time.perf_counter() - t0,
                         "final_train_loss": res.history[-1]["train_loss"]}
            log(f"lever {name:<20} first epoch {secs[0]:7.3f} s, later epochs {later if later is None else round(later, 3)} s")
        except Exception as e:  # a lever this machine cannot pull (CUDA graphs, say) is a result too
            out[name] = {"change": change, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            log(f"lever {name:<20} failed: {out[name]['error']}")
    base = out.get("baseline", {}).get("later_epoch_median")
    for name, r in out.items():
        if base and r.get("later_epoch_median"):
            r["later_epoch_vs_baseline"] = r["later_epoch_median"] / base
    return out


def measure_tta_eval(model, test, spec, level: int, device, repeats: int = 3, host_images: int = 2000) -> dict:
    """The TTA evaluation of the test set on the device (cold, then warm), and the earlier way (the model
    on the CPU in fp32, host batches of 500) on `host_images` images, scaled to the whole set."""
    out = {"images": len(test), "tta_level": level, "device": str(device), "precision": eval_precision(device)}
    model = model.to(device)
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        model = model.to(memory_format=torch.channels_last)
    times = []
    for _ in range(1 + repeats):
        acc, secs = tta_accuracy(model, test, spec, level, device)
        times.append(secs)
    out.update(accuracy=acc, cold_seconds=times[0], warm_seconds=statistics.median(times[1:]))
    if host_images:
        sub = test.subset(slice(0, min(host_images, len(test))))
        cpu_model = model.to("cpu")
        t0 = time.perf_counter()
        predict_torch(with_tta(cpu_model, level), sub, spec, precision="fp32", batch_size=500, device="cpu")
        secs = time.perf_counter() - t0
        out["host_fp32"] = {"images": len(sub), "seconds": secs, "seconds_per_10000": secs * 10000 / len(sub),
                            "threads": torch.get_num_threads()}
        model.to(device)
    return out


# ---------------------------------------------------------------- airbench94


def airbench_status() -> tuple[object | None, str]:
    if not torch.cuda.is_available():
        return None, "airbench94 runs on CUDA only"
    try:
        import airbench
    except Exception as e:
        return None, f"airbench is not importable ({type(e).__name__}: {e}); pip install airbench=={AIRBENCH_VERSION}"
    return airbench, ""


def _parse_airbench_table(text: str) -> dict:
    """The rows airbench94 prints: run, epoch, train_loss, train_acc, val_acc, tta_val_acc, total_time_seconds."""
    cols = ["run", "epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc", "total_time_seconds"]
    rows = []
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(cols) and cells[0] != "run":
            rows.append(dict(zip(cols, cells)))
    epochs = [r for r in rows if r["epoch"].isdigit()]
    final = next((r for r in rows if r["epoch"] == "eval"), None)
    return {"train_seconds": float(epochs[-1]["total_time_seconds"]) if epochs else None,
            "tta_acc": float(final["tta_val_acc"]) if final and final["tta_val_acc"] else None,
            "epochs": len(epochs)}


def measure_airbench(train_set, test, seeds: list[int], target: float, workdir: Path) -> dict:
    """airbench94 on the same images (its loaders read cifar10/{train,test}.pt from the working folder)."""
    airbench, why = airbench_status()
    if airbench is None:
        return {"available": False, "reason": why}
    data = workdir / "cifar10"
    data.mkdir(parents=True, exist_ok=True)
    for name, ds in (("train", train_set), ("test", test)):
        torch.save({"images": ds.images.permute(0, 2, 3, 1).contiguous(), "labels": ds.labels.clone(),
                    "classes": list(ds.classes)}, data / f"{name}.pt")
    out = {"available": True, "version": getattr(airbench, "__version__", AIRBENCH_VERSION), "runs": [],
           "train_images": len(train_set), "test_images": len(test)}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            airbench.warmup94()  # airbench's own warm-up: one step, not counted
        for seed in seeds:
            torch.manual_seed(seed)
            buf = io.StringIO()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(buf):
                airbench.train94(verbose=True)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            parsed = _parse_airbench_table(buf.getvalue())
            run = {"seed": seed, **parsed, "wall_seconds_with_evaluations": wall}
            run["time_to_target"] = (parsed["train_seconds"] if parsed["tta_acc"] is not None
                                     and parsed["tta_acc"] >= target else None)
            out["runs"].append(run)
            log(f"airbench94 seed {seed}: {parsed['train_seconds']} s of training, TTA accuracy "
                f"{100 * (parsed['tta_acc'] or 0):.2f}%")
    finally:
        os.chdir(cwd)
    runs = out["runs"]
    out["train_seconds"] = summary([r["train_seconds"] for r in runs if r["train_seconds"] is not None])
    out["tta_acc"] = summary([r["tta_acc"] for r in runs if r["tta_acc"] is not None])
    out["time_to_target"] = summary([r["time_to_target"] for r in runs if r["time_to_target"] is not None])
    out["reached"] = sum(r["time_to_target"] is not None for r in runs)
    return out


# ---------------------------------------------------------------- the report


def environment(device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
           "python": sys.version.split()[0]}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        from lab.hardware import cpu_name

        env["cpu"] = cpu_name()
    return env


def print_summary(result: dict) -> None:
    ours, ab, target = result["ours"], result.get("airbench94", {}), result["target"]
    tt = ours["time_to_target"]
    log("")
    log(f"time to {100 * target:.1f}% test accuracy with TTA on {result['environment'].get('gpu') or result['environment'].get('cpu')}:")
    if tt:
        log(f"  this project ({ours['recipe']}): median {tt['median']:.2f} s (min {tt['min']:.2f}, max {tt['max']:.2f}; "
            f"{ours['reached']}/{len(ours['runs'])} seeds reached it); final TTA accuracy median "
            f"{100 * ours['final_tta_acc']['median']:.2f}%")
    else:
        log(f"  this project: no seed reached the target (final TTA accuracy median "
            f"{100 * ours['final_tta_acc']['median']:.2f}%)")
    log(f"  training seconds median {ours['train_seconds']['median']:.2f} s; first epoch "
        f"{ours['first_epoch_seconds']['median']:.3f} s, later epochs "
        + (f"{ours['later_epoch_seconds']['median']:.3f} s" if ours["later_epoch_seconds"] else "-"))
    if ab.get("available"):
        abt = ab["train_seconds"]
        log(f"  airbench94 {ab['version']}: training seconds median {abt['median']:.2f} s (min {abt['min']:.2f}, "
            f"max {abt['max']:.2f}), TTA accuracy median {100 * ab['tta_acc']['median']:.2f}% "
            f"({ab['reached']}/{len(ab['runs'])} reached the target)")
        if result.get("ratio"):
            log(f"  ratio (this project / airbench94): {result['ratio']:.2f}x")
    elif ab:
        log(f"  airbench94: not measured ({ab['reason']})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3; 0: only --levers)")
    ap.add_argument("--target", type=float, default=0.90, help="test accuracy with TTA to reach (default 0.90)")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--epochs", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--model-kwargs", type=json.loads, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a TrainConfig field, e.g. compile=true, data_device=cpu, finite_check=step")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when present)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None,
                    help="an uncounted warm-up run first (default: on a GPU)")
    ap.add_argument("--no-airbench", action="store_true", help="do not measure airbench94 even if installed")
    ap.add_argument("--levers", nargs="?", const="all", default="",
                    help=f"also time each speed lever (comma-separated, default all: {', '.join(LEVERS)})")
    ap.add_argument("--lever-epochs", type=float, default=3)
    ap.add_argument("--deadline-s", type=float, default=0, help="skip the levers left after this many seconds")
    ap.add_argument("--tta-eval", action="store_true", help="also time the TTA evaluation of the test set")
    ap.add_argument("--out", type=Path, default=REPO / "reports")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else pick_device()
    p, cfg, train_set, test, spec = load(args)
    log(f"time to accuracy: {p.model} ({cfg.recipe}), {len(train_set)} training and {len(test)} test images, "
        f"{cfg.epochs:g} epochs, batch {cfg.batch_size}, target {100 * args.target:.1f}% with TTA level "
        f"{cfg.tta_level}, device {device}")
    result = {"target": args.target, "environment": environment(device), "seeds": list(range(args.seeds)),
              "train_images": len(train_set), "test_images": len(test)}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "time_to_accuracy.json"

    def save():  # after every part, so that a run cut short keeps what it measured
        path.write_text(json.dumps(result, indent=1, default=str))

    warmup = device.type == "cuda" if args.warmup is None else args.warmup
    deadline = time.perf_counter() + args.deadline_s if args.deadline_s else None
    seeds, model = list(range(args.seeds)), None
    if seeds:
        result["ours"], model = measure_ours(p, cfg, train_set, test, spec, seeds, args.target, device,
                                             warmup=warmup)
        save()
    if seeds and not args.no_airbench:
        with tempfile.TemporaryDirectory(prefix="airbench-") as tmp:
            try:
                result["airbench94"] = measure_airbench(train_set, test, list(range(args.seeds)), args.target,
                                                        Path(tmp))
            except Exception as e:
                result["airbench94"] = {"available": False, "reason": f"failed: {type(e).__name__}: {e}"}
        ab, ours = result["airbench94"], result["ours"]
        if ab.get("available") and ab.get("train_seconds") and ours.get("time_to_target"):
            base = ab["time_to_target"] or ab["train_seconds"]
            result["ratio"] = ours["time_to_target"]["median"] / base["median"]
        save()
    if args.tta_eval and model is not None:
        result["tta_eval"] = measure_tta_eval(model, test, spec, cfg.tta_level, device)
        t = result["tta_eval"]
        log(f"TTA evaluation of {len(test)} test images on {device} ({t['precision']}): {t['cold_seconds']:.2f} s "
            f"cold, {t['warm_seconds']:.2f} s warm; the earlier way (host, fp32, batches of 500): "
            f"{t['host_fp32']['seconds_per_10000'] * len(test) / 10000:.2f} s (from {t['host_fp32']['images']} images)")
        save()
    if args.levers:
        names = list(LEVERS) if args.levers == "all" else [n.strip() for n in args.levers.split(",")]
        bad = [n for n in names if n not in LEVERS]
        if bad:
            raise SystemExit(f"error: unknown lever(s) {bad}; valid: {', '.join(LEVERS)}")
        result["levers"] = measure_levers(p, cfg, train_set, spec, device, names, args.lever_epochs, deadline)
        save()
    if "ours" in result:
        print_summary(result)
    log(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
