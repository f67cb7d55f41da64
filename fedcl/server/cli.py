"""``fedcl-server``: the coordinator's side of a federation, from one config file.

    fedcl-server --config consortium.toml              # = fedcl-server run: queue + SuperLink + the run
    fedcl-server superlink --config consortium.toml    # only Flower's SuperLink, with the config's TLS;
                                                       # once up it prints what `flwr run` needs
                                                       # (docs/flower.md)
    fedcl-server serve-queue --config consortium.toml  # only the queue service, from the same config
    fedcl-server start-run --config consortium.toml    # submit the run to a SuperLink that is up, follow it
    fedcl-server queue --config consortium.toml        # = serve-queue (or a [queue_service] file)
    fedcl-server health --http URL | --grpc HOST:PORT  # container health checks

``run`` starts the queue service in this process (restoring its snapshot when there is one),
Flower's SuperLink as a child process, submits the fedcl app with ``flwr run`` and follows the
ServerApp's log until the run ends; run it again after a crash and the ServerApp resumes from its
last checkpoint. Sites join with ``fedcl-client --server HOST:PORT``.

With ``server.supernode_auth`` the SuperLink runs with Flower's ``--enable-supernode-auth`` and
the run (``run``, ``start-run``) first registers every site key of ``server.supernode_keys`` but
the revoked ones (``flwr supernode register``); ``server.revoked_sites`` are also refused by the
queue service (PERMISSION_DENIED, audited).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedcl.bound_child import popen_bound
from fedcl.wire.flower import flower_environment

FEDERATION_NAME = "fedcl"
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedcl"
version = "{version}"
description = "fedcl federation (the code is the fedcl package installed on each machine)"

[tool.flwr.app]
publisher = "fedcl"

[tool.flwr.app.components]
serverapp = "fedcl.server.app:app"
clientapp = "fedcl.client.app:app"

[tool.flwr.app.config]
config-path = ""
out-dir = ""
"""


class ServerCliError(RuntimeError):
    pass


def _log(message: str) -> None:
    print(f"fedcl-server: {message}", flush=True)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise ServerCliError(f"{value!r} is not HOST:PORT")
    return host, int(port)


def _with_server(cfg, **update):
    return cfg.model_copy(update={"server": cfg.server.model_copy(update=update)})


_ANY_ADDRESSES = ("0.0.0.0", "", "::")  # a bind host that means every interface


def _connect_host(host: str) -> str:
    """Where to reach a service bound to ``host`` from this machine."""
    return "127.0.0.1" if host in _ANY_ADDRESSES else host


def _advertised_host(host: str) -> str:
    """Where other machines reach a service bound to ``host``: this machine's name for an any-address."""
    return socket.getfqdn() if host in _ANY_ADDRESSES else host


def _load(config: Path | None, overrides: list[str]):
    from fedcl.config import ConfigError, load_config

    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        raise ServerCliError(str(exc)) from None


def _resolve_paths(cfg, *, out_dir: Path | None):
    """Absolute paths everywhere: the ServerApp runs in another process, from another folder."""
    s = cfg.server
    update = {"out_dir": (out_dir or s.out_dir).resolve()}
    if s.audit_log is None:  # one audit log per run folder (the queue service's and the rounds')
        update["audit_log"] = update["out_dir"] / "queue-audit.jsonl"
    for name in ("checkpoint_dir", "tls_cert", "tls_key", "tls_ca", "audit_log"):
        value = getattr(s, name)
        if value is not None:
            update[name] = Path(value).resolve()
    if s.supernode_keys:
        update["supernode_keys"] = {site: Path(path).resolve() for site, path in s.supernode_keys.items()}
    cfg = cfg.model_copy(update={"server": s.model_copy(update=update)})
    if cfg.data.path is not None:
        cfg = cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"path": Path(cfg.data.path).resolve()})})
    return cfg


def write_effective_config(cfg, out_dir: Path) -> Path:
    """The validated settings as JSON for the ServerApp (0600: it holds the queue tokens)."""
    from fedcl.config import dump_config

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fedcl-config.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(dump_config(cfg))
    return path


def write_app_dir(directory: Path) -> Path:
    """A Flower app folder whose components are the installed fedcl's: no code travels in the FAB."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("fedcl")
    except PackageNotFoundError:
        ver = "0.0.0"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(APP_PYPROJECT.format(version=ver))
    return directory


def flwr_connection_block(*, address: str, insecure: bool, root_certificates: Path | None) -> str:
    """The `[superlink.fedcl]` table of a Flower config.toml: the `flwr` CLI's connection to our SuperLink."""
    lines = [f"[superlink.{FEDERATION_NAME}]", f"address = {json.dumps(address)}"]
    if insecure:
        lines.append("insecure = true")
    else:
        if root_certificates is None:
            raise ServerCliError(
                "TLS to the SuperLink needs server.tls_ca (the CA that signed its certificate)")
        lines.append(f"root-certificates = {json.dumps(str(root_certificates))}")
    return "\n".join(lines) + "\n"


def write_flwr_connection(flwr_home: Path, *, address: str, insecure: bool,
                          root_certificates: Path | None) -> None:
    """The `flwr` CLI's connection to our SuperLink (config.toml in FLWR_HOME), the default one."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    block = flwr_connection_block(address=address, insecure=insecure, root_certificates=root_certificates)
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "{FEDERATION_NAME}"\n\n{block}')


def _tls_args(cfg) -> list[str]:
    s = cfg.server
    if s.insecure:
        return ["--insecure"]
    if s.tls_cert is None or s.tls_key is None:
        raise ServerCliError(
            "TLS needs server.tls_cert and server.tls_key (deploy/ has a certificate script), "
            "or server.insecure = true on loopback")
    args = ["--ssl-certfile", str(s.tls_cert), "--ssl-keyfile", str(s.tls_key)]
    if s.tls_ca is not None:
        args += ["--ssl-ca-certfile", str(s.tls_ca)]
    return args


def superlink_command(cfg, *, port: int, health_address: str | None = None) -> list[str]:
    cmd = ["flower-superlink", *_tls_args(cfg), "--host", cfg.server.superlink_host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if cfg.server.supernode_auth:
        cmd.append("--enable-supernode-auth")  # only SuperNodes registered with `flwr supernode register`
    if health_address:
        cmd += ["--health-server-address", health_address]
    return cmd


def wait_superlink(address: str, *, insecure: bool, ca: Path | None, timeout: float, proc=None) -> None:
    import httpx

    scheme = "http" if insecure else "https"
    verify: bool | str = True if insecure else str(ca) if ca else True
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerCliError(f"the SuperLink exited with status {proc.returncode} (see its log)")
        try:
            if httpx.get(f"{scheme}://{address}/health", timeout=2.0, verify=verify).is_success:
                return
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise ServerCliError(f"the SuperLink at {address} did not come up within {timeout:.0f} s ({last})")


def submit_run(*, app_dir: Path, env: dict, config_path: Path, out_dir: Path,
               log_path: Path) -> tuple[int, int]:
    """``flwr run`` the app and stream the ServerApp's log until the run ends; (run id, exit code)."""
    run_config = f"config-path={json.dumps(str(config_path))} out-dir={json.dumps(str(out_dir))}"
    cmd = ["flwr", "run", str(app_dir), FEDERATION_NAME, "--run-config", run_config, "--stream"]
    run_id = None
    with open(log_path, "a") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            sys.stdout.write(line)
            sys.stdout.flush()
            if run_id is None and (m := re.search(r"started run (\d+)", line)):
                run_id = int(m.group(1))
        code = proc.wait()
    if run_id is None:
        raise ServerCliError(f"`flwr run` did not start a run (exit status {code}); see {log_path}")
    return run_id, code


def run_status(run_id: int, *, env: dict) -> str:
    out = subprocess.run(["flwr", "ls", FEDERATION_NAME, "--run-id", str(run_id), "--format", "json"],
                         env=env, capture_output=True, text=True)
    try:
        runs = json.loads(out.stdout)["runs"]
        return str(runs[0]["status"])
    except (json.JSONDecodeError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip()[-200:]} {out.stderr.strip()[-200:]})"


def check_supernode_keys(cfg) -> dict[str, Path]:
    """The public SuperNode keys to register: every listed site but the revoked ones, each file an
    OpenSSH EC public key (what `flwr supernode register` takes); a clear error otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    s = cfg.server
    if not s.supernode_auth:
        return {}
    keys = {}
    for site, path in sorted(s.supernode_keys.items()):
        path = Path(path)
        try:
            key = load_ssh_public_key(path.read_bytes())
        except OSError as exc:
            raise ServerCliError(
                f"server.supernode_keys.{site}: cannot read {path} ({exc.strerror or exc})") from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise ServerCliError(
                f"server.supernode_keys.{site}: {path} is not an OpenSSH public key ({exc}); "
                "give the site's sites/<site>.node-key.pub from deploy/make_certs.py") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ServerCliError(f"server.supernode_keys.{site}: {path} is not an EC key (Flower's SuperNode "
                                 "authentication needs a NIST EC curve, e.g. P-384)")
        if site not in s.revoked_sites:
            keys[site] = path
    return keys


def register_supernode_keys(keys: dict[str, Path], *, env: dict) -> dict[str, int | None]:
    """Register each site's public key with the SuperLink (`flwr supernode register`, Flower's
    Control API); {site: node id}, None for a key the SuperLink already knew (one that outlived
    fedcl-server). The registrations run side by side: each is a `flwr` process of its own."""
    procs = {
        site: subprocess.Popen(
            ["flwr", "supernode", "register", str(path), FEDERATION_NAME, "--name", site, "--format", "json"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for site, path in keys.items()
    }
    registered: dict[str, int | None] = {}
    for site, proc in procs.items():
        stdout, stderr = proc.communicate()
        text = stdout.strip()
        try:
            reply = json.loads(text[text.find("{"):]) if "{" in text else {}
        except json.JSONDecodeError:
            reply = {}
        if proc.returncode == 0 and reply.get("success"):
            registered[site] = int(reply["node-id"])
        elif "already in use" in (text + stderr).lower():
            registered[site] = None
        else:
            detail = (reply.get("error-message") or stderr.strip() or text)[-400:]
            raise ServerCliError(
                f"could not register site {site}'s SuperNode key {keys[site]} with the SuperLink: {detail}")
    return registered


def _flower_env(flwr_home: Path) -> dict:
    flower_environment(flwr_home=flwr_home)
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    return env


def start_and_follow_run(cfg, *, superlink_address: str, join_address: str | None = None) -> int:
    """Submit the run to the SuperLink at ``superlink_address``; 0 when it completed. ``join_address``:
    where sites join, announced once their keys are registered (a site that connects before that is
    refused)."""
    out_dir = Path(cfg.server.out_dir)
    env = _flower_env(out_dir / "flwr-home" / "cli")
    write_flwr_connection(Path(env["FLWR_HOME"]), address=superlink_address, insecure=cfg.server.insecure,
                          root_certificates=cfg.server.tls_ca)
    if keys := check_supernode_keys(cfg):
        registered = register_supernode_keys(keys, env=env)
        _log("SuperNode authentication on; registered: " + ", ".join(
            f"{site} (node {node})" if node is not None else f"{site} (already registered)"
            for site, node in registered.items()))
    if join_address:
        _log(f"sites join with fedcl-client --server {join_address}"
             + (" (their SuperNode keys are registered now)" if keys else ""))
    if cfg.server.revoked_sites:
        _log(f"revoked sites (queue refuses them{', SuperNode keys not registered' if keys else ''}): "
             + ", ".join(sorted(cfg.server.revoked_sites)))
    config_path = write_effective_config(cfg, out_dir)
    app_dir = write_app_dir(out_dir / "flwr-app")
    log_path = out_dir / "serverapp.log"
    start = log_path.stat().st_size if log_path.exists() else 0
    run_id, code = submit_run(app_dir=app_dir, env=env, config_path=config_path, out_dir=out_dir,
                              log_path=log_path)
    status = run_status(run_id, env=env)
    reason = run_failure_reason(log_path, start=start) if status != "finished:completed" else None
    _log(f"run {run_id}: {status}" + (f": {reason}" if reason else ""))
    summary = out_dir / "summary.json"
    if status == "finished:completed" and summary.exists():
        s = json.loads(summary.read_text())
        knn = s.get("final_knn")
        _log(
            f"{s.get('rounds')} rounds; final kNN accuracy "
            f"{'—' if knn is None else f'{100 * knn:.2f}%'}; encoder {s.get('encoder')}; metrics in {out_dir}"
        )
        return 0
    return 1 if code == 0 else code


# the errors by which fedcl's ServerApp refuses to start or go on, each raised with the reason and the fix
_RUN_ERRORS = re.compile(r"\b(?:FederationError|StrategyError|CheckpointError|DataError|ConfigError): (.+)")


def run_failure_reason(log_path: Path, *, start: int = 0) -> str | None:
    """The last refusal fedcl's ServerApp logged after byte ``start`` of ``log_path`` (this run's part
    of the appended log), as one line; None when there is none (a crash of another kind: see the log)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    found = _RUN_ERRORS.findall(text)
    return found[-1].strip() if found else None


def restart_note(cfg) -> str | None:
    """What a restart of the coordinator does to the sites, when ``out_dir`` holds a checkpoint."""
    from fedcl.server.checkpoint import checkpoint_path

    s = cfg.server
    ckpt_dir = Path(s.checkpoint_dir) if s.checkpoint_dir else Path(s.out_dir) / "checkpoints"
    if not checkpoint_path(ckpt_dir).exists():
        return None
    return (
        f"a checkpoint is in {ckpt_dir}: the run resumes from it. Sites that were connected rejoin by "
        "themselves: this new SuperLink does not know their old SuperNodes, so each site logs that refusal "
        "(HTTP 401 from Flower) and fedcl-client starts a new one")


def _start_queue(cfg, *, generate_coordinator_token: bool):
    """The queue service in this process, on the config's host and port, through the one start path
    (fedcl.server.queue_cli.serve_queue); returns (server, cfg with the queue's address and coordinator
    token)."""
    from fedcl.server.app import QUEUE_SNAPSHOT_NAME
    from fedcl.server.queue_cli import QueueConfigError, serve_queue, settings_from_fedcl_config

    s = cfg.server
    coordinator = s.coordinator_token
    if coordinator is None and generate_coordinator_token:
        coordinator = secrets.token_urlsafe(24)  # only this process and its ServerApp know it
    try:
        settings = settings_from_fedcl_config(
            cfg, snapshot_path=Path(s.out_dir) / QUEUE_SNAPSHOT_NAME, coordinator_token=coordinator,
            audit_log=Path(s.audit_log) if s.audit_log else Path(s.out_dir) / "queue-audit.jsonl")
        server = serve_queue(
            settings, warn=lambda line: print(f"fedcl-server: {line}", file=sys.stderr, flush=True))
    except (QueueConfigError, OSError) as exc:
        raise ServerCliError(str(exc)) from None
    if len(server.queue) or server.queue.current_round:
        _log(f"queue restored from {settings.snapshot_path}: {len(server.queue)} entries, "
             f"round {server.queue.current_round}")
    cfg = cfg.model_copy(update={"server": s.model_copy(update={
        "queue_port": server.port, "queue_host": _advertised_host(s.queue_host),
        "coordinator_token": coordinator})})
    return server, cfg


def cmd_run(args) -> int:
    cfg = _resolve_paths(_load(args.config, args.set), out_dir=args.out_dir)
    out_dir = Path(cfg.server.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    port = cfg.server.superlink_port or _free_port()
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"superlink_port": port})})
    queue_server = None
    superlink = None
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        check_supernode_keys(cfg)  # a bad key file stops us before anything starts
        if note := restart_note(cfg):
            _log(note)
        if cfg.queue.enabled:
            queue_server, cfg = _start_queue(cfg, generate_coordinator_token=True)
            _log(f"queue service on {cfg.server.queue_host}:{cfg.server.queue_port}")
        env = _flower_env(out_dir / "flwr-home" / "superlink")
        with open(out_dir / "superlink.log", "a") as log_file:
            superlink = subprocess.Popen(
                superlink_command(cfg, port=port, health_address=args.health_address), env=env,
                stdout=log_file, stderr=subprocess.STDOUT)
        address = f"{_connect_host(cfg.server.superlink_host)}:{port}"
        wait_superlink(address, insecure=cfg.server.insecure, ca=cfg.server.tls_ca, timeout=120,
                       proc=superlink)
        _log(f"SuperLink on {cfg.server.superlink_host}:{port}")
        return start_and_follow_run(cfg, superlink_address=address,
                                    join_address=f"{_advertised_host(cfg.server.superlink_host)}:{port}")
    except KeyboardInterrupt:
        _log(f"stopping ({'signal ' + str(stop['signal']) if stop['signal'] else 'interrupted'}); "
             "run fedcl-server again to resume from the last checkpoint")
        return 130
    except ServerCliError as exc:
        print(f"fedcl-server: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if superlink is not None and superlink.poll() is None:
            superlink.terminate()
            try:
                superlink.wait(timeout=15)
            except subprocess.TimeoutExpired:
                superlink.kill()
        if queue_server is not None:
            queue_server.stop(grace=2.0)


def cmd_start_run(args) -> int:
    cfg = _resolve_paths(_load(args.config, args.set), out_dir=args.out_dir)
    address = args.superlink or f"{_connect_host(cfg.server.superlink_host)}:{cfg.server.superlink_port}"
    try:
        if args.queue:
            host, port = _host_port(args.queue)
            cfg = _with_server(cfg, queue_host=host, queue_port=port)
        check_supernode_keys(cfg)
        wait_superlink(address, insecure=cfg.server.insecure, ca=cfg.server.tls_ca, timeout=args.wait)
        return start_and_follow_run(cfg, superlink_address=address)
    except ServerCliError as exc:
        print(f"fedcl-server: error: {exc}", file=sys.stderr)
        return 2


def flwr_run_instructions(cfg, *, address: str, config_json: Path, queue_command: list[str]) -> str:
    """What a Flower user runs to submit a run to this SuperLink with `flwr run` (printed once it is up)."""
    s = cfg.server
    if cfg.queue.enabled and s.coordinator_token is None:
        return (
            "fedcl-server: this config names no server.coordinator_token, so a run submitted here cannot "
            "drive a queue service of its own; set one (deploy/make_certs.py writes it) to submit runs "
            "with `flwr run`\n"
        )
    block = flwr_connection_block(address=address, insecure=s.insecure, root_certificates=s.tls_ca)
    register = "".join(f"flwr supernode register {shlex.quote(str(path))} {FEDERATION_NAME} --name {site}\n"
                       for site, path in check_supernode_keys(cfg).items())
    run_config = f"config-path={json.dumps(str(config_json))}"
    steps = [
        "fedcl-server: to submit a run with Flower's own `flwr run`, add this connection to "
        "~/.flwr/config.toml (or $FLWR_HOME/config.toml):",
        "", block.rstrip("\n"), "",
    ]
    if register:
        steps += ["fedcl-server: register the sites' SuperNode keys once (start-run does it itself):", "",
                  register.rstrip("\n"), ""]
    if cfg.queue.enabled:
        steps += ["fedcl-server: start the queue service:", "", shlex.join(queue_command), ""]
    steps += [
        f"fedcl-server: then, in the fedcl project folder (or {config_json.parent / 'flwr-app'}, an app "
        "folder with no code: the sites then run their installed fedcl):",
        "", f"flwr run . {FEDERATION_NAME} --stream --run-config {shlex.quote(run_config)}", "",
        f"fedcl-server: {config_json} holds this config's settings as of now (the queue tokens too); "
        "fedcl-server start-run does all of the above itself"]
    return "\n".join(steps) + "\n"


def _forward_signals(proc: subprocess.Popen) -> dict:
    """SIGTERM, SIGINT and SIGHUP to this process go on to ``proc``; the previous handlers."""
    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    return {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}


def cmd_superlink(args) -> int:
    """Flower's SuperLink with the config's TLS, in a child process (signals are passed on); once it
    is up, the Flower connection and the `flwr run` line that submit a run to it."""
    cfg = _resolve_paths(_load(args.config, args.set), out_dir=args.out_dir)
    try:
        if args.listen:
            host, port = _host_port(args.listen)
            cfg = _with_server(cfg, superlink_host=host, superlink_port=port)
        if args.queue:
            host, port = _host_port(args.queue)
            cfg = _with_server(cfg, queue_host=host, queue_port=port)
        cmd = superlink_command(cfg, port=cfg.server.superlink_port, health_address=args.health_address)
        check_supernode_keys(cfg)
    except ServerCliError as exc:
        print(f"fedcl-server: error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(cfg.server.out_dir)
    env = _flower_env(out_dir / "flwr-home" / "superlink")
    _log(" ".join(cmd))
    proc = popen_bound(cmd, env=env)
    previous = _forward_signals(proc)
    try:
        s = cfg.server
        address = f"{_connect_host(s.superlink_host)}:{s.superlink_port}"
        try:
            wait_superlink(address, insecure=s.insecure, ca=s.tls_ca, timeout=300, proc=proc)
        except ServerCliError as exc:
            _log(f"{exc}; no `flwr run` instructions")
        else:
            shown = f"{_advertised_host(s.superlink_host)}:{s.superlink_port}"
            queue_cmd = ["fedcl-server", "queue",
                         *(["--config", str(args.config.resolve())] if args.config else []),
                         *[a for o in args.set for a in ("--set", o)],
                         *(["--out-dir", str(out_dir)] if args.out_dir else [])]
            _log(f"SuperLink up on {address}")
            try:
                write_app_dir(out_dir / "flwr-app")
                config_json = write_effective_config(cfg, out_dir)
            except OSError as exc:  # the SuperLink serves on; only the instructions are missing
                _log(f"cannot write the run's config into {out_dir} ({exc}); no `flwr run` instructions")
            else:
                print(
                    flwr_run_instructions(cfg, address=shown, config_json=config_json,
                                          queue_command=queue_cmd),
                    end="", flush=True,
                )
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_serve_queue(args) -> int:
    """The queue service from the fedcl config (tokens, TLS, snapshot in out_dir), until SIGTERM."""
    cfg = _resolve_paths(_load(args.config, args.set), out_dir=args.out_dir)
    if args.listen:
        host, port = _host_port(args.listen)
        cfg = _with_server(cfg, queue_host=host, queue_port=port)
    Path(cfg.server.out_dir).mkdir(parents=True, exist_ok=True)
    from fedcl.server.queue_service import stop_on_signal

    with stop_on_signal() as stop:  # installed before the start: a SIGTERM during it still stops cleanly
        server, cfg = _start_queue(cfg, generate_coordinator_token=False)  # the separate ServerApp needs it
        _log(f"queue service on {cfg.server.queue_host}:{server.port}; snapshot in {cfg.server.out_dir}")
        server.serve_until(stop, grace=5.0)
    _log("queue service stopped (snapshot written)")
    return 0


def cmd_health(args) -> int:
    """Exit 0 when the service answers: HTTP 2xx (SuperLink /health) or gRPC SERVING; one status line
    either way."""
    target = (
        args.http or f"{args.grpc} (gRPC health{', service ' + repr(args.service) if args.service else ''})")
    try:
        if args.http:
            import httpx

            code = httpx.get(args.http, timeout=args.timeout,
                             verify=str(args.ca) if args.ca else True).status_code
            ok, status = 200 <= code < 300, f"HTTP {code}"
        else:
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            channel = (grpc.secure_channel(args.grpc, grpc.ssl_channel_credentials(args.ca.read_bytes()))
                       if args.ca else grpc.insecure_channel(args.grpc))
            with channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except Exception as exc:  # any failure is "not healthy"; say why for `docker inspect`
        print(f"unhealthy: {target}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {target}: {status}", file=sys.stderr)
        return 1
    print(f"healthy: {target}: {status}", flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedcl-server", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", type=Path, help="TOML config file")
        sp.add_argument("--set", "-s", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a setting (repeatable)")
        sp.add_argument("--out-dir", type=Path, help="run folder (default: server.out_dir)")

    run = sub.add_parser("run", help="queue service + SuperLink + the run, until it ends (the default)")
    common(run)
    run.add_argument("--health-address", help="SuperLink gRPC health service address (HOST:PORT)")
    start = sub.add_parser("start-run", help="submit the run to a running SuperLink and follow it")
    common(start)
    start.add_argument("--superlink", help="HOST:PORT (default: server.superlink_host:superlink_port)")
    start.add_argument("--wait", type=float, default=300.0,
                       help="seconds to wait for the SuperLink to come up")
    start.add_argument("--queue", help="HOST:PORT where the ServerApp and the sites reach the queue service")
    link = sub.add_parser("superlink", help="only Flower's SuperLink, with the config's host, port and TLS")
    common(link)
    link.add_argument("--listen", help="HOST:PORT (default: server.superlink_host:superlink_port)")
    link.add_argument("--health-address", help="gRPC health service address (HOST:PORT)")
    link.add_argument(
        "--queue",
        help="HOST:PORT where the ServerApp and the sites reach the queue service "
        "(default: server.queue_host:queue_port), for the printed `flwr run` line")
    serve = sub.add_parser("serve-queue", help="only the queue service, from the fedcl config")
    common(serve)
    serve.add_argument("--listen", help="HOST:PORT (default: server.queue_host:queue_port)")
    health = sub.add_parser("health", help="health check of a SuperLink (--http) or a gRPC service (--grpc)")
    target = health.add_mutually_exclusive_group(required=True)
    target.add_argument("--http", help="URL, e.g. http://127.0.0.1:8000/health")
    target.add_argument("--grpc", help="HOST:PORT of a gRPC health service")
    health.add_argument("--service", default="", help="gRPC service name ('' = the whole server)")
    health.add_argument("--ca", type=Path, help="CA certificate for TLS")
    health.add_argument("--timeout", type=float, default=3.0)
    sub.add_parser("queue", help="= serve-queue; also takes a [queue_service] file", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "queue":
        from fedcl.server.queue_cli import queue_main

        return queue_main(argv[1:])
    commands = {"run": cmd_run, "start-run": cmd_start_run, "superlink": cmd_superlink,
                "serve-queue": cmd_serve_queue, "health": cmd_health}
    if not argv or argv[0] not in (*commands, "-h", "--help"):
        argv = ["run", *argv]
    args = _parser().parse_args(argv)
    try:
        return commands[args.command](args)
    except ServerCliError as exc:
        print(f"fedcl-server: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
