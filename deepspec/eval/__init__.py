"""Evaluation: lossless speculative decoding engine, acceptance metrics, benchmarks, reports and plots.

Modules, in the order data flows through them:

* ``benchmarks``: ``{"turns": [...]}`` prompt files, caps and shuffle (``benchmarks_cli``: ``fetch``);
* ``engine``: chain drafting + exact verification with a target KV cache (``sampling``: rejection
  sampling), and the plain target decode used as the speed baseline;
* ``drafters``: model-free drafters (n-gram prompt lookup, random) for baselines and tests;
* ``scheduler`` / ``calibration``: DSpark's hardware-aware prefix scheduler and Sequential Temperature
  Scaling of its confidence head;
* ``runner``: chat rendering, turns, per-rank sharding and merging; ``metrics``: tau and acceptance;
* ``report`` / ``plots``: JSON, Markdown, PNG and the compact operator summary; ``cli``: ``deepspec eval``.
"""
