"""bf16 and fp16 autocast: every registered method's training forward in bf16 (the gpu preset's) and fp16
(base's) agrees with fp32 (on a CPU, so that CI checks what a GPU run computes; tests/test_cuda.py repeats
bf16 on a GPU)."""
import pytest
import torch

from d2v2.method import available_methods, build_method

# bf16 rounds to 2^-9 relative; through the few blocks of a smoke model the loss stays well within 1%
LOSS_RTOL = 0.01


def batch_for(method, batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A real-shaped batch for ``method``'s encoder, masked by the method's own masker."""
    cfg, g = method.encoder().cfg, torch.Generator().manual_seed(seed)
    if cfg.modality == "image":
        source = torch.randn(batch_size, cfg.image.in_chans, cfg.image.img_size, cfg.image.img_size, generator=g)
    elif cfg.modality == "speech":
        source = torch.randn(batch_size, 16000, generator=g)
    else:
        source = torch.randint(5, cfg.text.vocab_size, (batch_size, 64), generator=g)
        source[:, 0] = 0
    batch = method.stand_in_inputs({"source": source, "id": torch.arange(batch_size)}, g)
    return method.masker()(batch, torch.Generator().manual_seed(seed))


def losses(modality: str, name: str, device: str, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """The loss of one forward in fp32 and under autocast to ``dtype``, same weights, batch and noise."""
    torch.manual_seed(0)
    method = build_method(modality, name, "smoke").to(device).eval()     # eval: no dropout, same noise
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch_for(method).items()}
    out = {}
    for run_dtype in (torch.float32, dtype):
        torch.manual_seed(1)
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=run_dtype == dtype):
            out[run_dtype] = float(method(batch).loss)
    return out[torch.float32], out[dtype]


@pytest.mark.parametrize("modality,name", sorted(available_methods()))
def test_bf16_forward_matches_fp32(modality, name):
    fp32, bf16 = losses(modality, name, "cpu")
    assert torch.isfinite(torch.tensor([fp32, bf16])).all()
    assert bf16 == pytest.approx(fp32, rel=LOSS_RTOL), f"{modality}/{name}: bf16 {bf16} vs fp32 {fp32}"


@pytest.mark.parametrize("modality,name", sorted(available_methods()))
def test_fp16_forward_matches_fp32(modality, name):
    """fp16 keeps 3 more bits than bf16 but overflows at 65,504: a method whose forward left fp16's range (a
    speech CNN's features, an unscaled attention logit) would give inf or nan here."""
    fp32, fp16 = losses(modality, name, "cpu", torch.float16)
    assert torch.isfinite(torch.tensor([fp32, fp16])).all()
    assert fp16 == pytest.approx(fp32, rel=LOSS_RTOL / 4), f"{modality}/{name}: fp16 {fp16} vs fp32 {fp32}"
