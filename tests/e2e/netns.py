"""Separate network hosts on one Linux machine: one network namespace per host, each with a veth
pair into a bridge that lives in a namespace of its own (the "switch"), so nothing touches the
machine's own network. Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2.

    net = Network.create({"coord": "10.77.0.1", "a": "10.77.0.2"})
    argv = net.exec_argv("a", ["python", "-m", "fedcl.client.cli", ...])  # ip netns exec ... python ...
    net.cut("a"); net.restore("a")                                   # the host's cable out / in
    net.destroy()                                                    # kills what runs inside, removes all

Namespaces are named ``fedcl-e2e-<pid>-<host>``; ``sweep_stale`` removes those a killed test
process (pid gone) left behind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field

PREFIX = "fedcl-e2e-"
PREFIX_LEN = 24  # subnet mask of the hosts' addresses


class NetnsUnavailable(RuntimeError):
    """This machine or user cannot create network namespaces; the message says why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_inside(ns: str) -> None:
    """SIGKILL what still runs inside ``ns`` (processes this test started there; nothing else can be)."""
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass


def _remove(ns: str) -> None:
    _kill_inside(ns)
    _ip("netns", "delete", ns, check=False)


def sweep_stale() -> list[str]:
    """Remove namespaces left by test processes that no longer exist (e.g. pytest killed by SIGKILL)."""
    removed = []
    for ns in _namespaces():
        m = re.match(rf"^{re.escape(PREFIX)}(\d+)-", ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _remove(ns)
            removed.append(ns)
    return removed


def check_available() -> None:
    """Raise NetnsUnavailable with the reason when namespaces cannot be made here."""
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2's `ip` command is not installed")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (`ip netns add` is refused to uid "
                               f"{os.geteuid()})")
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` failed: {made.stderr.strip() or made.returncode}")
    try:
        veth = _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1", check=False)
        if veth.returncode != 0:
            raise NetnsUnavailable(f"veth pairs cannot be made: {veth.stderr.strip()}")
    finally:
        _ip("netns", "delete", probe, check=False)


@dataclass
class Network:
    """Hosts on one bridged /24; ``hosts`` maps a short host name to its IPv4 address."""

    hosts: dict[str, str]
    tag: str = field(default_factory=lambda: str(os.getpid()))
    created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{PREFIX}{self.tag}-sw"

    def ns(self, host: str) -> str:
        return f"{PREFIX}{self.tag}-{host}"

    @staticmethod
    def _port(host: str) -> str:
        return f"v-{host}"[:15]  # the switch side of the host's cable (interface names: 15 bytes)

    @classmethod
    def create(cls, hosts: dict[str, str], *, tag: str | None = None) -> Network:
        """Make the switch and the hosts; everything made so far is removed if a step fails."""
        for host in hosts:
            if not re.match(r"^[a-z0-9]{1,10}$", host):
                raise ValueError(f"host name {host!r}: 1-10 lowercase letters or digits")
        net = cls(hosts=dict(hosts), **({"tag": tag} if tag else {}))
        try:
            net._build()
        except BaseException:
            net.destroy()
            raise
        return net

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        sw = self.switch
        self._add_ns(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for host, address in self.hosts.items():
            ns = self.ns(host)
            self._add_ns(ns)
            port = self._port(host)
            # the pair is made inside the switch namespace, its peer moved straight into the host
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "br0")
            _ip("-n", sw, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.exec_argv(host, argv), **kwargs)

    def cut(self, host: str) -> None:
        """Unplug the host: its switch port goes down (no carrier on either end)."""
        _ip("-n", self.switch, "link", "set", self._port(host), "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self._port(host), "up")

    def reachable(self, src: str, dst: str, port: int, *, timeout: float = 10.0) -> bool:
        """True once ``src`` opens a TCP connection to ``dst``:``port`` (bash's /dev/tcp: no ping needed)."""
        probe = f"exec 3<>/dev/tcp/{self.hosts[dst]}/{int(port)}"
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.run(src, ["timeout", "2", "bash", "-c", probe], timeout=5).returncode == 0:
                    return True
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.2)
        return False

    def destroy(self) -> None:
        """Kill what runs in the namespaces and remove them (the veth pairs and bridge go with them)."""
        for name in reversed(self.created):
            _remove(name)
        self.created.clear()


__all__ = ["Network", "NetnsUnavailable", "check_available", "sweep_stale"]
