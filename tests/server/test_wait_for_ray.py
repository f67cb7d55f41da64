"""wait_for_ray: in Flower's simulation runtime the ServerApp starts no gRPC before Ray is up."""

from __future__ import annotations

import logging
import threading

from fedcl.server.app import wait_for_ray


class InMemoryGrid:  # the name of Flower's simulation grid is what wait_for_ray looks at
    pass


class GrpcGrid:
    pass


def test_on_a_deployment_grid_it_does_not_wait_or_look_at_ray():
    def never():
        raise AssertionError("Ray was consulted on a deployment grid")

    assert wait_for_ray(GrpcGrid(), is_ready=never) is True


def test_in_the_simulation_runtime_it_returns_once_ray_is_up():
    up = threading.Event()
    calls = []

    def is_ready():
        calls.append(up.is_set())
        if len(calls) == 3:
            up.set()  # Ray comes up while the ServerApp waits
        return calls[-1]

    assert wait_for_ray(InMemoryGrid(), is_ready=is_ready, poll_s=0.0) is True
    assert calls == [False, False, False, True]


def test_past_the_backstop_it_warns_and_goes_on(caplog):
    with caplog.at_level(logging.WARNING, logger="flwr.fedcl"):
        assert wait_for_ray(InMemoryGrid(), is_ready=lambda: False, poll_s=0.0, backstop_s=0.0) is False
    assert "Ray is not initialised after 0 s" in caplog.text
