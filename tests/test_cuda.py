"""The GPU path (PROTOCOL.md#timing): bf16 numerics, which attention kernel runs, no host-device sync inside
a training step, the fused optimiser, fp16 with loss scaling. Skipped without a CUDA device; with one, every
test must pass (benchmarks/gpu_check.sh runs them first)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from d2v2.method import available_methods, build_method

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from crosscheck_fairseq import deterministic  # noqa: E402  (dropout and noise off, as the cross-check)
from test_precision import LOSS_RTOL, batch_for, losses  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# The kernel each modality's attention must be able to run on: images have neither bias nor padding
# (FlashAttention); speech adds ALiBi (a learned bias) and text pads its batches (memory-efficient kernel).
BACKEND = {"image": SDPBackend.FLASH_ATTENTION, "speech": SDPBackend.EFFICIENT_ATTENTION,
           "text": SDPBackend.EFFICIENT_ATTENTION}


def cuda_batch(method, padded: bool = True) -> dict:
    batch = batch_for(method, batch_size=4)
    if padded and method.modality == "text":
        from d2v2.model.modalities.text import PAD
        batch["source"][0, -16:] = PAD                      # one padded row: the key-padding mask is used
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.parametrize("dtype,rtol", [(torch.bfloat16, LOSS_RTOL), (torch.float16, LOSS_RTOL / 4)])
@pytest.mark.parametrize("modality,name", sorted(available_methods()))
def test_half_precision_forward_matches_fp32_on_the_gpu(modality, name, dtype, rtol):
    """bf16 (the gpu preset's) and fp16 (base's), with the tolerances of tests/test_precision.py."""
    fp32, half = losses(modality, name, "cuda", dtype)
    assert half == pytest.approx(fp32, rel=rtol), f"{modality}/{name}: {dtype} {half} vs fp32 {fp32}"


@pytest.mark.parametrize("modality,name", sorted(available_methods()))
def test_attention_runs_on_the_expected_kernel(modality, name):
    """With only the expected SDPA backend allowed, a bf16 training step (forward and backward) must run:
    SDPA raises when no allowed kernel fits the inputs."""
    torch.manual_seed(0)
    method = build_method(modality, name, "smoke").cuda().train()
    batch = cuda_batch(method)
    with sdpa_kernel([BACKEND[modality]]), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = method(batch).loss
        loss.backward()
    assert torch.isfinite(loss)


def _trainer(tmp_path, modality: str, name: str = "data2vec2", **changes):
    from d2v2.config import merge
    from d2v2.engine.pretrain import Pretrainer
    from d2v2.engine.runconfig import resolve_run_config

    cfg = resolve_run_config(merge({
        "method": {"modality": modality, "name": name, "preset": "smoke"},
        "batch_size": 4, "budget": {"kind": "updates", "value": 100}, "precision": "bf16",
        "device": "cuda", "progress": False}, changes))
    method = build_method(modality, name, "smoke")
    items = [batch_for(method, batch_size=4, seed=i) for i in range(4)]
    trainer = Pretrainer(cfg, tmp_path / modality, dataset=list(range(4)))
    batches = [{k: v.to(trainer.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in items]
    return trainer, batches


@pytest.mark.parametrize("modality,name", sorted(available_methods()))
def test_a_training_step_does_not_synchronise(tmp_path, modality, name):
    """After a warm-up update, a whole update (forward, backward, clip, fused AdamW, EMA) runs with CUDA's
    sync debug mode set to error: any host-device synchronisation inside it raises."""
    trainer, batches = _trainer(tmp_path, modality, name)
    assert trainer.optimizer.defaults["fused"] is True
    trainer.train_step(iter(batches[:1]))              # the FLOPs count and the kernels' first launch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(iter(batches[1:2]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert trainer.updates == 2 and torch.isfinite(trainer.stats.loss_sum)


def test_the_teachers_autocast_copy_refreshes_in_a_few_kernels():
    """The EMA teacher's bf16 copy (d2v2.model.ema) is refreshed by one ``_foreach_copy_`` from its fp32 weights:
    on a GPU a few multi-tensor kernels, not one per weight, or it saves nothing."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    method = build_method("image", "data2vec2", "smoke").cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        method.teacher.compute                              # built and filled
    method.after_step(1, fraction=0.5)                      # an EMA step: the fp32 weights move
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.autocast("cuda", dtype=torch.bfloat16):
        method.teacher.compute                              # refreshed
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    weights = sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in method.teacher.model.modules())
    assert 0 < len(kernels) <= 4 < weights, [e.name for e in kernels]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_real_run_on_the_gpu(tmp_path, precision):
    """A short run on real Fashion-MNIST (fp16 with dynamic loss scaling, bf16 without): it finishes, and its
    summary holds a MFU against the device's peak."""
    from test_engine_pretrain import DATA_ROOT, run_config

    from d2v2.data import DataConfig, prepare
    from d2v2.engine.pretrain import run

    source = Path(__file__).resolve().parents[1] / ".gpu" / "fashion-mnist"
    data = {"root": str(DATA_ROOT), "num_workers": 2}
    if source.is_dir():                                  # the GPU machine has no Debian data package
        data["image"] = {"fmnist_source": str(source)}
    prepare(["image"], DataConfig(**data))
    out = tmp_path / precision
    assert run(run_config(str(DATA_ROOT), data=data, precision=precision, device="cuda", threads=None,
                          budget={"kind": "updates", "value": 20}), out) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "success" and s["compute"]["flops_per_update"] > 0
    if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name():
        assert 0 < s["compute"]["mfu"] < 1


@pytest.mark.parametrize("modality", ["image", "text"])
def test_the_whole_model_replays_as_cuda_graphs(tmp_path, modality):
    """``compile: model`` with ``compile_mode: reduce-overhead`` (d2v2.engine.compile): data2vec 2.0's updates
    after the first replay CUDA graphs, inductor skips none, and the losses follow the eager run's (bf16; no
    dropout or mask noise, whose draws differ between eager and compiled code)."""
    import torch._dynamo.utils

    losses = {}
    for scope in ("off", "model"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        trainer, batches = _trainer(tmp_path / scope, modality, compile=scope, compile_mode="reduce-overhead",
                                    method={"overrides": deterministic(modality)})
        torch.manual_seed(0)
        losses[scope] = []
        for batch in batches:
            before = trainer.stats.loss_sum.clone()
            trainer.train_step(iter([batch]))
            losses[scope].append(float(trainer.stats.loss_sum - before))
        if scope == "model":
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
            assert torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0) == 0
    assert losses["model"] == pytest.approx(losses["off"], rel=2e-2)
