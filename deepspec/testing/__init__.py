"""Test and benchmark helpers shipped with the package (no third-party test frameworks needed).

* :mod:`deepspec.testing.stub_server`: a deterministic OpenAI-compatible server with latency and
  fault injection, used by the regeneration tests and ``bench/regen_client.py``.
"""
