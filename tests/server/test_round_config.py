"""A site-side setting is one field of a ``fedcl.config`` Site*Settings model: the server's round
config carries every such field to the sites with nothing in the server, the protocol or the client
naming it."""

from __future__ import annotations

from typing import Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedcl.config import FedclConfig
from fedcl.server.app import QueueLink, round_config
from fedcl.wire.protocol import SECTIONS, RoundConfig


def _other_value(f: FieldInfo):
    """A valid value other than the field's default, from its type alone (no per-field knowledge)."""
    default = f.get_default(call_default_factory=True)
    if get_origin(f.annotation) is Literal:
        return next(choice for choice in get_args(f.annotation) if choice != default)
    kind = next(t for t in (get_args(f.annotation) or (f.annotation,)) if t is not type(None))
    if isinstance(kind, type) and issubclass(kind, BaseModel):  # a nested section: every field changed
        return {name: _other_value(sub) for name, sub in kind.model_fields.items()}
    if kind is bool:
        return not default
    if kind is int:
        return 3 if default is None else default + 1
    if kind is float:
        return 0.5 if not default else default / 2
    raise AssertionError(f"no other value for a {f.annotation} field: extend _other_value")


def test_every_site_setting_reaches_the_sites_through_a_config_record():
    """Each field of each round-config section, set in a FedclConfig to a value other than its
    default, arrives at the site unchanged; the FedclConfig's section is the site model plus its
    server-only fields, so a field added to the site model is at once a config key and a wire key."""
    changed: dict[str, dict] = {}
    for name, section in SECTIONS.items():
        assert issubclass(FedclConfig.model_fields[name].annotation, section)
        changed[name] = {field: _other_value(f) for field, f in section.model_fields.items()}
    cfg = FedclConfig(**changed)
    link = QueueLink(address="queue.example.org:50051", tls=True)
    rc = round_config(cfg, rnd=2, model_spec=cfg.model.model_dump(), queue=link)
    back = RoundConfig.from_config_record(rc.to_config_record())
    for name, fields in changed.items():
        assert getattr(back, name).model_dump() == fields, name
    assert (back.round, back.num_rounds, back.queue_address, back.queue_tls) == (2, 10, link.address, True)


def test_the_servers_decisions_in_the_queue_section():
    """queue.enabled needs a linked queue service; fresh push needs a release mode that the sites push."""
    cfg = FedclConfig(queue={"enabled": True, "fresh_push": True})
    link = QueueLink(address="127.0.0.1:50051")
    assert round_config(cfg, rnd=1, model_spec={}, queue=None).queue.enabled is False
    on = round_config(cfg, rnd=1, model_spec={}, queue=link)
    assert (on.queue.enabled, on.queue.fresh_push, on.queue_address) == (True, True, link.address)
    public = cfg.model_copy(update={"privacy": cfg.privacy.model_copy(update={"release": "public"})})
    assert round_config(public, rnd=1, model_spec={}, queue=link).queue.fresh_push is False
