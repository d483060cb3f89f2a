"""Baselines on the same backbone and interface as data2vec 2.0: MAE, data2vec 1.0, RoBERTa-style MLM."""
