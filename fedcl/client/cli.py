"""``fedcl-client``: join a federation as a site. A thin wrapper over Flower's SuperNode
(``flower-supernode``, run as a child process and restarted when it drops out).

    fedcl-client --server coordinator.example.org --data /site/images --site-id hospital-a \\
        --root-certificates ca.pem --token-file /run/secrets/queue-token \\
        --node-key hospital-a.node-key      # when the coordinator has server.supernode_auth

Before it starts the SuperNode, fedcl-client runs its pre-flight (``fedcl.client.preflight``): the
state folder, the policy, the data, the node key, the coordinator's TLS certificate against
--root-certificates, the queue token (one authenticated call) and a free runtime port, one line
each; a failed check stops it with that line (exit status 2). The supervisor that restarts the
SuperNode stops, with one line, on a local error that retrying cannot fix (a port taken, a bad
key or certificate file).

The site's settings travel to the ClientApp as Flower node config (``fedcl.client.app`` lists the
keys). Images never leave the site; only weights, metrics and the embeddings the privacy
settings allow do.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedcl.bound_child import CANNOT_START, popen_bound
from fedcl.client import preflight
from fedcl.client.preflight import PreflightError
from fedcl.wire.flower import flower_environment

DEFAULT_SUPERLINK_PORT = 8000
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ClientCliError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedcl-client", description="Join a fedcl federation as a site (Flower SuperNode)."
    )
    p.add_argument("--server", required=True,
                   help="the coordinator's SuperLink, HOST[:PORT] (port 8000 by default)")
    p.add_argument(
        "--data", type=Path, help="the site's images: MedMNIST .npz, Fashion-MNIST IDX folder or image folder"
    )
    p.add_argument(
        "--data-format", default="auto", choices=["auto", "medmnist", "fashion-mnist", "folder", "synthetic"]
    )
    p.add_argument("--site-id", required=True,
                   help="this site's name (as the queue service's site tokens know it)")
    p.add_argument("--root-certificates", type=Path,
                   help="CA certificate (PEM) of the SuperLink and the queue service")
    p.add_argument("--token", help="the site's queue token (prefer --token-file or FEDCL_QUEUE_TOKEN: "
                                   "command lines are visible to other users)")
    p.add_argument("--token-file", type=Path, help="file holding the site's queue token")
    p.add_argument("--insecure", action="store_true", help="no TLS anywhere (loopback tests only)")
    p.add_argument(
        "--node-key", type=Path,
        help="the site's SuperNode private key (OpenSSH EC key, "
        "deploy/make_certs.py's sites/SITE.node-key), for a coordinator "
        "with SuperNode authentication (server.supernode_auth)")
    p.add_argument("--partition-id", type=int, help="demo: use this part of a shared data set")
    p.add_argument("--num-partitions", type=int,
                   help="demo: into how many parts the shared data set is split")
    p.add_argument("--max-images", type=int, help="use at most this many images")
    p.add_argument(
        "--patient-regex",
        help="image folders: a pattern whose first group, searched in each file name, "
        "is the image's patient id (privacy.unit = \"patient\"), e.g. '^(P[0-9]+)_'")
    p.add_argument("--state-dir", type=Path, help="site state (privacy ledger, Flower's app cache); "
                                                 "default ~/.fedcl/sites/SITE")
    p.add_argument("--policy", type=Path, help="the site's privacy policy (TOML [policy]: epsilon_budget, "
                                              "max_target_epsilon, require_dpsgd, allowed_release_modes); "
                                              "round configs asking for more are refused")
    p.add_argument("--queue-address", help="reach the queue service here instead of where the server says")
    p.add_argument("--threads", type=int, help="torch threads for local training")
    p.add_argument("--runtime-address",
                   help="local address HOST[:PORT] of the SuperNode's runtime API, one per site on a machine "
                        "(default: 127.0.0.1 and a free port derived from --site-id)")
    p.add_argument("--health-address",
                   help="serve gRPC health checking here (HOST:PORT), for container health checks")
    p.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts")
    p.add_argument("--max-wait-time", type=float, help="give up reconnecting after this many seconds")
    p.add_argument(
        "--no-rejoin", action="store_true",
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
        raise ClientCliError(
            f"--patient-regex {pattern!r} is not a valid regular expression: {exc}") from None


def _toml_literal(key: str, value: str) -> str:
    if "'" in value or "\n" in value:
        raise ClientCliError(f"{key} may not contain a single quote or a newline: {value!r}")
    return f"'{value}'"


def check_args(args: argparse.Namespace) -> None:
    """Refuse arguments that do not fit together (ClientCliError), before anything is checked or started."""
    if not _SITE_ID.match(args.site_id):
        raise ClientCliError(f"--site-id {args.site_id!r}: use letters, digits, '_', '.', '-' (at most 64)")
    if (args.partition_id is None) != (args.num_partitions is None):
        raise ClientCliError("give both --partition-id and --num-partitions, or neither")
    if args.root_certificates is not None and not args.root_certificates.is_file():
        raise ClientCliError(f"--root-certificates {args.root_certificates} is not a file")
    if args.insecure and args.root_certificates is not None:
        raise ClientCliError("--insecure and --root-certificates exclude each other")
    if not args.insecure and args.root_certificates is None:
        raise ClientCliError(
            "TLS needs --root-certificates CA.pem (the consortium CA); --insecure for loopback tests")
    if args.insecure and getattr(args, "node_key", None) is not None:
        raise ClientCliError("--node-key needs TLS (Flower's SuperNode authentication refuses --insecure)")
    if args.patient_regex is not None:
        _check_patient_regex(args.patient_regex)
    _split_host_port(args.server, default_port=DEFAULT_SUPERLINK_PORT)
    runtime_host_port(args)


def runtime_host_port(args: argparse.Namespace) -> tuple[str, int | None]:
    """--runtime-address as (host, port); port None when not given (fedcl-client then picks one)."""
    value = (getattr(args, "runtime_address", None) or "").strip()
    if not value:
        return "127.0.0.1", None
    has_port = "]:" in value if value.startswith("[") else value.count(":") == 1
    host, port = _split_host_port(value, default_port=1)
    return host, port if has_port else None


def build_supernode_argv(args: argparse.Namespace, *, token_file: Path | None,
                         runtime_port: int | None = None) -> list[str]:
    """flower-supernode's arguments for these fedcl-client arguments. ``runtime_port``: the port the
    pre-flight chose for the runtime API (else --runtime-address's, else a free one now)."""
    check_args(args)
    if args.data is None and args.data_format != "synthetic":
        raise ClientCliError("--data PATH is required (or --data-format synthetic for a smoke test)")
    if args.data is not None and not args.data.exists():
        raise ClientCliError(f"--data {args.data} does not exist")
    host, port = _split_host_port(args.server, default_port=DEFAULT_SUPERLINK_PORT)
    rt_host, rt_port = runtime_host_port(args)
    if runtime_port is not None:
        rt_port = runtime_port
    elif rt_port is None:
        rt_port, _ = preflight.pick_runtime_port(rt_host, None, site_id=args.site_id)

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
    argv += (
        ["--insecure"] if args.insecure else ["--root-certificates", str(args.root_certificates.resolve())])
    if args.health_address:
        argv += ["--health-server-address", args.health_address]
    if args.max_retries is not None:
        argv += ["--max-retries", str(args.max_retries)]
    if args.max_wait_time is not None:
        argv += ["--max-wait-time", str(args.max_wait_time)]
    if getattr(args, "node_key", None) is not None:
        check_node_key(args.node_key)
        argv += ["--auth-supernode-private-key", str(args.node_key.resolve())]
    return argv


def check_node_key(path: Path) -> None:
    """Refuse now what flower-supernode would refuse later with 'Unable to parse the private key file'."""
    try:
        preflight.check_node_key_file(path)
    except PreflightError as exc:
        raise ClientCliError(str(exc)) from None


def check_server_certificate(host: str, port: int, root_certificates: Path, *,
                             timeout: float = 5.0) -> str | None:
    """TLS handshake with the coordinator, verifying its certificate with ``root_certificates``.

    A certificate that CA did not sign (or one not valid for ``host``) raises ClientCliError: the
    SuperNode would only retry forever. An unreachable server returns the reason (it may not be up
    yet; the SuperNode retries); None when the certificate is good."""
    import socket
    import ssl

    try:
        context = ssl.create_default_context(cafile=str(root_certificates))
    except (ssl.SSLError, OSError) as exc:
        raise ClientCliError(
            f"--root-certificates {root_certificates} is not a PEM CA certificate ({exc})") from None
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return None
    except ssl.SSLCertVerificationError as exc:
        if "mismatch" in str(exc.verify_message):  # signed by the CA, but for another name or address
            raise ClientCliError(
                f"the server's certificate is not valid for {host!r} ({exc.verify_message}): "
                "use --server with the name or IP address the certificate was made for "
                "(deploy/make_certs.py --server-name/--server-ip)") from None
        raise ClientCliError(
            f"the server at {host}:{port} presented a certificate that {root_certificates} does not verify "
            f"({exc.verify_message}): this is not the consortium's coordinator, or you were given the "
            "wrong CA certificate; ask the coordinator for its ca.pem"
        ) from None
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
            raise ClientCliError(
                f"the server at {host}:{port} did not answer within {args.max_wait_time:g} s ({unreachable})")
        if not said:
            print(f"fedcl-client: waiting for {host}:{port} ({unreachable})", flush=True)
            said = True
        time.sleep(interval)


def _store_token(token: str, state_dir: Path) -> Path:
    """Keep the token in a 0600 file in the state folder, so it never appears on a command line."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "queue-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        f.write(token.strip() + "\n")
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    return path


# What flower-supernode prints when a SuperLink with SuperNode authentication does not know its key
# (Flower's ApiError 2004; the process then exits with status 1, like many other failures).
NODE_REFUSED = "Failed to activate SuperNode"
NODE_REFUSED_HINT = (
    "the SuperLink does not know this SuperNode's key (yet): the coordinator registers the keys "
    "of server.supernode_keys when its run starts, or has revoked this site (server.revoked_sites); "
    "the site retries with backoff and joins once the key is registered; if it never does, check "
    "--node-key against the coordinator's list")


# Flower exit codes (flwr.supercore.exit.ExitCode) of local errors that a restart cannot fix.
_PERMANENT_FLOWER_EXITS = {
    302: "the node key could not be used", 303: "SuperNode authentication needs TLS",
    304: "the trusted entities are not valid", 600: "an address is not valid", 602: "TLS is not supported",
    603: "the root certificates do not fit", 604: "a path does not exist",
    605: "the TLS certificates are not valid",
}


def permanent_errors(*, runtime_address: str, health_address: str | None) -> dict[str, str]:
    """{text flower-supernode prints on a local error that retrying cannot fix: the line for the user}."""
    out = {
        "SuperNode Runtime HTTP API failed to start": (
            f"the SuperNode could not serve its runtime API at {runtime_address} (the port was taken after "
            "fedcl-client checked it, e.g. by another site on this machine): start the site again without "
            "--runtime-address to get a free port, or give each site its own"
        ),
        "Port in server address": (
            f"the health check address {health_address} is in use by another process: "
            "give --health-address a free HOST:PORT"
        ),
    }
    for code, what in _PERMANENT_FLOWER_EXITS.items():
        out[f"Exit Code: {code}"] = (
            f"flower-supernode stopped on a local error that retrying cannot fix (Flower "
            f"exit code {code}: {what}; its own message is above)")
    return out


def _forward(stream, hints: dict[str, str], fatal: dict[str, str], seen: list[str]) -> None:
    """Copy the SuperNode's output to ours, adding a hint after a line that contains a known pattern;
    ``seen`` collects the messages of the ``fatal`` patterns that appeared."""
    said: set[str] = set()
    for raw in iter(stream.readline, b""):
        sys.stdout.buffer.write(raw)
        text = raw.decode("utf-8", "replace")
        for pattern, hint in hints.items():
            if pattern in text and pattern not in said:
                said.add(pattern)
                sys.stdout.buffer.write(f"fedcl-client: {hint}\n".encode())
        seen += [message for pattern, message in fatal.items() if pattern in text and message not in seen]
        sys.stdout.flush()


def supervise(argv: list[str], *, rejoin: bool, min_delay: float = 1.0, max_delay: float = 30.0,
              output_hints: dict[str, str] | None = None, fatal_output: dict[str, str] | None = None) -> int:
    """Run the SuperNode; when it exits on its own (a restarted SuperLink no longer knows this node
    and refuses it), start it again with backoff, so the site rejoins the resumed run.
    ``output_hints``: {text the SuperNode may print: what to tell the user when it does}.
    ``fatal_output``: {text of a permanent local error: the one line to stop with (status 2)}: after
    the SuperNode printed such a text and exited, it is not restarted."""
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
            piped = subprocess.PIPE if output_hints or fatal_output else None
            child = popen_bound(argv, stdout=piped, stderr=subprocess.STDOUT if piped else None,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
            forwarder, fatal_seen = None, []
            if piped:  # a thread: the SuperNode's own children may hold the pipe open after it exits
                forwarder = threading.Thread(target=_forward, daemon=True, args=(
                    child.stdout, output_hints or {}, fatal_output or {}, fatal_seen))
                forwarder.start()
            code = child.wait()
            if forwarder is not None:
                forwarder.join(timeout=2.0)  # what it printed before exiting comes out before what we print
            if stop.is_set():
                return 0
            if fatal_seen:
                print(f"fedcl-client: error: {fatal_seen[0]}", file=sys.stderr, flush=True)
                return 2
            if code == CANNOT_START:  # not installed or not on PATH: a restart cannot fix it
                print(f"fedcl-client: error: {argv[0]} could not be started (the line above says why): "
                      "install Flower (flwr) in this Python environment, or put its bin folder on PATH",
                      file=sys.stderr, flush=True)
                return 2
            if not rejoin:
                return code
            if time.time() - started > 120:
                delay = min_delay
            print(f"fedcl-client: the SuperNode exited (status {code}; after a coordinator restart Flower's "
                  f"401/unauthenticated error above is expected); rejoining in {delay:.0f} s", flush=True)
            if stop.wait(delay):
                return 0
            delay = min(2 * delay, max_delay)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _say(check: str, found: str) -> None:
    """One pre-flight line: ``ok: what was found``, or ``not checked: why`` (a check that could not run)."""
    status = "" if found.startswith("not checked: ") else "ok: "
    print(f"fedcl-client: check {check}: {status}{found}", flush=True)


def _queue_token(token: str | None, token_file: Path | None) -> str | None:
    """The queue token as the ClientApp will send it (from --token/FEDCL_QUEUE_TOKEN or --token-file)."""
    if token and token_file:
        raise ClientCliError("give the queue token once: --token/FEDCL_QUEUE_TOKEN or --token-file")
    if token_file is None:
        return token.strip() if token else None
    try:
        return token_file.read_text().strip() or None
    except OSError as exc:
        raise ClientCliError(f"--token-file {token_file} cannot be read ({exc.strerror or exc})") from None


def _check_coordinator(args: argparse.Namespace, token: str | None) -> None:
    """The checks that reach the coordinator: its TLS certificate, then the queue token."""
    host, port = _split_host_port(args.server, default_port=DEFAULT_SUPERLINK_PORT)
    certs = None
    if args.insecure:
        _say("CA", "not checked: --insecure, no TLS anywhere (loopback tests only)")
    else:
        try:
            wait_verified_server(args)
        except ClientCliError as exc:
            raise PreflightError("CA", str(exc)) from None
        _say("CA", f"the coordinator at {host}:{port} presented a certificate that "
             f"{args.root_certificates} verifies")
        certs = args.root_certificates.read_bytes()
    from fedcl.config import ServerSettings

    address = args.queue_address or f"{host}:{ServerSettings.model_fields['queue_port'].default}"
    _say(
        "queue token",
        preflight.check_queue_token(address, site_id=args.site_id, token=token, root_certificates=certs,
                                    explicit=bool(args.queue_address)),
    )


def run_preflight(args: argparse.Namespace, token: str | None) -> tuple[list[str], int]:
    """Every pre-flight check, one line each (fedcl.client.preflight); the SuperNode's arguments and
    runtime port. Raises PreflightError or ClientCliError with the one line to stop with."""
    check_args(args)
    token_value = _queue_token(token, args.token_file)
    _say("state folder", preflight.check_state_folder(args.state_dir))
    _say("policy", preflight.check_policy(args.policy))
    _say(
        "data",
        preflight.check_data(args.data, data_format=args.data_format, patient_regex=args.patient_regex,
                             max_images=args.max_images),
    )
    _say("node key", preflight.check_node_key_file(args.node_key))
    token_file = _store_token(token, args.state_dir) if token else args.token_file
    _check_coordinator(args, token_value)
    rt_host, rt_port = runtime_host_port(args)
    port, how = preflight.pick_runtime_port(rt_host, rt_port, site_id=args.site_id)
    _say("runtime port", f"the SuperNode's runtime API will listen on {rt_host}:{port} ({how})")
    return build_supernode_argv(args, token_file=token_file, runtime_port=port), port


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.state_dir is None:
        args.state_dir = Path.home() / ".fedcl" / "sites" / args.site_id
    token = args.token or os.environ.get("FEDCL_QUEUE_TOKEN")
    try:
        supernode_argv, runtime_port = run_preflight(args, token)
    except (ClientCliError, PreflightError) as exc:
        print(f"fedcl-client: error: {exc}", file=sys.stderr)
        return 2
    flower_environment(flwr_home=args.state_dir / "flwr-home")
    print(f"fedcl-client: site {args.site_id} joining {supernode_argv[2]} "
          f"({'insecure' if args.insecure else 'TLS'})", flush=True)

    hints = {NODE_REFUSED: NODE_REFUSED_HINT} if args.node_key is not None else None
    fatal = permanent_errors(runtime_address=f"{runtime_host_port(args)[0]}:{runtime_port}",
                             health_address=args.health_address)
    return supervise(supernode_argv, rejoin=not args.no_rejoin, output_hints=hints, fatal_output=fatal)


if __name__ == "__main__":
    sys.exit(main())
