import math

import pytest
import torch
import torch.nn.functional as F

from fedcl.losses import info_nce, info_nce_logits, nt_xent


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _manual_info_nce(q, k, negs, t, in_batch):
    """Straightforward loop over examples, written independently of the vectorised code."""
    total = 0.0
    b = q.shape[0]
    for i in range(b):
        pos = math.exp(float(q[i] @ k[i]) / t)
        denom = pos
        for n in negs:
            denom += math.exp(float(q[i] @ n) / t)
        if in_batch:
            for j in range(b):
                if j != i:
                    denom += math.exp(float(q[i] @ k[j]) / t)
        total += -math.log(pos / denom)
    return total / b


@pytest.mark.parametrize("in_batch", [False, True])
@pytest.mark.parametrize("b,k", [(1, 0), (1, 5), (3, 7), (8, 16)])
def test_matches_manual_implementation(b, k, in_batch):
    q, key, negs = _unit(b, 16, seed=1), _unit(b, 16, seed=2), _unit(k, 16, seed=3)
    got = info_nce(q, key, negs, temperature=0.2, in_batch=in_batch).item()
    want = _manual_info_nce(q, key, negs, 0.2, in_batch)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_analytic_value_for_aligned_embeddings():
    # Every similarity equals 1 -> loss = -log(1 / (K + 1)) for any temperature.
    k = 31
    v = F.normalize(torch.ones(4, 8), dim=1)
    negs = v[:1].expand(k, 8)
    loss = info_nce(v, v, negs, temperature=0.07)
    assert loss.item() == pytest.approx(math.log(k + 1), rel=1e-5)


def test_logit_shapes_and_positive_column():
    q, key, negs = _unit(5, 8), _unit(5, 8, seed=4), _unit(11, 8, seed=5)
    logits = info_nce_logits(q, key, negs, temperature=0.5, in_batch=True)
    assert logits.shape == (5, 1 + 11 + 4)
    torch.testing.assert_close(logits[:, 0], (q * key).sum(1) / 0.5)


@pytest.mark.parametrize("b", range(1, 7))
def test_batch_invariance_per_example(b):
    # Without in-batch negatives an example's loss does not depend on the rest of the batch.
    q, key, negs = _unit(b, 8), _unit(b, 8, seed=9), _unit(6, 8, seed=10)
    per = info_nce(q, key, negs, temperature=0.3, reduction="none")
    assert per.shape == (b,)
    for i in range(b):
        alone = info_nce(q[i:i + 1], key[i:i + 1], negs, temperature=0.3)
        assert per[i].item() == pytest.approx(alone.item(), rel=1e-6)


def test_zero_negatives_and_empty_batch():
    q = _unit(3, 8)
    assert info_nce(q, q, None, temperature=0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert info_nce(q, q, torch.zeros(0, 8), temperature=0.1).item() == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros(0, 8, requires_grad=True)
    loss = info_nce(empty, empty, _unit(4, 8), temperature=0.1)
    loss.backward()  # an empty Poisson batch still yields a graph
    assert loss.item() == 0.0


def test_gradient_pushes_query_towards_positive():
    q = _unit(2, 8).requires_grad_(True)
    key, negs = _unit(2, 8, seed=7), _unit(10, 8, seed=8)
    info_nce(q, key, negs, temperature=0.2).backward()
    # descending the loss increases q.key
    step = q.detach() - 0.01 * q.grad
    assert ((step * key).sum(1) > (q.detach() * key).sum(1)).all()


def test_nt_xent_matches_manual_and_is_symmetric():
    z1, z2 = _unit(4, 8, seed=11), _unit(4, 8, seed=12)
    t = 0.5
    z = torch.cat([z1, z2])
    total = 0.0
    for i in range(8):
        j = (i + 4) % 8
        denom = sum(math.exp(float(z[i] @ z[m]) / t) for m in range(8) if m != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    assert nt_xent(z1, z2, temperature=t).item() == pytest.approx(total / 8, rel=1e-5)
    assert nt_xent(z1, z2, temperature=t).item() == pytest.approx(
        nt_xent(z2, z1, temperature=t).item(), rel=1e-6)


def test_dimension_mismatch_is_reported():
    with pytest.raises(ValueError, match="dim"):
        info_nce(_unit(2, 8), _unit(2, 8), _unit(3, 4), temperature=0.1)
