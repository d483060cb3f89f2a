"""EMA teacher (formula, schedule, what it holds) and target construction (METHOD.md#teacher, METHOD.md#targets)."""
import pytest
import torch
from torch import nn

from d2v2.engine.compile import compile_model
from d2v2.engine.flops import count_step
from d2v2.model.ema import EMATeacher, ema_decay
from d2v2.method import build_method
from d2v2.model.targets import make_targets


def test_decay_schedule_is_linear_then_constant():
    assert ema_decay(0, 0.999, 0.99999, 1000) == pytest.approx(0.999)
    assert ema_decay(500, 0.999, 0.99999, 1000) == pytest.approx((0.999 + 0.99999) / 2)
    assert ema_decay(1000, 0.999, 0.99999, 1000) == 0.99999
    assert ema_decay(10**6, 0.999, 0.99999, 1000) == 0.99999
    assert ema_decay(3, 0.9, 1.0, 0) == 1.0


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.fixed = nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("stat", torch.zeros(3))
        self.head = nn.Linear(3, 1)          # removed from the teacher: must be ignored


@pytest.mark.parametrize("modality,name", [("image", "data2vec2"), ("speech", "data2vec2"), ("text", "data2vec2"),
                                           ("image", "data2vec1")])
def test_the_teachers_autocast_copy_computes_what_autocast_would(modality, name, monkeypatch):
    """Under bf16 autocast the teacher runs from a copy whose Linear and convolution weights are already bf16:
    the same losses, bit for bit, as autocast casting the fp32 weights at every forward, before and after an
    EMA step and a load (each refreshes the copy), and fewer kernels (one cast per weight less)."""
    torch.manual_seed(0)
    method = build_method(modality, name, "smoke")
    g = torch.Generator().manual_seed(0)
    source = {"image": lambda: torch.randn(2, 1, 28, 28, generator=g),
              "speech": lambda: torch.randn(2, 8000, generator=g),
              "text": lambda: torch.randint(5, 8192, (2, 32), generator=g)}[modality]()
    batch = method.masker()({"source": source, "id": torch.arange(2)}, torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        torch.manual_seed(2)                         # the same dropout masks and noise in every call
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return method(batch).loss

    def plain(step):                                 # autocast casting the fp32 weights at every forward
        with monkeypatch.context() as patch:
            patch.setattr(EMATeacher, "compute", property(lambda self: self.model))
            return step()

    losses = [(loss(), plain(loss))]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    method.after_step(1, fraction=0.5)                   # an EMA step: the fp32 weights move
    losses.append((loss(), plain(loss)))
    method.load_state_dict(build_method(modality, name, "smoke").state_dict())
    losses.append((loss(), plain(loss)))
    assert all(torch.equal(ours, theirs) for ours, theirs in losses), losses
    assert not torch.equal(losses[0][0], losses[1][0])
    low = sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in method.teacher.model.modules())
    assert plain(lambda: count_step(loss)[1]) - count_step(loss)[1] >= low
    compile_model(method, "blocks")                      # compiled blocks: the teacher's own (fp32) weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert method.teacher.compute is method.teacher.model


def test_ema_step_formula_copies_frozen_tensors_and_ignores_missing():
    torch.manual_seed(0)
    student = Toy()
    teacher = EMATeacher(student, shared=("head",))
    assert teacher.model.head is None and not any(p.requires_grad for p in teacher.parameters())
    before = teacher.model.a.weight.clone()
    with torch.no_grad():
        student.a.weight.add_(1.0)
        student.fixed.add_(5.0)
        student.stat.fill_(7.0)
    teacher.step(student, 0.9)
    torch.testing.assert_close(teacher.model.a.weight, 0.9 * before + 0.1 * student.a.weight)
    torch.testing.assert_close(teacher.model.fixed, student.fixed)
    torch.testing.assert_close(teacher.model.stat, student.stat)
    frozen = teacher.model.a.weight.clone()
    with torch.no_grad():
        student.a.weight.add_(1.0)
    teacher.step(student, 1.0)                                     # tau >= 1: no step
    torch.testing.assert_close(teacher.model.a.weight, frozen)


def test_ema_step_copies_the_tensors_named_copied():
    """fairseq's ``skip_keys``: a trained tensor under a ``copied`` prefix follows the student exactly."""
    student = Toy()
    teacher = EMATeacher(student, copied=("head.",))
    before = teacher.model.a.weight.clone()
    with torch.no_grad():
        student.a.weight.add_(1.0)
        student.head.weight.add_(1.0)
    teacher.step(student, 0.9)
    torch.testing.assert_close(teacher.model.head.weight, student.head.weight)
    torch.testing.assert_close(teacher.model.a.weight, 0.9 * before + 0.1 * student.a.weight)


def test_ema_step_pairs_once_and_again_after_a_move_or_a_frozen_parameter():
    """The step matches the teacher's tensors with the student's once; a cast (new buffers) or a parameter that
    stops training makes it match them again, so the formula holds throughout."""
    torch.manual_seed(0)
    student = Toy()
    parent = nn.ModuleDict({"student": student, "teacher": EMATeacher(student, shared=("head",))})
    teacher = parent["teacher"]
    teacher.step(student, 0.5)
    first = teacher._pairs
    teacher.step(student, 0.5)
    assert teacher._pairs is first                                   # not matched again
    parent.double()                                                 # both cast: buffers are new tensors
    with torch.no_grad():
        student.stat.fill_(3.0)
    before = teacher.model.a.weight.clone()
    teacher.step(student, 0.5)
    assert teacher._pairs is not first and teacher.model.stat.dtype == torch.float64
    torch.testing.assert_close(teacher.model.stat, student.stat)
    torch.testing.assert_close(teacher.model.a.weight, 0.5 * before + 0.5 * student.a.weight)
    student.a.weight.requires_grad_(False)                          # frozen now: copied, not averaged
    with torch.no_grad():
        student.a.weight.add_(1.0)
    teacher.step(student, 0.5)
    torch.testing.assert_close(teacher.model.a.weight, student.a.weight)
    other = Toy().double()                                          # another student
    teacher.step(other, 0.0)
    torch.testing.assert_close(teacher.model.a.bias, other.a.bias)


def test_teacher_stays_in_eval_mode():
    teacher = EMATeacher(Toy())
    teacher.train()
    assert not teacher.model.training


def test_targets_equal_direct_computation():
    torch.manual_seed(0)
    layers = [torch.randn(2, 7, 8) * (i + 1) + i for i in range(5)]

    def inorm(y):               # per sample, per channel, over time; biased variance, eps 1e-5
        return (y - y.mean(1, keepdim=True)) / torch.sqrt(y.var(1, unbiased=False, keepdim=True) + 1e-5)

    def lnorm(y):
        return (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)

    expected = lnorm(sum(inorm(y) for y in layers[-3:]) / 3)
    got = make_targets(layers, 3, instance_norm_target_layer=True, layer_norm_targets=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    got = make_targets(layers, 2, instance_norm_target_layer=False, layer_norm_target_layer=True)
    torch.testing.assert_close(got, (lnorm(layers[-1]) + lnorm(layers[-2])) / 2, atol=1e-5, rtol=1e-5)
    assert make_targets([y.bfloat16() for y in layers], 2).dtype == torch.float32
    with pytest.raises(ValueError, match="average_top_k_layers=6"):
        make_targets(layers, 6)


@pytest.mark.parametrize("modality,has_local,has_context", [
    ("image", True, True), ("speech", False, True), ("text", False, False)])
def test_teacher_holds_what_the_spec_says(modality, has_local, has_context):
    method = build_method(modality, "data2vec2", "smoke")
    teacher = method.teacher.model
    assert (teacher.local_encoder is not None) == has_local
    assert (teacher.context_encoder is not None) == has_context
    assert len(teacher.blocks) == len(method.student.blocks)
    for (name, p_t) in teacher.named_parameters():                  # starts as an exact copy
        torch.testing.assert_close(p_t, dict(method.student.named_parameters())[name])
    assert not any(n.startswith("decoder") for n, _ in method.teacher.named_parameters())
