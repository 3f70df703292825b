"""Start the real service (`emkum serve`, uvicorn) as a child process on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    data_dir: Path | None = None

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def running_server(
    model_dir: Path,
    data_dir: Path,
    log_dir: Path,
    preexec=None,
    quiet: bool = False,
    wrap: list[str] | None = None,
    wait_ready: bool = True,
    **settings: str,
) -> Iterator[Server]:
    """`wrap` prefixes the server's command line (for example to run it in its own mount namespace).
    `wait_ready=False`: return once the server answers at all (a not-ready 503 included)."""
    port = free_port()
    env = {
        **os.environ,
        "EMKUM_MODEL_DIR": str(model_dir),
        "EMKUM_DATA_DIR": str(data_dir),
        "EMKUM_PORT": str(port),
        "EMKUM_HOST": "127.0.0.1",
    }
    env.update({f"EMKUM_{k.upper()}": str(v) for k, v in settings.items()})
    log = log_dir / f"server-{port}.log"
    with open(log, "w") as out:
        sink = subprocess.DEVNULL if quiet else out
        proc = subprocess.Popen(
            [*(wrap or []), sys.executable, "-m", "service.cli", "serve"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log, Path(data_dir))
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()}")
        try:
            status = httpx.get(f"{server.url}/readyz", timeout=2).status_code
            if status == 200 or (status == 503 and not wait_ready):
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server not ready in 60 s:\n{log.read_text()}")
        time.sleep(0.2)
    try:
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def read_only_view(data: Path) -> tuple[list[str] | None, Callable[[], object]]:
    """(command prefix, undo) that show a child process `data` read-only: as root (which ignores file
    permissions), a read-only bind mount in the child's own mount namespace, as a `:ro` volume is;
    otherwise file permissions."""
    if os.geteuid() == 0:
        mount = f'mount --bind {data} {data} && mount -o remount,bind,ro {data} && exec "$@"'
        return ["unshare", "--mount", "sh", "-c", mount, "sh"], lambda: None
    modes = {p: p.stat().st_mode for p in [data, *data.rglob("*")]}
    for p, mode in modes.items():
        p.chmod(mode & ~0o222)
    return None, lambda: [p.chmod(mode) for p, mode in modes.items()]


@contextlib.contextmanager
def small_disk(data: Path, size: str) -> Iterator[Path]:
    """`data` as a fresh tmpfs of `size` (for example "2m") while the block runs: a disk that really
    fills (ENOSPC), unlike a file-size limit, and that outlives a server so it can be served again.
    Needs root (CI runs as root)."""
    if os.geteuid() != 0:
        raise PermissionError("mounting a tmpfs needs root")
    data.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(data)], check=True)
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)
