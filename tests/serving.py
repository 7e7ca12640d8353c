"""A real server process for tests: `python -m mlx_qwen2.server` on a port the system picks, stopped by SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

READY = re.compile(r"serving .* on (http://[\d.]+:\d+)")


class ServerProcess:
    """Start the server with these flags; `url` once it listens; `log` holds its stderr lines."""

    def __init__(self, model: Path, *flags: str, timeout: float = 120.0):
        cmd = [sys.executable, "-m", "mlx_qwen2.server", "--model", str(model), "--port", "0", *flags]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.log: list[str] = []
        self.url = ""
        found = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.log.append(line.rstrip("\n"))
                m = READY.search(line)
                if m and not found.is_set():
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(timeout) or not self.url:
            self.stop()
            raise RuntimeError("server did not start:\n" + "\n".join(self.log))

    def client(self, key: str | None = None, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def metric(self, name: str, key: str | None = None) -> float:
        text = self.client(key).get("/metrics").text
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait_until(self, check, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if check():
                return True
            time.sleep(0.05)
        return False
