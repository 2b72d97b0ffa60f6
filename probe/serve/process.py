"""Run `python -m probe serve …` in a child process on a free loopback port, wait until /health says ready, and stop
it afterwards: how the tests and the load benchmark exercise the real server.

Example:
    >>> with running_server(["--store", "cache/demo.h5"]) as url:
    ...     json.load(urlopen(f"{url}/health"))["ready"]
    True
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.error import URLError
from urllib.request import urlopen


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m probe serve ARGS --host HOST --port <free>` as a child process; output goes to a log file."""

    def __init__(self, args: Sequence[str], host: str = "127.0.0.1", env: dict[str, str] | None = None):
        self.args, self.host, self.env = list(args), host, env
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._log = tempfile.NamedTemporaryFile("w+", prefix="probe-serve-", suffix=".log", delete=False)

    def output(self) -> str:
        """The last 4,000 characters the server wrote."""
        self._log.flush()
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def start(self, timeout: float = 120.0) -> str:
        """Start and wait until /health reports ready; returns the base URL. RuntimeError (with the server's
        output) when it exits or is not ready within ``timeout`` seconds."""
        port = free_port(self.host)
        cmd = [sys.executable, "-m", "probe", "serve", *self.args, "--host", self.host, "--port", str(port)]
        inherited = {k: v for k, v in os.environ.items() if k != "PROBE_TOKEN"}  # a token only when asked for
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**inherited, **(self.env or {})})
        reach = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # a wildcard bind answers on loopback
        self.url = f"http://{reach}:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`{' '.join(cmd)}` exited with code {self.proc.returncode}:\n{self.output()}")
            try:
                with urlopen(f"{self.url}/health", timeout=2) as r:
                    if json.load(r).get("ready"):
                        return self.url
            except (URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server was not ready after {timeout:.0f}s:\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM (uvicorn shuts down gracefully), SIGKILL after 10 s; returns the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc is not None else None

    def close(self) -> None:
        self.stop()
        self._log.close()
        os.unlink(self._log.name)


@contextmanager
def running_server(args: Sequence[str], host: str = "127.0.0.1", timeout: float = 120.0,
                   env: dict[str, str] | None = None) -> Iterator[str]:
    """Start the server with ``args`` (options of `probe serve`), yield its base URL once ready, stop it on exit."""
    server = ServerProcess(args, host, env)
    try:
        yield server.start(timeout)
    finally:
        server.close()
