"""fedcl's per-example gradient engine against autograd, one example at a time, and Opacus."""

import copy

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn

from fedcl.losses import info_nce
from fedcl.models import build_model
from fedcl.privacy.dp import prepare_model
from fedcl.privacy.per_example import PerExampleGradientError, PerExampleModule

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _loss(model, v1, v2, negs):
    return info_nce(model(v1), model(v2), negs, temperature=0.2)  # mean over the batch


def _reference(model, v1, v2, negs):
    """Per-example gradients by autograd on each example alone: per param (B, *shape)."""
    params = list(model.parameters())
    rows = [
        torch.autograd.grad(_loss(model, v1[i : i + 1], v2[i : i + 1], negs), params)
        for i in range(v1.shape[0])]
    return [torch.stack([r[j] for r in rows]) for j in range(len(params))]


# ResNet-18 in float64: its float32 rounding over 20 layers (relative 1e-5) is not what is tested
@pytest.mark.parametrize("arch, size, channels, dtype", [("cnn", 28, 1, torch.float32),
                                                         ("resnet18", 8, 3, torch.float64)])
def test_rows_are_the_per_example_gradients_of_both_views(arch, size, channels, dtype):
    torch.manual_seed(0)
    model = build_model(arch=arch, in_channels=channels, width=4, proj_dim=8, proj_hidden=16).to(dtype)
    prepare_model(model)
    reference, opacus_model = copy.deepcopy(model), copy.deepcopy(model)
    b = 3
    v1 = torch.rand(b, channels, size, size, dtype=dtype)
    v2 = (v1 + 0.2 * torch.rand_like(v1)).clamp(0, 1)
    negs = F.normalize(torch.randn(10, 8, dtype=dtype), dim=1)
    engine = PerExampleModule(model)
    _loss(engine, v1, v2, negs).backward()
    expected = _reference(reference, v1, v2, negs)
    if arch == "cnn":
        # Opacus' hooks refuse torchvision's ResNet (its in-place residual add on a hooked output)
        gsm = GradSampleModule(opacus_model, batch_first=True, loss_reduction="mean")
        _loss(gsm, v1, v2, negs).backward()
        expected_opacus = [q.grad_sample for q in opacus_model.parameters()]
    for i, (p, ref) in enumerate(zip(model.parameters(), expected, strict=False)):
        assert p.grad is None  # autograd computed activation gradients only
        assert p.grad_sample.shape == (b, *p.shape)
        torch.testing.assert_close(p.grad_sample, ref, rtol=1e-3, atol=1e-6)
        if arch == "cnn":
            torch.testing.assert_close(p.grad_sample, expected_opacus[i], rtol=1e-3, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after each forward


@pytest.mark.parametrize("conv", [dict(kernel_size=3, stride=2, padding=(1, 2), dilation=2, bias=True),
                                  dict(kernel_size=(2, 3), stride=(1, 2), padding=0)])
def test_convolution_geometries(conv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, **conv), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(8))
    model(torch.rand(1, 2, 11, 9))  # materialise the lazy layer
    model = model.double()
    reference = copy.deepcopy(model)
    v1 = torch.rand(4, 2, 11, 9, dtype=torch.float64)
    v2 = v1.flip(3)
    negs = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)

    def loss(m, a, b):
        return info_nce(F.normalize(m(a), dim=1), F.normalize(m(b), dim=1), negs, temperature=0.2)

    engine = PerExampleModule(model)
    for _ in range(2):  # the second step reuses the buffers (and the zero border of the padding)
        loss(engine, v1, v2).backward()
        params = list(reference.parameters())
        rows = [torch.autograd.grad(loss(reference, v1[i:i + 1], v2[i:i + 1]), params) for i in range(4)]
        for j, p in enumerate(model.parameters()):
            torch.testing.assert_close(p.grad_sample, torch.stack([r[j] for r in rows]))
            p.grad_sample = None


def test_buffers_are_reused_across_steps_of_different_batch_sizes():
    torch.manual_seed(0)
    model = build_model(in_channels=1, width=4, proj_dim=8, proj_hidden=16)
    prepare_model(model)
    reference = copy.deepcopy(model)
    engine = PerExampleModule(model)
    negs = F.normalize(torch.randn(10, 8), dim=1)
    conv = model.backbone.body[0].weight
    storage = None
    for b in (5, 3, 5, 2):  # shrinking batches reuse the buffer of the largest
        v1 = torch.rand(b, 1, 28, 28)
        v2 = v1.flip(3)
        _loss(engine, v1, v2, negs).backward()
        for p, ref in zip(model.parameters(), _reference(reference, v1, v2, negs), strict=False):
            torch.testing.assert_close(p.grad_sample, ref, rtol=1e-3, atol=1e-6)
        if b == 5 and storage is None:
            storage = conv.grad_sample.untyped_storage().data_ptr()
        assert conv.grad_sample.untyped_storage().data_ptr() == storage
        for p in model.parameters():
            p.grad_sample = None  # what DPOptimizer.zero_grad does
    plain = engine.to_standard_module()
    assert plain is model and not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_an_empty_batch_gives_zero_rows():
    model = build_model(in_channels=1, width=4, proj_dim=8, proj_hidden=16)
    prepare_model(model)
    engine = PerExampleModule(model)
    v = torch.rand(0, 1, 28, 28)
    (engine(v).sum() + engine(v.flip(3)).sum()).backward()  # both calls reach the loss, as in local_round
    assert engine.pending_calls() == {}
    assert all(p.grad_sample.shape == (0, *p.shape) for p in model.parameters())


def test_refusals():
    engine = PerExampleModule(nn.Sequential(nn.Linear(4, 3)))
    x = torch.rand(2, 4)
    engine(x).sum().backward()
    with pytest.raises(PerExampleGradientError, match="second backward"):
        engine(x).sum().backward()  # no optimizer step in between
    engine.clear_pending()
    with pytest.raises(PerExampleGradientError, match="batch sizes"):
        (engine(x).sum() + engine(torch.rand(3, 4)).sum()).backward()
    with pytest.raises(ValueError, match="LayerNorm"):
        PerExampleModule(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="groups=2"):
        PerExampleModule(nn.Conv2d(4, 4, 3, groups=2))
    frozen = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    frozen[1].requires_grad_(False)  # layers without trainable parameters need no support
    PerExampleModule(frozen)
