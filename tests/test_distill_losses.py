"""Each RSD loss term against its formula on fixed tensors, the gradient path, and the student's noise plane."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tiny import tiny_unet

from sr1step.distill import losses as L
from sr1step.distill.rsd import BottleneckHead, FakeModel, with_noise_channels


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 4, generator=g) for _ in range(3)]


def test_x0_regression_formula():
    pred, target, _ = _tensors()
    expected = torch.stack([((pred[i] - target[i]) ** 2).sum() / 48 for i in range(2)])
    torch.testing.assert_close(L.x0_regression(pred, target), expected)


def test_rsd_distillation_formula_with_and_without_sid():
    teacher, fake, student = _tensors()
    a = ((teacher - student) ** 2).mean(dim=(1, 2, 3))
    b = ((fake - student) ** 2).mean(dim=(1, 2, 3))
    n = (teacher - student).abs().mean(dim=(1, 2, 3))
    torch.testing.assert_close(L.rsd_distillation(teacher, fake, student, sid_normalization=False), a - b)
    torch.testing.assert_close(L.rsd_distillation(teacher, fake, student), (a - b) / (n + 1e-8))


def test_gan_losses_formulas():
    real, fake = torch.tensor([0.3, -2.0]), torch.tensor([1.5, -0.1])
    torch.testing.assert_close(L.non_saturating_d_loss(real, fake), F.softplus(-real) + F.softplus(fake))
    torch.testing.assert_close(L.non_saturating_g_loss(fake), torch.log1p(torch.exp(-fake)))
    torch.testing.assert_close(
        L.hinge_d_loss(real[:, None], fake[:, None]), F.relu(1 - real) + F.relu(1 + fake)
    )
    torch.testing.assert_close(L.hinge_g_loss(fake[:, None]), -fake)


def test_sid_normaliser_carries_no_gradient():
    teacher, fake, student = _tensors()
    student.requires_grad_(True)
    L.rsd_distillation(teacher, fake, student).sum().backward()
    n = (teacher - student.detach()).abs().mean(dim=(1, 2, 3))
    # d/dẑ0 of (a - b)/n with n constant: 2(f_φ − f*)/(CHW·n)
    expected = 2 * (fake - teacher) / (48 * (n + 1e-8))[:, None, None, None]
    torch.testing.assert_close(student.grad, expected)


def test_rsd_gradient_flows_through_frozen_nets_unlike_vsd():
    """The student's gradient includes the teacher/fake Jacobian terms; the VSD variant stops them."""
    torch.manual_seed(0)
    teacher_net, fake_net = torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Conv2d(3, 3, 3, padding=1)
    for net in (teacher_net, fake_net):
        net.requires_grad_(False)
    x0 = torch.randn(2, 3, 6, 6, requires_grad=True)
    noise = torch.randn(2, 3, 6, 6)

    def student_grad(term):
        x0.grad = None
        z_t = 0.7 * x0 + 0.5 * noise  # re-noising keeps ẑ0 in the graph
        term(teacher_net(z_t), fake_net(z_t), x0).sum().backward()
        return x0.grad.clone()

    rsd, vsd = student_grad(L.rsd_distillation), student_grad(L.vsd_distillation)
    assert teacher_net.weight.grad is None and fake_net.weight.grad is None  # frozen parameters get nothing
    assert not torch.allclose(rsd, vsd, atol=1e-6)


def test_hsd_surrogate_gradient_is_signal_over_chw():
    signal = torch.randn(2, 3, 4, 4)
    signal[0, 0, 0, 0] = float("nan")  # NaNs in the signal are zeroed
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    L.hsd_surrogate(signal, x0).sum().backward()
    torch.testing.assert_close(x0.grad, torch.nan_to_num(signal) / 48)


def test_straight_through_quantize():
    book = torch.nn.Embedding(4, 3)

    def snap(z):
        flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
        idx = torch.cdist(flat, book.weight).argmin(1)
        return book.weight[idx].view(z.shape[0], z.shape[2], z.shape[3], 3).permute(0, 3, 1, 2)

    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    out = L.straight_through_quantize(snap, z)
    torch.testing.assert_close(out, snap(z.detach()))
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_student_noise_channel_is_zero_initialised():
    """At step 0 the student equals the teacher whatever the noise input."""
    teacher = tiny_unet(seed=2)
    student = with_noise_channels(teacher, 1)
    assert student.state_dict()["input_blocks.0.0.weight"].shape[1] == teacher.config.in_channels + 3 + 1
    x, lq, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([14, 3])
    with torch.no_grad():
        torch.testing.assert_close(
            student(x, t, lq, torch.randn(2, 1, 16, 16)), teacher(x, t, lq), rtol=0, atol=0
        )


def test_fake_model_logits_shapes():
    fake = FakeModel(tiny_unet(), head_width=16)
    from sr1step.diffusion import ResShiftSchedule

    schedule = ResShiftSchedule.preset("s15")
    z = torch.randn(3, 3, 32, 32)
    pred, real, fake_logits = fake(schedule, z, torch.tensor([1, 2, 3]), torch.randn(3, 3, 32, 32), z, z)
    assert pred.shape == z.shape and real.shape == (3,) and fake_logits.shape == (3,)
    assert isinstance(fake.head, BottleneckHead)
