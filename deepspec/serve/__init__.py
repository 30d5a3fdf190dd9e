"""Embedded OpenAI-compatible server on the target model (``deepspec serve`` and :func:`embedded_server`).

* :mod:`deepspec.serve.engine`: model + worker thread, continuous batching on the decode core;
* :mod:`deepspec.serve.sampling`: the per-request sampling parameters;
* :mod:`deepspec.serve.protocol`: request validation (400 errors that name the field);
* :mod:`deepspec.serve.app`: the FastAPI routes;
* :mod:`deepspec.serve.embedded`: run it in a background thread of the calling process.
"""

from deepspec.serve.embedded import build_app, default_served_name, embedded_server, serve_app

__all__ = ["build_app", "default_served_name", "embedded_server", "serve_app"]
