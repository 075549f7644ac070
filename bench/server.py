"""Start `bentoml serve` (or any ASGI app under uvicorn) as a subprocess on a free 127.0.0.1 port."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`bentoml serve` from the project root (or `cmd`, given {port}), stopped with its process group; on
    a free port, or `port` when the caller chose it (a server whose settings file names it)."""

    def __init__(self, env: dict, log_path: Path, extra_env: dict | None = None,
                 startup_timeout: float = 120, cmd: list[str] | None = None, ready_path: str = "/readyz",
                 cwd: Path = REPO, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(env, **(extra_env or {}))
        bin_dir = Path(sys.executable).parent
        cmd = cmd or [str(bin_dir / "bentoml"), "serve", "--host", "127.0.0.1", "--port", "{port}"]
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"{cmd[0]} did not get ready in {startup_timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its worker processes."""
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
