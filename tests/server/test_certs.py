"""``fedsynth certs``: a CA that signs a server certificate, and node keys Flower can load."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedsynth.server.certs import make_certificates


def test_certificates_chain_and_keys(tmp_path: Path) -> None:
    made = make_certificates(tmp_path, ["site-a", "site-b"], hosts=["coordinator.example.org"])
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "coordinator.example.org" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for private, public in made.node_keys.values():
        key = load_ssh_private_key(private.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        pub = load_ssh_public_key(public.read_bytes())
        assert pub.public_numbers() == key.public_key().public_numbers()
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.ca_key.stat().st_mode) == 0o600


def test_refuses_to_overwrite_a_ca_or_take_odd_names(tmp_path: Path) -> None:
    make_certificates(tmp_path, ["site-a"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_certificates(tmp_path, ["site-a"])
    with pytest.raises(ValueError, match="site names"):
        make_certificates(tmp_path / "x", ["../evil"])


def test_a_hospital_makes_its_own_key_pair_and_keeps_the_private_half(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from typer.testing import CliRunner

    from fedsynth.cli.main import app

    result = CliRunner().invoke(app, ["keygen", str(tmp_path), "--site", "hospital-a"])
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "hospital-a.key", tmp_path / "hospital-a.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    key = load_ssh_private_key(private.read_bytes(), password=None)
    openssh = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
    assert public.read_bytes().startswith(openssh)  # the .pub is the private key's own half
    again = CliRunner().invoke(app, ["keygen", str(tmp_path), "--site", "hospital-a"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    kept = load_ssh_private_key(private.read_bytes(), password=None)
    assert kept.public_key() == key.public_key()  # refused: the registered key is unchanged


def test_a_coordinator_without_hospital_keys_refuses_to_start(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedsynth.cli.main import app

    runner = CliRunner()
    made = runner.invoke(app, ["certs", str(tmp_path / "certs"), "--host", "fl.example.org"])
    assert made.exit_code == 0 and "fedsynth keygen" in made.output
    assert not (tmp_path / "certs" / "nodes").exists()
    started = runner.invoke(
        app, ["server", "--run-dir", str(tmp_path / "run"), "--certs", str(tmp_path / "certs")]
    )
    assert started.exit_code == 1 and "no hospital to admit" in started.output
    assert not (tmp_path / "run").exists()  # refused before anything was started or written


def test_exist_ok_keeps_a_complete_set_and_refuses_an_incomplete_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedsynth.cli.main import app

    runner = CliRunner()
    certs = tmp_path / "certs"
    first = runner.invoke(app, ["certs", str(certs), "--site", "a", "--host", "coordinator"])
    assert first.exit_code == 0, first.output
    before = {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    again = runner.invoke(
        app, ["certs", str(certs), "--site", "a", "--host", "coordinator", "--exist-ok"]
    )
    assert again.exit_code == 0 and "kept" in again.output
    assert {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()} == before
    more = runner.invoke(app, ["certs", str(certs), "--site", "b", "--exist-ok"])
    assert more.exit_code == 1 and "nodes/b.key" in more.output
    other = runner.invoke(app, ["certs", str(certs), "--host", "fl.example.org", "--exist-ok"])
    assert other.exit_code == 1 and "does not name fl.example.org" in other.output
    assert {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()} == before
