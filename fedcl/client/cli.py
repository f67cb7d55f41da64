"""``fedcl-client``: join a federation as a site. A thin wrapper over Flower's SuperNode
(``flower-supernode``, run as a child process and restarted when it drops out).

    fedcl-client --server coordinator.example.org --data /site/images --site-id hospital-a \\
        --root-certificates ca.pem --token-file /run/secrets/queue-token \\
        --node-key hospital-a.node-key      # when the coordinator has server.supernode_auth

Before it starts the SuperNode, fedcl-client checks the coordinator's TLS certificate against
--root-certificates and stops with a clear message when that CA did not sign it.

The site's settings travel to the ClientApp as Flower node config (``fedcl.client.app`` lists the
keys). Images never leave the site; only weights, metrics and the embeddings the privacy
settings allow do.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedcl.wire.flower import flower_environment

DEFAULT_SUPERLINK_PORT = 8000
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ClientCliError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedcl-client", description="Join a fedcl federation as a site (Flower SuperNode)."
    )
    p.add_argument("--server", required=True, help="the coordinator's SuperLink, HOST[:PORT] (port 8000 by default)")
    p.add_argument(
        "--data", type=Path, help="the site's images: MedMNIST .npz, Fashion-MNIST IDX folder or image folder"
    )
    p.add_argument(
        "--data-format", default="auto", choices=["auto", "medmnist", "fashion-mnist", "folder", "synthetic"]
    )
    p.add_argument("--site-id", required=True, help="this site's name (as the queue service's site tokens know it)")
    p.add_argument("--root-certificates", type=Path, help="CA certificate (PEM) of the SuperLink and the queue service")
    p.add_argument("--token", help="the site's queue token (prefer --token-file or FEDCL_QUEUE_TOKEN: "
                                   "command lines are visible to other users)")
    p.add_argument("--token-file", type=Path, help="file holding the site's queue token")
    p.add_argument("--insecure", action="store_true", help="no TLS anywhere (loopback tests only)")
    p.add_argument("--node-key", type=Path, help="the site's SuperNode private key (OpenSSH EC key, "
                                                "deploy/make_certs.py's sites/SITE.node-key), for a coordinator "
                                                "with SuperNode authentication (server.supernode_auth)")
    p.add_argument("--partition-id", type=int, help="demo: use this part of a shared data set")
    p.add_argument("--num-partitions", type=int, help="demo: into how many parts the shared data set is split")
    p.add_argument("--max-images", type=int, help="use at most this many images")
    p.add_argument("--patient-regex", help="image folders: a pattern whose first group, searched in each file name, "
                   "is the image's patient id (privacy.unit = \"patient\"), e.g. '^(P[0-9]+)_'")
    p.add_argument("--state-dir", type=Path, help="site state (privacy ledger, Flower's app cache); "
                                                 "default ~/.fedcl/sites/SITE")
    p.add_argument("--policy", type=Path, help="the site's privacy policy (TOML [policy]: epsilon_budget, "
                                              "max_target_epsilon, require_dpsgd, allowed_release_modes); "
                                              "round configs asking for more are refused")
    p.add_argument("--queue-address", help="reach the queue service here instead of where the server says")
    p.add_argument("--threads", type=int, help="torch threads for local training")
    p.add_argument("--runtime-address", default="127.0.0.1:9094",
                   help="local address of the SuperNode's runtime API (one per site on a machine)")
    p.add_argument("--health-address", help="serve gRPC health checking here (HOST:PORT), for container health checks")
    p.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    p.add_argument("--max-wait-time", type=float, help="give up reconnecting after this many seconds")
    p.add_argument("--no-rejoin", action="store_true",
                   help="exit when the SuperNode exits (by default the site rejoins, e.g. after a coordinator restart)")
    return p


def _split_host_port(value: str, *, default_port: int) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):  # [IPv6]:port
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientCliError(f"{value!r} is not HOST[:PORT]")
    return host, int(port)


def _check_patient_regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ClientCliError(f"--patient-regex {pattern!r} is not a valid regular expression: {exc}") from None


def _toml_literal(key: str, value: str) -> str:
    if "'" in value or "\n" in value:
        raise ClientCliError(f"{key} may not contain a single quote or a newline: {value!r}")
    return f"'{value}'"


def build_supernode_argv(args: argparse.Namespace, *, token_file: Path | None) -> list[str]:
    """flower-supernode's arguments for these fedcl-client arguments."""
    if not _SITE_ID.match(args.site_id):
        raise ClientCliError(f"--site-id {args.site_id!r}: use letters, digits, '_', '.', '-' (at most 64)")
    if args.data is None and args.data_format != "synthetic":
        raise ClientCliError("--data PATH is required (or --data-format synthetic for a smoke test)")
    if args.data is not None and not args.data.exists():
        raise ClientCliError(f"--data {args.data} does not exist")
    if (args.partition_id is None) != (args.num_partitions is None):
        raise ClientCliError("give both --partition-id and --num-partitions, or neither")
    if args.root_certificates is not None and not args.root_certificates.is_file():
        raise ClientCliError(f"--root-certificates {args.root_certificates} is not a file")
    if args.insecure and args.root_certificates is not None:
        raise ClientCliError("--insecure and --root-certificates exclude each other")
    if not args.insecure and args.root_certificates is None:
        raise ClientCliError("TLS needs --root-certificates CA.pem (the consortium CA); --insecure for loopback tests")
    if args.patient_regex is not None:
        _check_patient_regex(args.patient_regex)
    host, port = _split_host_port(args.server, default_port=DEFAULT_SUPERLINK_PORT)
    rt_host, rt_port = _split_host_port(args.runtime_address, default_port=9094)

    node: dict[str, object] = {"site-id": args.site_id, "data-format": args.data_format,
                               "insecure": bool(args.insecure)}
    if args.data is not None:
        node["data-path"] = str(args.data.resolve())
    if args.partition_id is not None:
        node["partition-id"], node["num-partitions"] = args.partition_id, args.num_partitions
    for key, value in (("max-images", args.max_images), ("threads", args.threads)):
        if value is not None:
            node[key] = int(value)
    if token_file is not None:
        node["queue-token-file"] = str(token_file.resolve())
    if args.root_certificates is not None:
        node["root-certificates"] = str(args.root_certificates.resolve())
    if args.queue_address:
        node["queue-address"] = args.queue_address
    if args.patient_regex is not None:
        node["patient-regex"] = args.patient_regex
    if getattr(args, "policy", None) is not None:
        from fedcl.config import ConfigError, load_site_policy

        try:
            load_site_policy(args.policy)  # refuse a broken policy now, not at the first round
        except ConfigError as exc:
            raise ClientCliError(str(exc)) from None
        node["policy-file"] = str(args.policy.resolve())
    node["state-dir"] = str(args.state_dir.resolve())
    parts = []
    for key, value in node.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={_toml_literal(key, str(value))}")

    argv = ["flower-supernode", "--superlink", f"{host}:{port}", "--node-config", " ".join(parts),
            "--host", rt_host, "--port", str(rt_port)]
    argv += ["--insecure"] if args.insecure else ["--root-certificates", str(args.root_certificates.resolve())]
    if args.health_address:
        argv += ["--health-server-address", args.health_address]
    if args.max_retries is not None:
        argv += ["--max-retries", str(args.max_retries)]
    if args.max_wait_time is not None:
        argv += ["--max-wait-time", str(args.max_wait_time)]
    if getattr(args, "node_key", None) is not None:
        if args.insecure:
            raise ClientCliError("--node-key needs TLS (Flower's SuperNode authentication refuses --insecure)")
        check_node_key(args.node_key)
        argv += ["--auth-supernode-private-key", str(args.node_key.resolve())]
    return argv


def check_node_key(path: Path) -> None:
    """Refuse now what flower-supernode would refuse later with 'Unable to parse the private key file'."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ClientCliError(f"--node-key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise ClientCliError(f"--node-key {path} is not an unencrypted OpenSSH private key ({exc}); use the "
                             "sites/SITE.node-key that deploy/make_certs.py wrote") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ClientCliError(f"--node-key {path} is not an EC key (Flower needs a NIST EC curve, e.g. P-384)")


def check_server_certificate(host: str, port: int, root_certificates: Path, *, timeout: float = 5.0) -> str | None:
    """TLS handshake with the coordinator, verifying its certificate with ``root_certificates``.

    A certificate that CA did not sign (or one not valid for ``host``) raises ClientCliError: the
    SuperNode would only retry forever. An unreachable server returns the reason (it may not be up
    yet; the SuperNode retries); None when the certificate is good."""
    import socket
    import ssl

    try:
        context = ssl.create_default_context(cafile=str(root_certificates))
    except (ssl.SSLError, OSError) as exc:
        raise ClientCliError(f"--root-certificates {root_certificates} is not a PEM CA certificate ({exc})") from None
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as exc:
        if "mismatch" in str(exc.verify_message):  # signed by the CA, but for another name or address
            raise ClientCliError(
                f"the server's certificate is not valid for {host!r} ({exc.verify_message}): use --server with "
                "the name or IP address the certificate was made for (deploy/make_certs.py --server-name/"
                "--server-ip)") from None
        raise ClientCliError(
            f"the server at {host}:{port} presented a certificate that {root_certificates} does not verify "
            f"({exc.verify_message}): this is not the consortium's coordinator, or you were given the wrong CA "
            "certificate; ask the coordinator for its ca.pem") from None
    except (ssl.SSLError, OSError) as exc:
        return str(exc)


def wait_verified_server(args: argparse.Namespace, *, interval: float = 3.0) -> None:
    """Wait until the coordinator answers, then check its certificate (ClientCliError when the CA
    did not sign it); gives up after --max-wait-time seconds when that is set."""
    host, port = _split_host_port(args.server, default_port=DEFAULT_SUPERLINK_PORT)
    started = time.time()
    said = False
    while (unreachable := check_server_certificate(host, port, args.root_certificates)) is not None:
        if args.max_wait_time is not None and time.time() - started > args.max_wait_time:
            raise ClientCliError(f"the server at {host}:{port} did not answer within {args.max_wait_time:g} s "
                                 f"({unreachable})")
        if not said:
            print(f"fedcl-client: waiting for {host}:{port} ({unreachable})", flush=True)
            said = True
        time.sleep(interval)


def check_state_dir(state_dir: Path) -> None:
    """The site's state folder exists (made if need be) and takes a file: the privacy ledger lives
    there, and without it no budget binds across rounds (every Flower message is a new process)."""
    probe = state_dir / ".fedcl-write-test"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ClientCliError(f"cannot use the state folder {state_dir} ({exc.strerror or exc}): the site keeps its "
                             "privacy ledger there, and under DP it must persist between rounds; give --state-dir "
                             "a writable folder") from None


def _store_token(token: str, state_dir: Path) -> Path:
    """Keep the token in a 0600 file in the state folder, so it never appears on a command line."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "queue-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        f.write(token.strip() + "\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return path


def _die_with_parent() -> None:  # runs in the child before exec (Linux): no orphaned SuperNode
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# What flower-supernode prints when a SuperLink with SuperNode authentication does not know its key
# (Flower's ApiError 2004; the process then exits with status 1, like many other failures).
NODE_REFUSED = "Failed to activate SuperNode"
NODE_REFUSED_HINT = ("the SuperLink refused this SuperNode's key: the coordinator has not registered it "
                     "(server.supernode_keys) or has revoked this site (server.revoked_sites); check --node-key")


def _forward(stream, hints: dict[str, str]) -> None:
    """Copy the SuperNode's output to ours, adding a hint after a line that contains a known pattern."""
    said: set[str] = set()
    for raw in iter(stream.readline, b""):
        sys.stdout.buffer.write(raw)
        text = raw.decode("utf-8", "replace")
        for pattern, hint in hints.items():
            if pattern in text and pattern not in said:
                said.add(pattern)
                sys.stdout.buffer.write(f"fedcl-client: {hint}\n".encode())
        sys.stdout.flush()


def supervise(argv: list[str], *, rejoin: bool, min_delay: float = 1.0, max_delay: float = 30.0,
              output_hints: dict[str, str] | None = None) -> int:
    """Run the SuperNode; when it exits on its own (a restarted SuperLink no longer knows this node
    and refuses it), start it again with backoff, so the site rejoins the resumed run.
    ``output_hints``: {text the SuperNode may print: what to tell the user when it does}."""
    stop = threading.Event()
    child: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        stop.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    delay = min_delay
    try:
        while True:
            started = time.time()
            piped = subprocess.PIPE if output_hints else None
            child = subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                                     stdout=piped, stderr=subprocess.STDOUT if piped else None,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
            forwarder = None
            if output_hints:  # a thread: the SuperNode's own children may hold the pipe open after it exits
                forwarder = threading.Thread(target=_forward, args=(child.stdout, output_hints), daemon=True)
                forwarder.start()
            code = child.wait()
            if forwarder is not None:
                forwarder.join(timeout=2.0)  # what it printed before exiting comes out before what we print
            if stop.is_set():
                return 0
            if not rejoin:
                return code
            if time.time() - started > 120:
                delay = min_delay
            print(f"fedcl-client: the SuperNode exited (status {code}); rejoining in {delay:.0f} s", flush=True)
            if stop.wait(delay):
                return 0
            delay = min(2 * delay, max_delay)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.state_dir is None:
        args.state_dir = Path.home() / ".fedcl" / "sites" / args.site_id
    token = args.token or os.environ.get("FEDCL_QUEUE_TOKEN")
    try:
        if token and args.token_file:
            raise ClientCliError("give the queue token once: --token/FEDCL_QUEUE_TOKEN or --token-file")
        if args.token_file is not None and not args.token_file.is_file():
            raise ClientCliError(f"--token-file {args.token_file} is not a file")
        check_state_dir(args.state_dir)
        token_file = _store_token(token, args.state_dir) if token else args.token_file
        supernode_argv = build_supernode_argv(args, token_file=token_file)
        if not args.insecure:
            wait_verified_server(args)
    except ClientCliError as exc:
        print(f"fedcl-client: error: {exc}", file=sys.stderr)
        return 2
    flower_environment(flwr_home=args.state_dir / "flwr-home")
    print(f"fedcl-client: site {args.site_id} joining {supernode_argv[2]} "
          f"({'insecure' if args.insecure else 'TLS'})", flush=True)

    hints = {NODE_REFUSED: NODE_REFUSED_HINT} if args.node_key is not None else None
    return supervise(supernode_argv, rejoin=not args.no_rejoin, output_hints=hints)


if __name__ == "__main__":
    sys.exit(main())
