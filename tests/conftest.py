"""Shared test settings: small thread counts so concurrent test processes share a 2-core CPU fairly."""
import torch

torch.set_num_threads(1)
