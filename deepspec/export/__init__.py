"""Serving export: SGLang / vLLM checkpoint formats (``formats``), writing and validation (``exporter``),
and the ``deepspec export`` command (``cli``)."""
