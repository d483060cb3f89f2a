"""data2vec 2.0 reproducibility and benchmarking harness (Baevski et al., 2022, arXiv:2212.07525)."""

__version__ = "0.1.0"
