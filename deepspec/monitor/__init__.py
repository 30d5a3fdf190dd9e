"""Live acceptance monitoring of a deployed target + draft (``deepspec monitor``).

* :mod:`.drift`: the drift decision (pure, time passed in), shared with the operator:
  :func:`~deepspec.monitor.drift.evaluate_drift`, :class:`~deepspec.monitor.drift.DriftPolicy`,
  :class:`~deepspec.monitor.drift.DriftStatus`, :class:`~deepspec.monitor.drift.Baseline`.
* :mod:`.window`: acceptance counts over a sliding time window.
* :mod:`.scrape`: SGLang / vLLM ``/metrics`` into windowed increments (engine semantics cited there).
* :mod:`.canary`: a fixed, seeded prompt set through the OpenAI-compatible API.
* :mod:`.service`: the loop and the ``deepspec_monitor_*`` Prometheus gauges.
* :mod:`.lifecycle`: retrain / promotion decisions; :mod:`.publish`: versioned GitOps publication.
* ``alerts.yaml``: PrometheusRule ``spec.groups`` for live drift, missing metrics and a broken draft;
  ``dashboard.json``: Grafana panels of live versus baseline and per-position acceptance.
"""

from pathlib import Path

ALERT_RULES = Path(__file__).with_name("alerts.yaml")
DASHBOARD = Path(__file__).with_name("dashboard.json")
