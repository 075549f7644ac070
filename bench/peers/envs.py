#!/usr/bin/env python
"""The peers' environments: each peer server in a virtual environment of its own, installed from its own lock.

    python bench/peers/envs.py kserve mlserver      # create or reuse .cache/peers/<name>/venv, print its python
    python bench/peers/envs.py --lock kserve        # remake bench/peers/kserve/requirements.lock (uv, hashes)

KServe and MLServer pin other FastAPI, uvicorn and pydantic versions than the service's lock
(requirements.lock), so neither is ever installed beside it. `bench/peers/<name>/requirements.in` names the
peer and the runtime (onnxruntime, numpy and Pillow at the service's versions); `requirements.lock` pins
every package with sha256 hashes, made with the project's pinned uv on the indexes pip is configured with
(as `make lock` does). `ensure(name)` creates `.cache/peers/<name>/venv` with `python -m venv` and installs
exactly the lock (`pip install --require-hashes --no-deps`, then `pip check`) the first time; a stamp holding
the lock's sha256 makes later calls reuse it, and a changed lock reinstalls it from scratch.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PEERS = ("kserve", "mlserver")
CACHE = REPO / ".cache" / "peers"


def lock_path(name: str) -> Path:
    return HERE / name / "requirements.lock"


def lock_hash(name: str) -> str:
    return hashlib.sha256(lock_path(name).read_bytes()).hexdigest()


def venv_python(name: str, cache: Path = CACHE) -> Path:
    return cache / name / "venv" / "bin" / "python"


def is_ready(name: str, cache: Path = CACHE) -> bool:
    """The environment exists and was installed from the lock as it is now."""
    stamp = cache / name / "venv" / ".installed"
    return venv_python(name, cache).exists() and stamp.exists() and stamp.read_text().strip() == lock_hash(name)


def base_python() -> str:
    """The interpreter this project's environment was made from (a venv is made from it, not from a venv)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def ensure(name: str, cache: Path = CACHE, log=print) -> Path:
    """The python of `name`'s environment, created and installed from its lock the first time (minutes)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; the peers are {', '.join(PEERS)}")
    py = venv_python(name, cache)
    if is_ready(name, cache):
        return py
    venv = py.parent.parent
    if venv.exists():
        shutil.rmtree(venv)  # a stale or half-made environment: made again from the lock
    venv.parent.mkdir(parents=True, exist_ok=True)
    log(f"creating {venv} from {lock_path(name).relative_to(REPO)} (once; a few minutes) ...")
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True)
    install_log = venv.parent / "install.log"
    with open(install_log, "w") as out:
        for cmd in ([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--require-hashes",
                     "--no-deps", "-r", str(lock_path(name))],
                    [str(py), "-m", "pip", "check"]):
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[2:5])} failed for {name} (log: {install_log}):\n"
                                   + install_log.read_text()[-3000:])
    (venv / ".installed").write_text(lock_hash(name) + "\n")
    return py


def compile_lock(name: str) -> None:
    """Remake bench/peers/<name>/requirements.lock with the project's uv, as `make lock` remakes the service's."""
    pip = [sys.executable, "-m", "pip", "config", "get"]
    extra = []
    for key, flag in (("global.extra-index-url", "--extra-index-url"), ("global.find-links", "--find-links")):
        got = subprocess.run([*pip, key], capture_output=True, text=True)
        extra += [a for u in (got.stdout.split() if got.returncode == 0 else []) for a in (flag, u)]
    uv = Path(sys.executable).parent / "uv"
    subprocess.run([str(uv), "pip", "compile", str(HERE / name / "requirements.in"), "--universal",
                    "--python-version", "3.11", "--generate-hashes", "--index-strategy", "unsafe-best-match",
                    "--custom-compile-command", f"python bench/peers/envs.py --lock {name}", *extra,
                    "-o", str(lock_path(name))], check=True, cwd=REPO)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peers", nargs="*", help=f"of {', '.join(PEERS)} (default: all)")
    ap.add_argument("--lock", action="store_true", help="remake the peers' locks instead")
    args = ap.parse_args()
    for name in args.peers or PEERS:
        if args.lock:
            compile_lock(name)
        else:
            print(f"{name}: {ensure(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
