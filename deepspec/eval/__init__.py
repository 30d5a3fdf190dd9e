"""Evaluation: lossless speculative decoding engine, acceptance metrics, benchmarks, reports and plots.

Modules, in the order data flows through them:

* ``benchmarks``: ``{"turns": [...]}`` prompt files, caps and shuffle (``benchmarks_cli``: ``fetch``);
* ``engine``: chain drafting + exact verification with a target KV cache (``sampling``: rejection
  sampling; ``kv_cache``: cache cropping shared with the scheduler's profiler), and the plain target
  decode used as the speed baseline; on the decode core of :mod:`deepspec.decode` (static row cache,
  CUDA graphs) by default, ``B`` prompts in lockstep with ``generate_batch``;
* ``batched``: ``deepspec eval --batch-size``: the suite per batch size, speedup against batch size;
* ``drafters``: model-free drafters (n-gram prompt lookup, random) for baselines and tests;
* ``scheduler`` / ``calibration``: DSpark's hardware-aware prefix scheduler and Sequential Temperature
  Scaling of its confidence head;
* ``runner``: turns (rendered by :mod:`deepspec.data.template`), per-rank sharding and merging;
  ``metrics``: tau and acceptance;
* ``report`` / ``plots``: JSON, Markdown, PNG; ``summary``: the compact summary and the acceptance gate
  shared with the operator (no torch);
* ``evaluator``: the :class:`~deepspec.eval.evaluator.Evaluator` owning a run (target, drafter, engine,
  benchmarks, report); ``cli``: ``deepspec eval`` over it.
"""
