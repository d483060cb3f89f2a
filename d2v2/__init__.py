"""data2vec 2.0 reproducibility and benchmarking harness (Baevski et al., 2022, arXiv:2212.07525).

Packages by concern (ARCHITECTURE.md#packages): ``model`` (the network), ``data2vec2`` and ``method``
(the algorithm and the method interface), ``data``, ``engine`` (pretraining, fine-tuning, evaluation),
``workflow`` (the run matrix), ``launch``, ``analysis`` and ``interop`` (fairseq checkpoints).
"""
import importlib.abc
import sys

__version__ = "0.1.0"

# Modules that moved when the package was split by concern: importing an old path fails with the new one.
MOVED = {**{f"d2v2.{name}": f"d2v2.model.{name}"
            for name in ("blocks", "encoder", "decoder", "ema", "targets", "masking", "modalities")},
         "d2v2.workflow_config": "d2v2.workflow", "d2v2.convert": "d2v2.interop.fairseq",
         "d2v2.model.modalities.audio": "d2v2.model.modalities.speech"}


class _MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        for old, new in MOVED.items():
            if fullname == old or fullname.startswith(old + "."):
                raise ModuleNotFoundError(f"{fullname} moved to {new + fullname[len(old):]}: update the import",
                                          name=fullname)
        return None


sys.meta_path.append(_MovedModules())
