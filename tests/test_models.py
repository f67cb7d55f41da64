import pytest
import torch

from fedcl.models import (
    arrays_to_state,
    build_model,
    canonical_state_dict,
    load_canonical_state_dict,
    load_encoder,
    save_encoder,
    state_to_arrays,
)


@pytest.mark.parametrize("arch,channels,size", [("cnn", 1, 28), ("cnn", 3, 32), ("resnet18", 3, 32)])
def test_output_shapes_and_unit_norm(arch, channels, size):
    m = build_model(arch=arch, in_channels=channels, width=8, proj_dim=16, proj_hidden=32)
    x = torch.rand(3, channels, size, size)
    z = m(x)
    assert z.shape == (3, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert m.features(x).shape == (3, m.feat_dim)


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_no_batchnorm(arch):
    m = build_model(arch=arch, in_channels=1, width=8)
    assert not any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules())


def test_batch_independence():
    # GroupNorm: an example's output does not depend on the rest of the batch.
    m = build_model(in_channels=1, width=8).eval()
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(m(x)[1:2], m(x[1:2]), rtol=1e-5, atol=1e-5)


def test_canonical_state_strips_wrapper_prefixes():
    m = build_model(in_channels=1, width=8)

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._module = inner

    sd = canonical_state_dict(Wrap(m))
    assert set(sd) == set(m.state_dict())
    m2 = build_model(in_channels=1, width=8)
    load_canonical_state_dict(Wrap(m2), sd)
    for k, v in m2.state_dict().items():
        torch.testing.assert_close(v, sd[k])


def test_arrays_round_trip_and_shape_errors():
    m = build_model(in_channels=1, width=8)
    sd = canonical_state_dict(m)
    back = arrays_to_state(m, state_to_arrays(sd))
    for k in sd:
        assert torch.equal(back[k], sd[k])
    arrays = state_to_arrays(sd)
    arrays[0] = arrays[0][..., :1]
    with pytest.raises(ValueError, match="shape"):
        arrays_to_state(m, arrays)


def test_encoder_checkpoint_records_architecture(tmp_path):
    m = build_model(arch="cnn", in_channels=1, width=8, proj_dim=16, proj_hidden=32)
    save_encoder(tmp_path / "enc.pt", model=m, meta={"note": "x"})
    m2, meta = load_encoder(tmp_path / "enc.pt")
    assert m2.spec == m.spec and meta == {"note": "x"}
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(m.eval()(x), m2.eval()(x))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not readable"):
        load_encoder(tmp_path / "bad.pt")
