#!/usr/bin/env python
"""Every figure of one short GPU session (issue 13), in one process tree, into one JSON: run it through
bench/gpu_run.sh, which installs carried wheels (airbench) first.

    bash bench/gpu_run.sh                 # on the GPU machine: $OUT/gpu_run.json, gpu_run.log, ...
    bash bench/gpu_run.sh --tiny          # the same script on a CPU in about a minute (a few images)

Parts, each timed and recorded even when another fails:
  data         unpack the carried CIFAR-10 JPEG archive (bench/pack_cifar.py) into a data root under
               /tmp and decode it once into a cache there
  accuracy     bench/time_to_accuracy.py: the quick recipe for 3 seeds, seconds to the target accuracy with
               TTA, airbench94 beside it when installed, the TTA evaluation of the 10,000 test images (on
               the device, and the earlier host fp32 way on 2,000 of them)
  pipeline     training/run_all.py --only train,evaluate (the quick preset, seed 0) as a user runs it:
               the run's own train and evaluate seconds (trained.json, metrics.json)
  torchrun     torchrun --nproc-per-node 1 training/run_all.py --preset smoke --only train,evaluate: the
               launcher and process-group path (NCCL on a GPU)
  levers       each speed lever switched on its own, 3 epochs each (levers.json); torch.compile last,
               skipped when less than 150 s remain before --deadline-s
  imports      that none of the above imported BentoML or onnxsim

Needs only torch, numpy, Pillow, tqdm and matplotlib with PYTHONPATH=. (no project install).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TINY = ["--train-limit", "512", "--test-limit", "256", "--epochs", "1", "--batch-size", "64",
        "--model-kwargs", '{"widths": [16, 32, 32]}', "--target", "0.15"]
TINY_SEEDS, TINY_LEVERS = ["--seeds", "2"], ["--levers", "baseline,data_on_host", "--lever-epochs", "2"]
FULL_SEEDS = ["--seeds", "3", "--target", "0.90"]
FULL_LEVERS = ["--levers", "baseline,data_on_host,sync_every_step,unfused_optim,no_cudnn_benchmark,nchw,fp32,compile"]


class Recorder:
    def __init__(self, out: Path):
        self.out, self.result = out, {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
        out.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        (self.out / "gpu_run.json").write_text(json.dumps(self.result, indent=1, default=str))

    def part(self, name: str, fn) -> None:
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            value = fn()
            self.result["parts"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 2), **(value or {})}
        except BaseException as e:  # a failed part is a result; the next part still runs
            if isinstance(e, KeyboardInterrupt):
                raise
            traceback.print_exc()
            self.result["parts"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 2),
                                          "error": f"{type(e).__name__}: {e}"[:2000]}
        print(f"== {name}: {'ok' if self.result['parts'][name]['ok'] else 'FAILED'} "
              f"({self.result['parts'][name]['seconds']:.1f} s)", flush=True)
        self.save()


def run(cmd: list[str], env: dict, timeout: float, log: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    print(proc.stdout[-4000:], proc.stderr[-2000:] if proc.returncode else "", flush=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:4])} ... exited {proc.returncode}; see {log.name}")
    return proc


def last_run_dir(stdout: str) -> Path:
    return Path(stdout.strip().splitlines()[-1].split("run folder: ")[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, default=REPO / ".gpu" / "cifar10-jpg.npz")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/gpu-run-out"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/lab-gpu-run"), help="data root, cache and runs")
    ap.add_argument("--tiny", action="store_true", help="a few images and one epoch (the CPU check)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip")
    ap.add_argument("--accuracy-args", default="", help="extra arguments for bench/time_to_accuracy.py")
    ap.add_argument("--deadline-s", type=float, default=400,
                    help="seconds from the start after which no lever starts (compile: 150 s before)")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()
    rec = Recorder(args.out)
    work = args.work
    data_root, cache, runs = work / "data", work / "cache", work / "runs"
    os.environ.update(LAB_DATA_ROOT=str(data_root), LAB_CACHE_DIR=str(cache), LAB_RUNS_DIR=str(runs),
                      BENTOML_DO_NOT_TRACK="True", PYTHONUNBUFFERED="1")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))

    import torch

    def environment():
        info = {"torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count(),
                "cuda": torch.cuda.is_available(), "tiny": args.tiny}
        if torch.cuda.is_available():
            info.update(gpu=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda,
                        bf16=torch.cuda.is_bf16_supported())
        try:
            import airbench  # noqa: F401
            info["airbench"] = "importable"
        except Exception as e:
            info["airbench"] = f"not importable: {type(e).__name__}"
        return info

    def data():
        from bench.pack_cifar import unpack
        from training.data import load_dataset

        t0 = time.perf_counter()
        if not (data_root / "cifar10-jpg").is_dir():
            unpack(args.pack, data_root)
        unpacked = time.perf_counter() - t0
        t0 = time.perf_counter()
        train = load_dataset("cifar10", "train", data_root, progress=False)
        test = load_dataset("cifar10", "test", data_root, progress=False)
        return {"unpack_seconds": round(unpacked, 2), "decode_seconds": round(time.perf_counter() - t0, 2),
                "train_images": len(train), "test_images": len(test)}

    def accuracy():
        from bench import time_to_accuracy

        argv = ((TINY + TINY_SEEDS) if args.tiny else FULL_SEEDS) + ["--tta-eval", "--out", str(args.out)]
        argv += args.accuracy_args.split()
        print("python -m bench.time_to_accuracy " + " ".join(argv), flush=True)
        time_to_accuracy.main(argv)
        r = json.loads((args.out / "time_to_accuracy.json").read_text())
        ours, ab = r["ours"], r.get("airbench94", {})
        return {"summary": {
            "time_to_target": ours.get("time_to_target"), "reached": ours.get("reached"),
            "final_tta_acc": ours.get("final_tta_acc"), "train_seconds": ours.get("train_seconds"),
            "first_epoch_seconds": ours.get("first_epoch_seconds"),
            "later_epoch_seconds": ours.get("later_epoch_seconds"),
            "tta_eval": {k: v for k, v in r.get("tta_eval", {}).items() if k != "host_fp32"},
            "tta_eval_host_fp32_per_10000": (r.get("tta_eval", {}).get("host_fp32") or {}).get("seconds_per_10000"),
            "airbench94": {k: ab.get(k) for k in ("available", "reason", "train_seconds", "tta_acc", "reached")},
            "ratio": r.get("ratio")}, "file": "time_to_accuracy.json"}

    def pipeline():
        cmd = [sys.executable, str(REPO / "training" / "run_all.py"), "--no-progress", "--fresh",
               "--only", "train,evaluate", "--seed", "0"]
        cmd += (["--preset", "smoke"] if args.tiny else ["--preset", "quick"])
        proc = run(cmd, env, 600, args.out / "pipeline.log")
        d = last_run_dir(proc.stdout)
        trained = json.loads((d / "trained.json").read_text())["training"]
        metrics = json.loads((d / "metrics.json").read_text())
        return {"training": {k: trained.get(k) for k in ("train_seconds", "wall_seconds", "images_per_second",
                                                          "device", "precision", "world_size", "epochs")},
                "epoch_seconds": [h["seconds"] for h in json.loads((d / "trained.json").read_text())["history"]],
                "evaluate": {k: {kk: v.get(kk) for kk in ("accuracy", "seconds", "precision", "device")}
                             for k, v in metrics.items()}}

    def torchrun():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               str(REPO / "training" / "run_all.py"), "--no-progress", "--fresh", "--preset", "smoke",
               "--only", "train,evaluate"]
        proc = run(cmd, env, 300, args.out / "torchrun.log")
        d = last_run_dir(proc.stdout)
        trained = json.loads((d / "trained.json").read_text())["training"]
        return {"world_size": trained["world_size"], "device": trained["device"]}

    def levers():
        from bench import time_to_accuracy

        left = args.deadline_s - (time.perf_counter() - started)
        argv = ((TINY + TINY_LEVERS) if args.tiny else FULL_LEVERS) + [
            "--seeds", "0", "--no-airbench", "--deadline-s", str(max(left, 1)), "--out", str(args.out / "levers")]
        print("python -m bench.time_to_accuracy " + " ".join(argv), flush=True)
        time_to_accuracy.main(argv)
        src = args.out / "levers" / "time_to_accuracy.json"
        r = json.loads(src.read_text())
        (args.out / "levers.json").write_text(json.dumps(r, indent=1))
        src.unlink()
        src.parent.rmdir()
        return {"levers": {k: {kk: v.get(kk) for kk in ("first_epoch", "later_epoch_median", "later_epoch_vs_baseline",
                                                          "skipped", "error")}
                           for k, v in r.get("levers", {}).items()}, "file": "levers.json"}

    def imports():
        heavy = [m for m in ("bentoml", "onnxsim") if m in sys.modules]
        if heavy:
            raise RuntimeError(f"imported {heavy}")
        return {"bentoml_or_onnxsim_imported": False}

    rec.part("environment", environment)
    for name, fn in (("data", data), ("accuracy", accuracy), ("pipeline", pipeline), ("torchrun", torchrun),
                     ("levers", levers), ("imports", imports)):
        if name not in skip:
            rec.part(name, fn)
    rec.result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    rec.save()
    failed = [n for n, p in rec.result["parts"].items() if not p["ok"]]
    print(f"\nfigures: {args.out / 'gpu_run.json'}" + (f"; FAILED parts: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
