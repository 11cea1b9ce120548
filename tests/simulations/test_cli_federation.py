"""``fedsynth certs``, ``server``, ``client`` and ``simulate``: refusals a user can act on.

(The commands running for real, as processes, are in ``tests/test_federation_processes.py``.)
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fedsynth.cli.main import app
from fedsynth.client.daemon import ClientOptions, supernode_command
from tests.conftest import SiteMaker

runner = CliRunner()


def test_certs_prints_what_goes_where(tmp_path: Path) -> None:
    result = runner.invoke(app, ["certs", str(tmp_path / "c"), "--site", "a", "--site", "b"])
    assert result.exit_code == 0, result.output
    assert "--site a=" in result.output and "fedsynth client" in result.output
    assert (tmp_path / "c" / "nodes" / "b.key").exists()
    again = runner.invoke(app, ["certs", str(tmp_path / "c"), "--site", "a"])
    assert again.exit_code == 1 and "--overwrite" in again.output


def test_server_needs_certificates_unless_told_insecure(tmp_path: Path) -> None:
    result = runner.invoke(app, ["server", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "--certs is required" in result.output
    resumed = runner.invoke(
        app, ["server", "--run-dir", str(tmp_path / "nothing"), "--insecure", "--resume"]
    )
    assert resumed.exit_code == 1 and "not a fedsynth run folder" in resumed.output
    assert "INSECURE" in resumed.output


def test_client_refuses_a_missing_folder_or_missing_keys(
    tmp_path: Path, make_site: SiteMaker
) -> None:
    missing = runner.invoke(
        app, ["client", "--data-dir", str(tmp_path / "absent"), "--superlink", "h:9092"]
    )
    assert missing.exit_code == 1 and "absent: not a folder" in missing.output
    site = make_site("site", {"sub-01": ["T1w", "T2w"]})
    no_keys = runner.invoke(app, ["client", "--data-dir", str(site), "--superlink", "h:9092"])
    assert no_keys.exit_code == 1 and "--ca" in no_keys.output and "--key" in no_keys.output


def test_supernode_command_carries_only_site_settings(tmp_path: Path, make_site: SiteMaker) -> None:
    site = make_site("site", {"sub-01": ["T1w", "T2w"]})
    ca, key = tmp_path / "ca.crt", tmp_path / "a.key"
    ca.write_text("x")
    key.write_text("y")
    command, env = supernode_command(
        ClientOptions(
            data_dir=site,
            superlink="fl.example.org:9092",
            state_dir=tmp_path / "state",
            device="cuda:1",
            root_certificates=ca,
            private_key=key,
            max_epsilon=3.5,
        )
    )
    assert command[command.index("--superlink") + 1] == "fl.example.org:9092"
    assert command[command.index("--root-certificates") + 1] == str(ca.resolve())
    assert command[command.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert "--insecure" not in command
    node_config = command[command.index("--node-config") + 1]
    assert f'data-dir="{site.resolve()}"' in node_config and 'device="cuda:1"' in node_config
    assert "max-epsilon=3.5" in node_config
    assert env["FLWR_HOME"] == str(tmp_path / "state" / "flwr")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_simulate_needs_enough_sites(tmp_path: Path, make_site: SiteMaker) -> None:
    site = make_site("site", {"sub-01": ["T1w", "T2w"]})
    result = runner.invoke(
        app,
        [
            "simulate",
            "--site",
            str(site),
            "--run-dir",
            str(tmp_path / "r"),
            "--preset",
            "cpu-small",
        ],
    )
    assert result.exit_code == 1 and "federation.min_sites is 2" in result.output
