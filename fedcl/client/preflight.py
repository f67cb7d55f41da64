"""fedcl-client's pre-flight: what a site can check on its own before it joins the federation.

Each check returns what it found (fedcl-client prints it as one ``ok`` line) or raises
PreflightError with the problem and its fix (fedcl-client prints that one line and exits 2), so a
mistake is found at start rather than when every round fails:

    state folder   exists and takes a file (the privacy ledger lives there)
    policy         the site's policy file parses
    data           the site's images load, are not empty, and are (N, C, H, W) with 1 or 3 channels
    node key       an unencrypted OpenSSH EC key (whether the coordinator registered it, Flower 1.41
                   tells only when the SuperNode joins)
    queue token    one authenticated Stats call to the queue service
    runtime port   the SuperNode's local runtime API port is free (one per site on a machine)
"""

from __future__ import annotations

import socket
import zlib
from pathlib import Path

# Ports the runtime API of a site is given when --runtime-address is left out: derived from the site
# id, so a site keeps its port across restarts, and the next free one when another process holds it.
RUNTIME_PORTS = range(9100, 9900)


class PreflightError(ValueError):
    """A check failed; ``str()`` is the one line for the user: the check, the problem, the fix."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(f"check {check}: {message}")
        self.check = check


def check_state_folder(state_dir: Path) -> str:
    """The site's state folder exists (made if need be) and takes a file: the privacy ledger lives
    there, and without it no budget binds across rounds (every Flower message is a new process)."""
    probe = state_dir / ".fedcl-write-test"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PreflightError(
            "state folder",
            f"cannot write to {state_dir} ({exc.strerror or exc}): the site keeps "
            "its privacy ledger there, and under DP it must persist between rounds; give "
            "--state-dir a writable folder") from None
    return f"{state_dir} is writable"


def check_policy(path: Path | None) -> str:
    from fedcl.config import ConfigError, load_site_policy

    if path is None:
        return "none given (--policy): the site accepts the coordinator's privacy settings as they come"
    try:
        policy = load_site_policy(path)
    except ConfigError as exc:  # one line, whatever the number of problems
        raise PreflightError("policy", " ".join(part.strip() for part in str(exc).splitlines())) from None
    parts = ["requires DP-SGD" if policy.require_dpsgd else "DP-SGD not required",
             f"release modes {', '.join(policy.allowed_release_modes)}"]
    if policy.epsilon_budget is not None:
        parts.append(f"budget ε ≤ {policy.epsilon_budget:g}")
    return f"{path}: " + "; ".join(parts)


def check_data(data: Path | None, *, data_format: str, patient_regex: str | None = None,
               max_images: int | None = None) -> str:
    """Load the site's training images as the ClientApp will, and check they are usable."""
    from fedcl.client.app import SiteError, _detect_format
    from fedcl.data import DataError, load_dataset

    if data_format == "synthetic" and data is None:
        return "synthetic images (a smoke test; no site data)"
    if data is None:
        raise PreflightError("data", "no --data PATH given (or --data-format synthetic for a smoke test)")
    if not data.exists():
        raise PreflightError("data", f"--data {data} does not exist: give the path of the site's images")
    try:
        fmt = data_format if data_format != "auto" else _detect_format(data)  # as the ClientApp detects it
    except SiteError as exc:
        raise PreflightError("data", str(exc)) from None
    try:
        images = load_dataset(name=fmt, path=data, split="train", group_regex=patient_regex)
    except DataError as exc:
        raise PreflightError("data", f"{exc}") from None
    except (OSError, ValueError) as exc:  # a file the loader could not read at all
        raise PreflightError(
            "data", f"cannot read {data} as {fmt} data ({exc}): check --data and --data-format") from None
    x = images.images
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise PreflightError("data", f"{data} gives images of shape {tuple(x.shape)}, not (N, 1 or 3, H, W): "
                             "give grayscale or RGB images")
    if x.shape[0] == 0:
        raise PreflightError("data", f"{data} holds no training images: point --data at the site's images")
    n = x.shape[0] if max_images is None else min(x.shape[0], max_images)
    patients = "" if images.groups is None else f", {int(images.groups.unique().numel())} patients"
    return f"{n} images of {x.shape[1]}x{x.shape[2]}x{x.shape[3]} ({fmt}{patients}) in {data}"


def check_node_key_file(path: Path | None) -> str:
    """The key parses as Flower needs it. Whether the coordinator registered it cannot be asked: in
    Flower 1.41 the SuperLink tells a SuperNode only when it joins (activation), so that is said too."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if path is None:
        return "none given (--node-key): needed only when the coordinator runs with server.supernode_auth"
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise PreflightError("node key", f"--node-key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise PreflightError(
            "node key",
            f"--node-key {path} is not an unencrypted OpenSSH private key ({exc}); "
            "use the sites/SITE.node-key that deploy/make_certs.py wrote") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PreflightError("node key", f"--node-key {path} is not an EC key (Flower needs a NIST EC curve, "
                             "e.g. P-384)")
    return (f"{path} is an EC key ({key.curve.name}); whether the coordinator registered it is not checked: "
            "Flower 1.41's SuperLink tells only when the SuperNode joins")


def check_queue_token(address: str, *, site_id: str, token: str | None, root_certificates: bytes | None,
                      explicit: bool, timeout: float = 5.0) -> str:
    """One authenticated call (Stats) to the queue service with the site's token.

    A refused token fails the check. A queue service that does not answer is not a failure (it may
    start after the site; the coordinator also tells the site its address at the first round): the
    line says the token was not checked."""
    import grpc

    from fedcl.wire.queue_client import QueueClient, QueueServiceError

    how = ("--queue-address" if explicit
           else "the coordinator's host, default queue port; --queue-address to change")
    try:
        with QueueClient(address, site_id=site_id, token=token, root_certificates=root_certificates,
                         timeout=timeout, retries=0) as queue:
            stats = queue.stats()
    except QueueServiceError as exc:
        if exc.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            given = "its token" if token else "no token"
            raise PreflightError(
                "queue token",
                f"the queue service at {address} refused site {site_id!r} with "
                f"{given} ({exc.code.name}: {exc.details}): use the token the coordinator made "
                f"for {site_id} (deploy/make_certs.py's sites/{site_id}.token) with --token-file") from None
        return (
            f"not checked: no queue service answered at {address} ({how}) ({exc.code.name}); the token is "
            "first used at the first round")
    return f"the queue service at {address} accepted site {site_id!r} (capacity {stats['capacity']})"


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (as uvicorn binds: with SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_runtime_port(host: str, port: int | None, *, site_id: str) -> tuple[int, str]:
    """The SuperNode's runtime API port: ``port`` when given (it must be free), else one derived from
    the site id (the next free one in RUNTIME_PORTS when that one is taken). Returns (port, how)."""
    if port is not None:
        if not port_is_free(host, port):
            raise PreflightError(
                "runtime port",
                f"{host}:{port} (--runtime-address) is in use by another process "
                "(another site on this machine?): give each site its own --runtime-address, or "
                "leave it out to get a free port")
        return port, "given with --runtime-address"
    first = zlib.crc32(site_id.encode()) % len(RUNTIME_PORTS)
    for i in range(len(RUNTIME_PORTS)):
        candidate = RUNTIME_PORTS[(first + i) % len(RUNTIME_PORTS)]
        if port_is_free(host, candidate):
            how = "derived from the site id" if i == 0 else "the next free one after the site id's"
            return candidate, f"{how}; --runtime-address HOST:PORT to choose"
    raise PreflightError(
        "runtime port",
        f"no free port on {host} in {RUNTIME_PORTS.start}-{RUNTIME_PORTS.stop - 1}:"
        " give --runtime-address HOST:PORT")
