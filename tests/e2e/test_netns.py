"""A consortium on separate network hosts (Linux network namespaces joined by a bridge), TLS on:

    10.77.0.1  coordinator   fedcl-server run (queue service, SuperLink with SuperNode
                             authentication, ServerApp)
    10.77.0.2  site-a        fedcl-client --server 10.77.0.1 ...
    10.77.0.3  site-b        fedcl-client --server 10.77.0.1 ...
    10.77.0.4  intruders     site-x (registered SuperNode key, wrong queue token: stopped by its
                             pre-flight), site-r (revoked), site-u (SuperNode key never registered),
                             site-c (another CA's certificate)

One federation of 4 rounds carries every drill, so the file stays within a few minutes on 2 cores:
round 1 runs with both sites while the intruders are refused; in round 2 site-b's cable is pulled
after it took the round's message (the round ends without it once Flower's heartbeat for the node
expires, 2 x 30 s, before federation.round_timeout) and put back once the round is over, so site-b
rejoins in round 3; after round 3 the coordinator is killed
(SIGKILL: fedcl-server, its SuperLink, queue service and ServerApp) and started again, and the run
resumes at round 4 with the sites' privacy ledgers and the coordinator's audit log intact.

The module fixture runs the scenario once and keeps what it saw; each test checks one claim. Skips
where network namespaces cannot be made (not root, no iproute2, `ip netns add` refused).
"""

from __future__ import annotations

import atexit
import json
import re
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .helpers import REPO, Processes, checkpoint_round, process_env, read_history, tiny_config_text
from .netns import NetnsUnavailable, Network, check_available, sweep_stale

# Measured on this project's 2-core machine: 3 min 50 s at load average 2-3, 6-8.5 min while other
# jobs kept it at 10-15 (each Flower message starts a fresh ClientApp process; contention slows that
# down most). The timeout is a backstop for a hung drill, far above a loaded CI machine's time.
pytestmark = pytest.mark.timeout(3600)

HOSTS = {"coord": "10.77.0.1", "a": "10.77.0.2", "b": "10.77.0.3", "x": "10.77.0.4"}
COORD = HOSTS["coord"]
SUPERLINK_PORT = 8000
QUEUE_PORT = 50051
UNANSWERED_PORT = 50999  # nothing listens there on the coordinator
NUM_ROUNDS = 4
CUT_ROUND = 2  # site-b's cable is out during this round
KILL_AFTER = 3  # the coordinator is SIGKILLed once this round's checkpoint is written
GOOD = ("site-a", "site-b")
WRONG_TOKEN = "this-is-not-site-x-s-queue-token-0000"


HEARTBEAT_EXPIRY = 60  # s: Flower drops a SuperNode that missed its heartbeats for 2 x 30 s
# federation.round_timeout: a backstop only. Every round ends on an event: the sites' replies, or for
# the unplugged site-b Flower's "Node Unavailable" once its heartbeat expires (HEARTBEAT_EXPIRY). The
# timeout must be longer than that expiry (a shorter one leaves site-b "online", its SuperNode busy with
# the stale round, and it missed round 3 too), and long enough that a site training on a loaded machine
# is never cut: a timeout derived from an import-time calibration (70 s) cut every site of round 3 at
# load average 8-13.
ROUND_TIMEOUT = 900


def _make_certs(out: Path, *sites: str) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "deploy" / "make_certs.py"), "--out", str(out), "--server-ip", COORD,
         "--server-name", "coordinator.fedcl.test", *[a for s in sites for a in ("--site", s)]],
        check=True, capture_output=True,
    )


def _audit(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else [])


def _count(processes: Processes, name: str, pattern: str) -> int:
    return len(re.findall(pattern, processes.log(name, tail=1_000_000)))


QUEUE_PROBE = """
import json, sys, grpc
from fedcl.wire.proto import queue_pb2, queue_pb2_grpc
address, ca, site, token = sys.argv[1:5]
channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(open(ca, "rb").read()))
try:
    queue_pb2_grpc.EmbeddingQueueStub(channel).Stats(
        queue_pb2.StatsRequest(), timeout=20,
        metadata=(("x-fedcl-site", site), ("authorization", "Bearer " + token)))
    print(json.dumps({"code": "OK", "details": ""}))
except grpc.RpcError as err:
    print(json.dumps({"code": err.code().name, "details": err.details()}))
"""


@dataclass
class Drill:
    """What the scenario saw, for the tests to check."""

    root: Path
    out_dir: Path
    audit_log: Path
    processes: Processes
    server_codes: list[int] = field(default_factory=list)  # fedcl-server's exit status, first and restarted
    history: list[dict] = field(default_factory=list)
    history_at_kill: list[dict] = field(default_factory=list)
    audit_at_kill: str = ""
    ledgers_at_kill: dict[str, dict] = field(default_factory=dict)
    ledgers_final: dict[str, dict] = field(default_factory=dict)
    revoked_probe: dict = field(default_factory=dict)
    wrong_ca_exit: int | None = None
    wrong_token_exit: int | None = None
    cut_seconds: float = 0.0  # how long site-b's cable was out
    round_timeout: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def log(self, name: str) -> str:
        return self.processes.log(name, tail=1_000_000)


def _ledgers(root: Path) -> dict[str, dict]:
    found = {}
    for site in GOOD:
        path = root / "sites" / site / f"ledger-{site}.json"
        if path.exists():
            found[site] = json.loads(path.read_text())
    return found


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    try:
        check_available()
    except NetnsUnavailable as exc:
        pytest.skip(f"multi-host drill needs network namespaces: {exc}")
    sweep_stale()
    net = Network.create(HOSTS)
    atexit.register(net.destroy)  # pytest killed between here and the finally below
    root = tmp_path_factory.mktemp("netns")
    (root / "logs").mkdir()
    processes = Processes(root / "logs")
    t0 = time.time()
    try:
        yield _run_scenario(net, root, processes)
    finally:
        processes.stop_all()
        net.destroy()
        atexit.unregister(net.destroy)
        print(f"netns drill: {time.time() - t0:.0f} s including teardown")


def _run_scenario(net: Network, root: Path, processes: Processes) -> Drill:
    t_start = time.time()
    certs, rogue = root / "certs", root / "rogue"
    _make_certs(certs, *GOOD, "site-x", "site-r")
    _make_certs(rogue, "site-u")  # another CA, and a SuperNode key the coordinator never saw
    round_timeout = ROUND_TIMEOUT
    issued = tomllib.loads((certs / "tokens.toml").read_text())
    out_dir = root / "run"
    audit_log = out_dir / "audit.jsonl"
    keys = ", ".join(f'"{s}" = "{p}"' for s, p in issued["supernode_keys"].items())
    cfg = root / "consortium.toml"
    cfg.write_text(tiny_config_text(
        out_dir=out_dir, superlink_port=SUPERLINK_PORT, queue_port=QUEUE_PORT, num_rounds=NUM_ROUNDS,
        # a and b, every round: a round waits until both are connected, so site-b is back in the
        # round after its cable is (the wrong-token site is refused at its pre-flight and never joins)
        min_nodes=2,
        tokens=issued["site_tokens"], coordinator_token=issued["coordinator_token"], certs=certs,
        extra=f"round_timeout = {round_timeout}\nfraction_evaluate = 0.0",
        train_extra="in_batch_negatives = false",
        # one message per site and round (no release phase): the drills are about the network
        queue_extra="fresh_push = false\nmax_staleness = 1",
        privacy='dpsgd = true\nrelease = "gaussian"\nrelease_noise_multiplier = 2.0\nepsilon_budget = 1000.0',
        server_extra=(f'superlink_host = "{COORD}"\nqueue_host = "{COORD}"\naudit_log = "{audit_log}"\n'
                      f'revoked_sites = ["site-r"]\nsupernode_auth = true\nsupernode_keys = {{ {keys} }}'),
    ))
    seconds = {"setup": time.time() - t_start}

    def start_server(name: str) -> None:
        env = process_env(root / "home" / "coord")
        processes.start(
            name,
            net.exec_argv("coord", [sys.executable, "-m", "fedcl.server.cli", "run", "--config", str(cfg)]),
            env=env,
            cwd=REPO,
        )

    def start_site(host: str, site: str, *, token_file: Path, ca: Path, node_key: Path | None,
                   runtime_port: int = 9094, extra: tuple[str, ...] = ()) -> None:
        # each site's own images: 200 synthetic ones, drawn from a seed of its own
        argv = [sys.executable, "-m", "fedcl.client.cli", "--server", f"{COORD}:{SUPERLINK_PORT}",
                "--data-format", "synthetic", "--max-images", "200", "--site-id", site, "--token-file",
                str(token_file), "--root-certificates", str(ca), "--state-dir", str(root / "sites" / site),
                "--runtime-address", f"127.0.0.1:{runtime_port}", *extra]
        if node_key is not None:
            argv += ["--node-key", str(node_key)]
        processes.start(site, net.exec_argv(host, argv), env=process_env(root / "home" / site), cwd=REPO)

    start_server("server")
    server = processes.procs["server"]
    for host, site in (("a", "site-a"), ("b", "site-b")):
        start_site(host, site, token_file=certs / "sites" / f"{site}.token", ca=certs / "ca.pem",
                   node_key=certs / "sites" / f"{site}.node-key")
    # the revoked and the unregistered site get past the queue-token pre-flight (no queue service
    # answers at the address they are given, so the token is "not checked"): the SuperLink must refuse them
    no_queue = ("--queue-address", f"{COORD}:{UNANSWERED_PORT}")
    start_site("x", "site-r", token_file=certs / "sites" / "site-r.token", ca=certs / "ca.pem",
               node_key=certs / "sites" / "site-r.node-key", runtime_port=9095,
               extra=("--no-rejoin", *no_queue))
    start_site("x", "site-u", token_file=certs / "sites" / "site-r.token", ca=certs / "ca.pem",
               node_key=rogue / "sites" / "site-u.node-key", runtime_port=9096,
               extra=("--no-rejoin", *no_queue))
    start_site("x", "site-c", token_file=certs / "sites" / "site-r.token", ca=rogue / "ca.pem",
               node_key=None, runtime_port=9097)
    drill = Drill(root=root, out_dir=out_dir, audit_log=audit_log, processes=processes,
                  round_timeout=round_timeout, seconds=seconds)
    alive = ["server", "site-a", "site-b"]

    # the revoked site's own credentials, straight at the queue service from its host
    processes.wait_for(
        "the queue service", lambda: net.reachable("x", "coord", QUEUE_PORT, timeout=2), timeout=300,
        alive=alive)
    drill.seconds["queue service up"] = time.time() - t_start
    # a site with a wrong queue token, started once the queue service answers: its pre-flight refuses it
    bad_token = root / "site-x.wrong-token"
    bad_token.write_text(WRONG_TOKEN + "\n")
    start_site("x", "site-x", token_file=bad_token, ca=certs / "ca.pem",
               node_key=certs / "sites" / "site-x.node-key", runtime_port=9094)
    wrong_token = processes.procs["site-x"]
    processes.wait_for(
        "the wrong-token site to stop at its pre-flight", lambda: wrong_token.poll() is not None, timeout=300,
        alive=alive)
    drill.wrong_token_exit = wrong_token.returncode
    probe = net.run(
        "x",
        [sys.executable, "-c", QUEUE_PROBE, f"{COORD}:{QUEUE_PORT}", str(certs / "ca.pem"), "site-r",
         (certs / "sites" / "site-r.token").read_text().strip()],
        cwd=REPO,
    )
    assert probe.returncode == 0, probe.stderr
    drill.revoked_probe = json.loads(probe.stdout)
    wrong_ca = processes.procs["site-c"]
    processes.wait_for("the wrong-CA site to give up", lambda: wrong_ca.poll() is not None, timeout=300)
    drill.wrong_ca_exit = wrong_ca.returncode

    # round 2: once site-b has taken the round's message, pull its cable; put it back after the round
    processes.wait_for("round 1", lambda: len(read_history(out_dir)) >= 1, timeout=600, alive=alive)
    drill.seconds["round 1 done"] = time.time() - t_start
    processes.wait_for(f"site-b to receive the round-{CUT_ROUND} message",
                       lambda: _count(processes, "site-b", r"Receiving: train message") >= CUT_ROUND,
                       timeout=400, interval=0.2, alive=alive)
    net.cut("b")
    t_cut = time.time()
    processes.wait_for(
        f"round {CUT_ROUND} to end without site-b", lambda: len(read_history(out_dir)) >= CUT_ROUND,
        timeout=round_timeout + 180, alive=["server", "site-a"])
    net.restore("b")
    drill.cut_seconds = time.time() - t_cut
    drill.seconds["cut round done"] = time.time() - t_start

    # after round KILL_AFTER: SIGKILL the whole coordinator, then start it again
    processes.wait_for(f"the round-{KILL_AFTER} checkpoint", lambda: checkpoint_round(out_dir) >= KILL_AFTER,
                       timeout=600, interval=0.2, alive=alive)
    processes.kill("server")
    drill.server_codes.append(server.returncode)
    drill.seconds["killed"] = time.time() - t_start
    drill.history_at_kill = read_history(out_dir)
    drill.audit_at_kill = audit_log.read_text()
    drill.ledgers_at_kill = _ledgers(root)
    start_server("server-restarted")
    restarted = processes.procs["server-restarted"]
    processes.wait_for("the resumed run to end", lambda: restarted.poll() is not None, timeout=600,
                       alive=["site-a", "site-b"])
    drill.server_codes.append(restarted.returncode)
    drill.seconds["run done"] = time.time() - t_start
    drill.history = read_history(out_dir)
    drill.ledgers_final = _ledgers(root)
    print(f"netns drill timings (s): {drill.seconds}; round_timeout {round_timeout} s; "
          f"cable out {drill.cut_seconds:.0f} s")
    return drill


# ----------------------------------------------------------------------------------- the claims


def test_full_run_over_tls_between_hosts(drill):
    """Four rounds between three hosts over TLS: the coordinator's certificate (IP SAN 10.77.0.1)
    verified by every good site; both sites in the final round; the run reports completed."""
    assert drill.server_codes[-1] == 0, drill.processes.logs()
    history = drill.history
    assert [r["round"] for r in history] == list(range(1, NUM_ROUNDS + 1))
    assert set(history[0]["sites"]) >= set(GOOD) and set(history[-1]["sites"]) >= set(GOOD)
    assert "finished:completed" in drill.log("server-restarted")
    for site in GOOD:
        assert f"site {site} joining {COORD}:{SUPERLINK_PORT} (TLS)" in drill.log(site)
    # the queue service saw each site from its own host's address, never from anywhere else
    connects = [e for e in _audit(drill.audit_log) if e["event"] == "connect" and e.get("site") in GOOD]
    assert {(e["site"], e["peer"].split(":")[1]) for e in connects} == {
        ("site-a", HOSTS["a"]), ("site-b", HOSTS["b"])}


def test_wrong_ca_site_is_refused_with_a_clear_error(drill):
    assert drill.wrong_ca_exit == 2
    log = drill.log("site-c")
    assert (
        "fedcl-client: error: check CA: the server at 10.77.0.1:8000 presented a certificate that" in log
    ), log
    assert "rogue/ca.pem does not verify" in log
    assert "Starting Flower SuperNode" not in log  # it never got as far as Flower


def test_wrong_queue_token_is_refused_and_the_run_goes_on(drill):
    audit = _audit(drill.audit_log)
    # from the intruders' host, credentials that name no site (the revoked site's probe names its site)
    refused = [e for e in audit if e["event"] == "rejection" and "site" not in e
               and e.get("peer", "").startswith(f"ipv4:{HOSTS['x']}:")]
    assert refused and {e["code"] for e in refused} == {"UNAUTHENTICATED"}, refused
    assert all("unknown token" in e["reason"] for e in refused)
    # site-x stopped at its pre-flight, one line naming the check and the fix, before joining Flower
    assert drill.wrong_token_exit == 2
    log = drill.log("site-x")
    assert "fedcl-client: error: check queue token: the queue service at" in log, log
    assert "refused site 'site-x'" in log and "--token-file" in log
    assert "Starting Flower SuperNode" not in log
    for record in drill.history:  # and the run went on without it
        assert "site-x" not in record["sites"]
    assert all(r["sites_ok"] >= 1 for r in drill.history)


def test_revoked_site_is_refused_by_the_queue_and_the_superlink(drill):
    assert drill.revoked_probe["code"] == "PERMISSION_DENIED", drill.revoked_probe
    assert "revoked" in drill.revoked_probe["details"]
    audit = _audit(drill.audit_log)
    denied = [e for e in audit if e["event"] == "rejection" and e.get("site") == "site-r"]
    assert denied and all(e["code"] == "PERMISSION_DENIED" and "revoked" in e["reason"] for e in denied)
    start = next(e for e in audit if e["event"] == "start")
    assert start["revoked_sites"] == ["site-r"]
    # its SuperNode key was not registered: Flower refuses the node, which exits (--no-rejoin)
    assert "revoked sites" in drill.log("server") and "site-r" not in _registered(drill.log("server"))
    assert drill.processes.procs["site-r"].poll() is not None
    log = drill.log("site-r")
    assert "Failed to activate SuperNode" in log and "SuperNode ID" not in log, log
    assert "fedcl-client: the SuperLink does not know this SuperNode's key (yet)" in log
    assert all("site-r" not in r["sites"] for r in drill.history)


def test_unregistered_supernode_is_refused(drill):
    assert "site-u" not in _registered(drill.log("server"))
    assert drill.processes.procs["site-u"].poll() is not None
    log = drill.log("site-u")
    assert "Failed to activate SuperNode" in log and "SuperNode ID" not in log, log
    assert "fedcl-client: the SuperLink does not know this SuperNode's key (yet)" in log


def _registered(server_log: str) -> str:
    return "\n".join(line for line in server_log.splitlines() if "registered:" in line)


def test_cut_link_round_finishes_without_the_site_which_rejoins_later(drill):
    cut = drill.history[CUT_ROUND - 1]
    assert "site-a" in cut["sites"] and "site-b" not in cut["sites"], cut["errors"]
    # Flower drops the silent node when its heartbeat expires ("Node Unavailable"), before the timeout
    assert any("no reply within" in e or "Node Unavailable" in e for e in cut["errors"]), cut["errors"]
    # back in the very next round, before (and so without the help of) the coordinator's restart
    assert "site-b" in drill.history[CUT_ROUND]["sites"], drill.history[CUT_ROUND]["errors"]
    assert cut["weights_sha256"] != drill.history[CUT_ROUND]["weights_sha256"]  # site-a's update went in


def test_coordinator_killed_resumes_with_ledgers_and_audit_log_intact(drill):
    assert drill.server_codes[0] == -signal.SIGKILL
    before = drill.history_at_kill
    assert [r["round"] for r in before] == list(range(1, KILL_AFTER + 1))
    assert drill.history[:KILL_AFTER] == before  # rounds 1..k not run again
    summary = json.loads((drill.out_dir / "summary.json").read_text())
    assert summary["resumed_from"] == KILL_AFTER
    # the audit log was appended to, never rewritten, and still holds every earlier round's epsilon
    audit_text = drill.audit_log.read_text()
    assert audit_text.startswith(drill.audit_at_kill)
    audit = _audit(drill.audit_log)
    eps = {(e["site"], e["round"]): e["epsilon"] for e in audit if e["event"] == "round_epsilon"}
    for r in drill.history:
        for site in GOOD:
            if site in r["sites"]:
                assert eps[(site, r["round"])] == pytest.approx(r["sites"][site]["epsilon"])
                assert 0 < eps[(site, r["round"])] < 1000
    # each site's ledger: the events before the kill are still there, in order; epsilon only grows
    for site in GOOD:
        old, new = drill.ledgers_at_kill[site], drill.ledgers_final[site]
        assert new["events"][: len(old["events"])] == old["events"]
        assert len(new["events"]) > len(old["events"])
        assert new["epsilon"] >= old["epsilon"] > 0
        assert max(e["round"] for e in new["events"]) == NUM_ROUNDS
    # and the sites reconnected to the new SuperLink by themselves
    for site in GOOD:
        assert "rejoining" in drill.log(site)
