"""Several embedded servers for one regeneration: ``deepspec regenerate --servers N``.

One embedded server runs one Python engine loop; with a small target that loop, not the GPU, is the
limit, so several server processes sharing the device serve more tokens. On one H200 with
SmolLM2-135M, three servers made 7,985 completion tokens/s; one server had made at least 2,300 in an
earlier session, on code without the grouped refills, so the two are not a like-for-like ratio
(bench/README.md, "Real results on a real target"). The regeneration client already spreads its
requests over several endpoints (least loaded first), so the servers only need starting and stopping.

Each server is the ``deepspec serve`` command with the same recipe and ``--set`` overrides as the
regeneration, on a free local port, its output in ``<output>.server-<i>.log``. The servers are stopped
when the block ends, whatever ended it, and each one is told by the kernel to stop if this process dies
(``PR_SET_PDEATHSIG``, Linux): a failed or killed regeneration leaves no server holding a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

STARTUP_TIMEOUT_S = 900.0  # loading and converting a large target, then capturing CUDA graphs
STOP_TIMEOUT_S = 15.0


class ServerStartError(RuntimeError):
    """An embedded server process exited or did not answer ``/health`` in time."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def embedded_servers(
    count: int, config: str | None, overrides: list[str], log_base: Path, serve_args: list[str] | None = None
) -> Iterator[list[str]]:
    """Start ``count`` ``deepspec serve`` processes (the recipe, its overrides and ``serve_args``); yield
    their OpenAI base URLs once all are healthy."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    logs: list[Path] = []
    try:
        for i in range(count):
            port = _free_port()
            cmd = [sys.executable, "-m", "deepspec", "serve", "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["-c", config] if config else []
            for o in overrides:
                cmd += ["--set", o]
            cmd += serve_args or []
            log = log_base.with_name(f"{log_base.name}.server-{i}.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "wb") as out:
                procs.append(
                    subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
                )
            urls.append(f"http://127.0.0.1:{port}")
            logs.append(log)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        waiting = set(range(count))
        while waiting:
            for i in sorted(waiting):
                if procs[i].poll() is not None:
                    raise ServerStartError(
                        f"embedded server {i} exited with code {procs[i].returncode} before answering; "
                        f"its log {logs[i]} ends with:\n{_tail(logs[i])}"
                    )
                if _healthy(urls[i]):
                    waiting.discard(i)
            if waiting and time.monotonic() > deadline:
                raise ServerStartError(
                    f"embedded server(s) {sorted(waiting)} did not answer /health within {STARTUP_TIMEOUT_S:.0f} s "
                    f"(logs: {', '.join(str(logs[i]) for i in sorted(waiting))})"
                )
            if waiting:
                time.sleep(0.2)
        yield [f"{u}/v1" for u in urls]
    finally:
        _stop(procs)
