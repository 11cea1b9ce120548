"""A development certificate authority, the SuperLink's TLS certificate and the hospitals' keys.

``fedsynth certs OUT_DIR --site NAME ...`` writes

* ``ca.crt`` / ``ca.key``: a self-signed CA (ECDSA P-384). Hospitals get ``ca.crt`` to verify the
  coordinator; ``ca.key`` never leaves the coordinator;
* ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for
  ``localhost``, ``127.0.0.1`` and every ``--host`` given;
* ``nodes/<site>.key`` / ``nodes/<site>.pub``: one OpenSSH ECDSA P-384 key pair per hospital, the
  form Flower's node authentication uses. The private key goes to that hospital only; the
  coordinator registers the public key under the site's name.

Production consortia should use certificates from their own PKI; these are for pilots and tests.
Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class CertificateSet:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, tuple[Path, Path]]  # site -> (private, public)


def _write(path: Path, data: bytes, private: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(
    out_dir: Path,
    sites: Sequence[str],
    *,
    hosts: Sequence[str] = (),
    days: int = 365,
    overwrite: bool = False,
) -> CertificateSet:
    """Write a CA, a server certificate for ``hosts`` and one key pair per site into ``out_dir``."""
    out_dir = Path(out_dir)
    bad = [s for s in sites if not SITE_NAME.match(s)]
    if bad:
        raise ValueError(
            f"site names must be 1-64 letters, digits, '.', '_' or '-': {', '.join(bad)}"
        )
    if len(set(sites)) != len(sites):
        raise ValueError("site names must be unique")
    if (out_dir / "ca.key").exists() and not overwrite:
        raise FileExistsError(f"{out_dir / 'ca.key'} exists; pass --overwrite to replace the CA")

    now = dt.datetime.now(dt.UTC)
    valid = (now - dt.timedelta(minutes=5), now + dt.timedelta(days=days))

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsynth development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsynth superlink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    result = CertificateSet(
        ca_cert=_write(out_dir / "ca.crt", ca_cert.public_bytes(pem), private=False),
        ca_key=_write(out_dir / "ca.key", _pem_key(ca_key), private=True),
        server_cert=_write(out_dir / "server.crt", server_cert.public_bytes(pem), private=False),
        server_key=_write(out_dir / "server.key", _pem_key(server_key), private=True),
        node_keys={},
    )
    for site in sites:
        result.node_keys[site] = make_node_key(out_dir / "nodes", site)
    return result


def check_certificates(out_dir: Path, sites: Sequence[str], *, hosts: Sequence[str] = ()) -> None:
    """Check that ``out_dir`` holds what :func:`make_certificates` would make for ``sites`` and
    ``hosts``: the CA, a server certificate it signed that names every host, each site's keys.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: the server certificate does not name a host, or was not signed by the CA.
    """
    out_dir = Path(out_dir)
    needed = [out_dir / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")]
    for site in sites:
        needed += [out_dir / "nodes" / f"{site}.key", out_dir / "nodes" / f"{site}.pub"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")
    ca = x509.load_pem_x509_certificate((out_dir / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out_dir / "server.crt").read_bytes())
    if server.issuer != ca.subject:
        raise ValueError(f"{out_dir / 'server.crt'} was not issued by {out_dir / 'ca.crt'}")
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    known = {str(n) for n in names.get_values_for_type(x509.DNSName)}
    known |= {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    absent = [h for h in hosts if _host_text(h) not in known]
    if absent:
        raise ValueError(
            f"{out_dir / 'server.crt'} does not name {', '.join(absent)} (it names "
            f"{', '.join(sorted(known))}); make new certificates with --overwrite"
        )


def _host_text(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def public_key_der(data: bytes | str) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key in OpenSSH (``.pub``) or PEM form, so that
    one key compares equal whichever way it was written.

    Raises:
        ValueError: not a public key.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    key = (
        serialization.load_pem_public_key(raw)
        if raw.lstrip().startswith(b"-----BEGIN")
        else serialization.load_ssh_public_key(raw.strip())
    )
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_node_key(folder: Path, site: str) -> tuple[Path, Path]:
    """One OpenSSH ECDSA P-384 key pair: ``<folder>/<site>.key`` (0600) and ``<site>.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return (
        _write(Path(folder) / f"{site}.key", private, private=True),
        _write(Path(folder) / f"{site}.pub", public + f" {site}\n".encode(), private=False),
    )
