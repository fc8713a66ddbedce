"""Running many registration methods over many pairs: the layer above metrics and reports.

- :mod:`learnreg.runner.methods`: method adapters named by specs (``classical:PRESET``,
  ``model:NAME[,refine=N]``, ``transforms:DIR``, ``ants:TYPE``; new kinds through
  :func:`~learnreg.runner.methods.register_method`);
- :mod:`learnreg.runner.evaluate`: the loop over methods and pairs, scoring each result with
  :func:`learnreg.metrics.score_result`, with per-pair records as a cache (``resume``) and
  one process per (method, pair) on request (``isolate``);
- :mod:`learnreg.runner.suites`: named benchmarks (``lpba40-atlas``).

Pairs are :class:`learnreg.data.datasets.Pair` (one type and CSV schema for training and
evaluation); records become statistics, reports and figures in :mod:`learnreg.eval`.
"""
