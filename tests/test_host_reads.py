"""A training step reads no value of the device back to the host (PROTOCOL.md#timing): on a GPU such a read
(``.item()``, ``float(t)``, ``if t:``) stalls the host until the step so far has run, and the kernels the host
would have queued meanwhile start late. tests/test_cuda.py checks it on a GPU with CUDA's sync debug mode; this
is its stand-in on a CPU, for every method: the ATen call behind every such read (``_local_scalar_dense``) is
recorded with the function that made it, during a whole update of the engine (forward, backward, clipping,
AdamW, EMA)."""
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from d2v2.method import available_methods

from test_cuda import _trainer

# Reads that are host-side by design: layer-drop's draw (a CPU scalar, never on the device) and text's check
# for padding, which reads the mask only when it is on a CPU (on a GPU the mask is always passed).
HOST_SIDE = {("d2v2/model/encoder.py", "run_blocks"), ("d2v2/model/modalities/text.py", "forward")}


class HostReads(TorchDispatchMode):
    """Records (file, function) of the project code behind each tensor value read by the host."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._local_scalar_dense:
            ours = [f for f in traceback.extract_stack() if "/d2v2/" in f.filename or "/baselines/" in f.filename]
            where = ours[-1] if ours else traceback.extract_stack()[-3]
            path = where.filename.replace("\\", "/")
            for root in ("/d2v2/", "/baselines/"):
                if root in path:
                    path = root[1:] + path.rsplit(root, 1)[1]
            self.reads.append((path, where.name))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("modality,name", sorted(available_methods()))
def test_a_training_step_reads_nothing_back(tmp_path, modality, name):
    trainer, batches = _trainer(tmp_path, modality, name, device="cpu", precision="fp32")
    trainer.train_step(iter(batches[:1]))                 # the first update counts the FLOPs
    with HostReads() as spy:
        trainer.train_step(iter(batches[1:2]))
    assert trainer.updates == 2
    assert set(spy.reads) <= HOST_SIDE, f"{modality}/{name}: values read back inside the step: {spy.reads}"


def test_the_collapse_guard_reads_outside_the_step(tmp_path):
    """data2vec 2.0's guard, on and past ``collapse_check_after``, reads its statistics at the logging
    interval (``check_health``), not inside the update."""
    guard = {"min_target_var": 1e-9, "min_pred_var": 1e-9, "collapse_check_after": 0}
    trainer, batches = _trainer(tmp_path, "image", device="cpu", precision="fp32", method={"overrides": guard})
    trainer.train_step(iter(batches[:1]))
    with HostReads() as spy:
        trainer.train_step(iter(batches[1:2]))
    assert spy.reads == []
    trainer.check_health()                                # the guard itself: healthy stds pass
