import ssl
import subprocess
import sys
from pathlib import Path

from cryptography import x509

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), *args],
                          capture_output=True, text=True)


def test_creates_a_verifiable_chain_and_private_keys(tmp_path):
    r = _run("--out", str(tmp_path), "--server-ip", "127.0.0.1", "--server-name", "localhost",
             "--site", "site-a", "--site", "site-b")
    assert r.returncode == 0, r.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    for leaf in ["server.pem", "sites/site-a.pem", "sites/site-b.pem"]:
        cert = x509.load_pem_x509_certificate((tmp_path / leaf).read_bytes())
        cert.verify_directly_issued_by(ca)
    site = x509.load_pem_x509_certificate((tmp_path / "sites/site-a.pem").read_bytes())
    assert site.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "site-a"
    for key in ["ca.key", "server.key", "sites/site-a.key", "tokens.toml", "sites/site-a.token"]:
        assert (tmp_path / key).stat().st_mode & 0o077 == 0, key
    # a TLS context accepts the server pair
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")


def test_rerun_adds_a_site_and_keeps_existing_tokens(tmp_path):
    assert _run("--out", str(tmp_path), "--site", "a").returncode == 0
    tok_a = (tmp_path / "sites/a.token").read_text()
    ca = (tmp_path / "ca.pem").read_bytes()
    assert _run("--out", str(tmp_path), "--site", "a", "--site", "b").returncode == 0
    assert (tmp_path / "sites/a.token").read_text() == tok_a and (tmp_path / "ca.pem").read_bytes() == ca
    assert (tmp_path / "sites/b.token").exists()
    assert tok_a.strip() != (tmp_path / "sites/b.token").read_text().strip()


def test_bad_site_id_and_ip_are_refused(tmp_path):
    r = _run("--out", str(tmp_path), "--site", "a/../b")
    assert r.returncode == 2 and "site id" in r.stderr
    r = _run("--out", str(tmp_path), "--server-ip", "999.1.1.1")
    assert r.returncode == 2 and "999.1.1.1" in r.stderr


def test_supernode_key_pairs_are_what_flower_loads(tmp_path):
    """Per-site EC key pairs for Flower's SuperNode authentication: the private key in the OpenSSH
    format flower-supernode --auth-supernode-private-key reads, the public key in the SSH format
    `flwr supernode register` takes (NIST curve), listed in tokens.toml; kept on a re-run."""
    import tomllib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key

    assert _run("--out", str(tmp_path), "--site", "site-a", "--site", "site-b").returncode == 0
    pairs = {}
    for site in ("site-a", "site-b"):
        private_path, public_path = (tmp_path / f"sites/{site}.node-key",
                                     tmp_path / f"sites/{site}.node-key.pub")
        assert private_path.stat().st_mode & 0o077 == 0
        private = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        assert public.public_numbers() == private.public_key().public_numbers()
        assert try_load_public_key(public_path)  # Flower's own check before it registers a node
        pairs[site] = public_path.read_bytes()
    assert pairs["site-a"] != pairs["site-b"]
    listed = tomllib.loads((tmp_path / "tokens.toml").read_text())["supernode_keys"]  # dotted keys: one table
    assert listed == {site: str(tmp_path / f"sites/{site}.node-key.pub") for site in ("site-a", "site-b")}
    assert _run("--out", str(tmp_path), "--site", "site-a", "--site", "site-c").returncode == 0
    assert (tmp_path / "sites/site-a.node-key.pub").read_bytes() == pairs["site-a"]
    keys = tomllib.loads((tmp_path / "tokens.toml").read_text())["supernode_keys"]
    assert set(keys) == {"site-a", "site-b", "site-c"}


def test_tokens_toml_pasted_into_the_template_is_a_valid_coordinator_config(tmp_path):
    """tokens.toml is the [server] table's credentials lines: pasted over the template's, the config
    loads with the generated tokens and keys (pasted literally it used to give "site_tokens: unknown key")."""
    import re
    import tomllib

    from fedcl.config import load_config

    r = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out", "certs", "--site", "hospital-a",
         "--site", "hospital-b"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    pasted = (tmp_path / "certs" / "tokens.toml").read_text()
    template = (ROOT / "deploy" / "consortium.toml").read_text()
    block = re.compile(r"^# ---- credentials.*?^# ---- end of credentials ----\n", re.M | re.S)
    assert len(block.findall(template)) == 1, "deploy/consortium.toml marks its credentials lines once"
    config = tmp_path / "consortium.toml"
    config.write_text(block.sub(lambda _: pasted, template))
    cfg = load_config(config)
    issued = tomllib.loads(pasted)
    assert cfg.server.coordinator_token == issued["coordinator_token"]
    assert cfg.server.site_tokens == {
        site: (tmp_path / "certs" / "sites" / f"{site}.token").read_text().strip()
        for site in ("hospital-a", "hospital-b")}
    assert {site: str(path) for site, path in cfg.server.supernode_keys.items()} == {
        site: f"certs/sites/{site}.node-key.pub" for site in ("hospital-a", "hospital-b")}
