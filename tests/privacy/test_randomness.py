"""Where the DP mechanisms draw from: one decision (``mechanism_generator``) for every phase."""

import logging

import torch

from fedcl.privacy.randomness import INSECURE_WARNING, mechanism_generator


def test_no_dp_mechanism_keeps_the_public_stream_and_says_nothing(caplog):
    public = torch.Generator().manual_seed(3)
    with caplog.at_level(logging.WARNING, logger="fedcl.privacy"):
        assert mechanism_generator(public, private=False, insecure=True, where="x") is public
        assert mechanism_generator(None, private=False, insecure=False, where="x") is None
    assert not caplog.records


def test_a_dp_mechanism_draws_from_a_fresh_secret_generator_each_time():
    public = torch.Generator().manual_seed(3)
    a = mechanism_generator(public, private=True, insecure=False, where="x")
    b = mechanism_generator(public, private=True, insecure=False, where="x")
    assert a is not public and b is not public
    assert a.initial_seed() != b.initial_seed() != public.initial_seed()  # 64 bits of OS entropy each


def test_insecure_reproducible_dp_keeps_the_public_stream_and_warns_where(caplog):
    public = torch.Generator().manual_seed(3)
    with caplog.at_level(logging.WARNING, logger="fedcl.privacy"):
        assert (
            mechanism_generator(public, private=True, insecure=True, where="site s1, release phase") is public
        )
    (record,) = caplog.records
    assert INSECURE_WARNING in record.getMessage() and "site s1, release phase" in record.getMessage()
