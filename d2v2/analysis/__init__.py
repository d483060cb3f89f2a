"""Results: tidy tables from metrics files, statistics over seeds, time-to-target speedups, the paper's
numbers as data, figures and the report (issue #7).

- :mod:`~d2v2.analysis.collect`: metrics JSON + pretraining run dirs -> validated tidy tables
  (``python -m d2v2 collect``);
- :mod:`~d2v2.analysis.stats`: median, olympic mean, bootstrap confidence intervals;
- :mod:`~d2v2.analysis.speedup`: time-to-target and speedup with censoring;
- :mod:`~d2v2.analysis.paper`: the paper's tables and claims (``results/paper/*.csv``);
- :mod:`~d2v2.analysis.figures`: accuracy-vs-time curves, speedups, ablations;
- :mod:`~d2v2.analysis.report`: Markdown + self-contained HTML report (``python -m d2v2 report``).
"""
