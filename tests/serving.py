"""Starting ``qwenlm serve`` as a subprocess on a free loopback port, for the tests and the benchmark."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: str | Path, *args: str, startup_s: float = 300) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield ``(base_url, process)`` of a server for ``model`` once ``/health`` answers; stop it afterwards."""
    import httpx

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="qwenlm-serve-", suffix=".log", delete=False)  # noqa: SIM115
    command = [sys.executable, "-m", "qwenlm", "serve", "--model", str(model), "--port", str(port), *args]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}:\n{Path(log.name).read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start in {startup_s} s:\n{Path(log.name).read_text()}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)
