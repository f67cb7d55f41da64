"""Create a consortium's credentials: a CA, server certificates, per-site client certificates and tokens.

    python deploy/make_certs.py --out certs --server-name coordinator.example.org \
        --server-ip 127.0.0.1 --site site-a --site site-b

Writes (private keys 0600):
    ca.pem, ca.key                        the consortium CA (keep ca.key offline)
    server.pem, server.key                SuperLink and queue service certificate (SAN = names/IPs)
    sites/<id>.pem, sites/<id>.key        per-site client certificate (CN = site id) for mutual TLS
    sites/<id>.node-key, .node-key.pub    per-site SuperNode key pair (EC P-384, OpenSSH format) for
                                          Flower's SuperNode authentication (server.supernode_auth):
                                          the site keeps the private key (fedcl-client --node-key), the
                                          coordinator lists the public key in [server.supernode_keys]
    tokens.toml                           the coordinator token, per-site bearer tokens and the sites'
                                          public node keys as lines of the coordinator config's [server]
                                          table (coordinator_token, site_tokens.<id>, supernode_keys.<id>):
                                          paste it over deploy/consortium.toml's credentials lines
    sites/<id>.token                      each site's own token, to hand to that site only
Re-running adds missing sites and keeps existing keys; --force regenerates everything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def node_key_pair() -> tuple[bytes, bytes]:
    """A SuperNode key pair as Flower reads it: (OpenSSH private key, OpenSSH public key line).

    flower-supernode --auth-supernode-private-key loads the private key; `flwr supernode register`
    takes the public key (any NIST EC curve; Flower's guide uses P-384)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcl consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def make_ca(*, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    name = _name("fedcl consortium CA")
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(*, ca_key, ca_cert: x509.Certificate, common_name: str, dns: list[str], ips: list[str],
          server: bool, days: int = 825) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    b = (_builder(_name(common_name), ca_cert.subject, key.public_key(), days)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def server_lines(coordinator: str, tokens: dict[str, str], node_keys: dict[str, Path]) -> str:
    """tokens.toml: lines of the coordinator config's [server] table, pasted as they are (dotted keys,
    so they sit among [server]'s own keys; as a file of its own it reads as coordinator_token,
    site_tokens and supernode_keys)."""
    lines = [
        "# generated by deploy/make_certs.py: the credentials lines of the coordinator config's [server]",
        "# table. Paste this file over those lines (deploy/consortium.toml marks them). The supernode_keys",
        "# lines are for server.supernode_auth = true (paths as given to --out); delete them without it.",
        f"coordinator_token = {json.dumps(coordinator)}"]
    lines += [f"site_tokens.{site} = {json.dumps(tok)}" for site, tok in sorted(tokens.items())]
    lines += [
        f"supernode_keys.{site} = {json.dumps(str(path))}"
        for site, path in node_keys.items()
        if site in tokens]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--server-name", action="append", default=[],
                   help="DNS name of the coordinator (repeatable)")
    p.add_argument("--server-ip", action="append", default=[],
                   help="IP address of the coordinator (repeatable)")
    p.add_argument("--site", action="append", default=[], help="site id (repeatable)")
    p.add_argument("--force", action="store_true", help="regenerate the CA and every key")
    args = p.parse_args(argv)
    for s in args.site:
        if not s.replace("-", "").replace("_", "").isalnum():
            print(f"error: site id {s!r} may only contain letters, digits, '-' and '_'", file=sys.stderr)
            return 2
    try:
        for ip in args.server_ip:
            ipaddress.ip_address(ip)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.server_name and not args.server_ip:
        args.server_name, args.server_ip = ["localhost"], ["127.0.0.1"]
    out: Path = args.out
    ca_pem, ca_key_path = out / "ca.pem", out / "ca.key"
    if args.force or not ca_pem.exists():
        ca_key, ca_cert = make_ca()
        _write(ca_key_path, _pem_key(ca_key), private=True)
        _write(ca_pem, _pem(ca_cert))
        args.force = True  # a new CA invalidates every certificate it did not sign
    else:
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
    if args.force or not (out / "server.pem").exists():
        key, cert = issue(ca_key=ca_key, ca_cert=ca_cert, common_name=(args.server_name or args.server_ip)[0],
                          dns=args.server_name, ips=args.server_ip, server=True)
        _write(out / "server.key", _pem_key(key), private=True)
        _write(out / "server.pem", _pem(cert))
    tokens_path = out / "tokens.toml"
    tokens: dict[str, str] = {}
    coordinator = secrets.token_urlsafe(32)
    if tokens_path.exists() and not args.force:
        import tomllib

        old = tomllib.loads(tokens_path.read_text())
        tokens = dict(old.get("site_tokens", {}))
        coordinator = old.get("coordinator_token", coordinator)
    for site in args.site:
        if args.force or not (out / "sites" / f"{site}.pem").exists():
            key, cert = issue(ca_key=ca_key, ca_cert=ca_cert, common_name=site, dns=[], ips=[], server=False)
            _write(out / "sites" / f"{site}.key", _pem_key(key), private=True)
            _write(out / "sites" / f"{site}.pem", _pem(cert))
        if args.force or not (out / "sites" / f"{site}.node-key").exists():
            private, public = node_key_pair()
            _write(out / "sites" / f"{site}.node-key", private, private=True)
            _write(out / "sites" / f"{site}.node-key.pub", public)
        if args.force or site not in tokens:
            tokens[site] = secrets.token_urlsafe(32)
        _write(out / "sites" / f"{site}.token", tokens[site].encode() + b"\n", private=True)
    node_keys = {
        p.name.removesuffix(".node-key.pub"): p for p in sorted((out / "sites").glob("*.node-key.pub"))}
    _write(tokens_path, server_lines(coordinator, tokens, node_keys).encode(), private=True)
    print(f"wrote CA, server certificate and {len(args.site)} site credential(s) "
          f"(certificate, token, SuperNode key pair) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
