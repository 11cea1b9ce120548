"""Real Flower processes on loopback: simulation engine, a TLS + node-auth deployment, faults.

Every test starts its own SuperLink (on a free port, with a run-local FLWR_HOME) and stops every
process it started, also when it fails. Rounds are tiny (32x32 slices, one local epoch); most of a
round's time is Flower starting a fresh ClientApp process per message.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_ssh_private_key,
)
from opacus.accountants.analysis import rdp as rdp_analysis
from safetensors.numpy import load_file

from fedsynth.common import PRIVATE_ENV
from fedsynth.common.flower_processes import flwr, free_port, register_node, write_connection
from fedsynth.common.privacy.accounting import RDP_ORDERS
from fedsynth.server.certs import CertificateSet, make_certificates, make_node_key
from fedsynth.server.round_store import latest_round, round_dir
from fedsynth.server.status import read_status
from fedsynth.simulations.engines.flower import simulate
from fedsynth.simulations.engines.inprocess import TINY, phantom_sites, tiny_config
from tests.conftest import training_examples, training_patients
from tests.intake import write_bad_site
from tests.local_compose import LocalCompose

pytestmark = pytest.mark.slow

FEDSYNTH = str(Path(sys.executable).parent / "fedsynth")
# Written here, not imported: the audit must not trust the code it audits.
ALLOWED_TRAIN_METRICS = {
    "num-examples", "steps", "seconds", "samples-per-s", "lr", "loss_g", "loss_gan",
    "loss_cycle", "loss_d_a", "loss_d_b", "loss_identity", "loss_proximal", "epsilon", "delta",
}  # fmt: skip
# Patient-level DP (the default), one patient per expected batch: the sites' 1-3 patients give
# unequal sample rates.
DP = (
    "privacy.enabled=true",
    "privacy.noise_multiplier=1.0",
    'privacy.accountant="rdp"',
    "privacy.batch_size=1",
)


def _expected_epsilon(site: Path, config_overrides: tuple[str, ...], rounds: int) -> float:
    """Independent: Opacus' RDP functions on (sigma / sqrt(2 networks: G_AB and D_B),
    expected batch / patients, steps), the patients counted from the site's volumes."""
    config = tiny_config(*config_overrides)
    patients = training_patients(site, config)
    q = min(1.0, (config.privacy.batch_size or config.training.batch_size) / patients)
    steps = rounds * config.federation.local_epochs * max(1, int(1 / q))
    sigma = float(config.privacy.noise_multiplier or 0) / math.sqrt(2)
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=RDP_ORDERS)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=config.privacy.delta)
    return float(eps)


ALLOWED_EVALUATE_METRICS = {
    "num-examples", "num-subjects", "seconds", "psnr", "ssim", "mae", "nmse",
    "psnr_masked", "ssim_masked", "mae_masked", "nmse_masked",
}  # fmt: skip


def _config_file(path: Path, *extra: str) -> Path:
    lines = ['preset = "cpu-small"']
    sections: dict[str, list[str]] = {}
    for item in [*TINY, *extra]:
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {value}")
    for section, values in sections.items():
        lines += [f"[{section}]", *values]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# A test's hospitals and coordinator share this machine's cores; a real hospital has a machine
# of its own. With torch's default (a thread per core in every process) their threads spin
# against each other: on 2 cores, a hospital's 6 DP steps took 28.9 s beside the others and
# 3.9 s with one thread each, and the deployment tests went from 254 s to 180 s.
PROJECT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Cluster:
    """``fedsynth server`` and ``fedsynth client`` processes, each in its own process group."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = dict(os.environ, FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")

    def start(
        self,
        name: str,
        args: list[str],
        *,
        argv: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """``fedsynth ARGS`` (or a whole ``argv``, e.g. a compose service's) in its own group."""
        log = (self.root / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv or [FEDSYNTH, *args], stdout=log, stderr=subprocess.STDOUT,
            env={**(env if env is not None else self.env), **ONE_THREAD}, start_new_session=True,
            cwd=self.root,
        )  # fmt: skip
        self.procs[name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def kill_pidfile(self, path: Path) -> None:
        if path.exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(path.read_text().strip()), signal.SIGKILL)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def stop_all(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.kill(name)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(tmp_path)
    try:
        yield made
    finally:
        made.stop_all()
        made.kill_pidfile(tmp_path / "run" / "superlink.pid")


def _wait_for(predicate, timeout: float, what: str, cluster: Cluster) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        server = cluster.procs.get("server")
        if server is not None and server.poll() is not None and not predicate():
            break
        time.sleep(1.0)
    logs = {n: cluster.log(n)[-3000:] for n in cluster.procs}
    pytest.fail(f"timed out waiting for {what}; logs:\n" + json.dumps(logs, indent=1))


def _rounds(run: Path) -> list[dict]:  # type: ignore[type-arg]
    path = run / "rounds.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _live_state(run: Path) -> str:
    try:
        return str(json.loads((run / "status.json").read_text())["state"])
    except (OSError, ValueError, KeyError):
        return ""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _processes_mentioning(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (a SuperNode's helpers name its port)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in text:
            found.append(int(cmdline.parent.name))
    return found


def _environment(pid: int) -> dict[str, str]:
    """A live process's environment, as the kernel holds it."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(
        item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item
    )


def _assert_private(pids: list[int]) -> None:
    """Flower's telemetry and update check are off in every one of these processes."""
    assert pids
    for pid in pids:
        try:
            env = _environment(pid)
        except OSError:  # it ended meanwhile
            continue
        assert env.get("FLWR_TELEMETRY_ENABLED") == "0", pid
        assert env.get("FLWR_DISABLE_UPDATE_CHECK") == "1", pid


def _port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# --------------------------------------------------------------------------- simulation


def test_simulation_engine_three_sites_two_rounds(tmp_path: Path) -> None:
    sites = phantom_sites(tmp_path / "data", (3, 2, 1, 1))
    config = tiny_config("federation.rounds=2", "federation.min_sites=4", *DP)
    outcome = simulate(config, sites, tmp_path / "run", echo=lambda _: None)
    assert outcome.status == "finished:completed" and outcome.stopped is None
    rounds = _rounds(tmp_path / "run")
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["accepted"] == ["site-1", "site-2", "site-3", "site-4"]
        assert r["rejected"] == {}
        assert set(r["eval_metrics"]) == {"site-1", "site-2", "site-3", "site-4"}
        for index, site in enumerate(sites, start=1):
            expected = _expected_epsilon(site, DP, r["round"])
            assert r["epsilon"][f"site-{index}"] == pytest.approx(expected, rel=1e-9)
        assert r["worst_epsilon"] == max(r["epsilon"].values())
    assert latest_round(tmp_path / "run") == 2
    assert not (tmp_path / "run" / "superlink.pid").exists()  # the SuperLink was stopped


# --------------------------------------------------------------------------- deployment
# The deployment is docker/compose.yaml's: its certs, phantom, coordinator and hospital services'
# commands, image environment and healthchecks, run as local processes (tests/local_compose.py
# maps container paths, host names and ports). Two deviations, both for time: the consortium
# file is the tiny two-round DP one written here under the compose file's name, and the phantom
# service writes 3, 2 and 1 subjects at 4 mm instead of its 6, 4 and 2 at 2 mm.
PHANTOM_FOR_TESTS = {"--subjects": "3,2,1", "--voxel-mm": "4"}


@dataclass
class Deployment:
    root: Path
    cluster: Cluster
    compose: LocalCompose
    run: Path
    hospitals: list[str]  # compose services, also the names the coordinator registers
    data: dict[str, Path]  # hospital -> its data folder (the phantom volume's site-N)
    state: dict[str, Path]  # hospital -> its state volume
    intruder_key: Path
    usurper_key: Path
    usurper_node: int = 0  # what the SuperLink's Control API answered an outsider's registration
    healthy: dict[str, int] = field(default_factory=dict)  # service -> healthcheck exit code
    data_before: dict[str, tuple[int, int]] = field(default_factory=dict)
    data_after: dict[str, tuple[int, int]] = field(default_factory=dict)
    certs_before: dict[str, tuple[int, int]] = field(default_factory=dict)
    certs_after: dict[str, tuple[int, int]] = field(default_factory=dict)


def test_the_stock_flwr_run_simulates_the_project(tmp_path: Path) -> None:
    """README's `flwr run .` from the project root: Flower starts its own local SuperLink in
    simulation (on the ports named in the environment), the sites come from `site-dirs`, and
    `flwr ls` sees the run finished. The SuperLink Flower left running is stopped here."""
    sites = phantom_sites(tmp_path / "data", (2, 1, 1))
    config = _config_file(
        tmp_path / "consortium.toml", "federation.rounds=1", "federation.min_sites=3"
    )
    run = tmp_path / "run"
    control = free_port()
    env = dict(
        os.environ,
        **PRIVATE_ENV,
        **ONE_THREAD,
        FLWR_HOME=str(tmp_path / "flwr"),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(control),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    site_dirs = ",".join(str(s) for s in sites)
    run_config = f'config-path="{config}" run-dir="{run}" site-dirs="{site_dirs}"'
    command = ["flwr", "run", ".", "--stream", "--federation-config", "num-supernodes=3",
               "--run-config", run_config]  # fmt: skip
    marker = f"--control-api-address 127.0.0.1:{control}"
    try:
        done = subprocess.run(
            command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        superlinks = _processes_mentioning(marker)
        assert superlinks, "Flower's local SuperLink is not running"
        _assert_private(superlinks)
        listed = subprocess.run(
            ["flwr", "ls", "--format", "json"], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        runs = json.loads(listed.stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], listed.stdout
    finally:
        for pid in _processes_mentioning(marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)  # Flower starts it in a session of its own
    rounds = _rounds(run)
    assert [r["round"] for r in rounds] == [1]
    assert rounds[0]["accepted"] == ["site-1", "site-2", "site-3"]  # num-supernodes reached it
    assert read_status(run).state == "finished"
    deadline = time.monotonic() + 20
    while _processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(marker)


def _option(argv: list[str], option: str) -> str:
    return argv[argv.index(option) + 1]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file: what a read-only mount must keep."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _healthcheck(compose: LocalCompose, service: str) -> int:
    return subprocess.run(
        compose.healthcheck(service), env=compose.env(service), capture_output=True, timeout=30
    ).returncode


def _one_shot(compose: LocalCompose, service: str, root: Path, **options: str) -> None:
    done = subprocess.run(
        compose.argv(service, options), env=compose.env(service), cwd=root,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"{service}: {done.stdout}{done.stderr}"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Three hospitals of unequal size, TLS and node auth, two rounds, plus an intruder."""
    root = tmp_path_factory.mktemp("deployment")
    config = _config_file(
        root / "consortium.toml", "federation.rounds=2", "federation.min_sites=3", *DP
    )
    compose = LocalCompose(root, binds={"./consortium.toml": config})
    hospitals = sorted(s for s in compose.services if s.startswith("hospital-"))
    cluster = Cluster(root)
    _one_shot(compose, "certs", root)
    _one_shot(compose, "phantom", root, **PHANTOM_FOR_TESTS)
    certs, phantom = compose.volumes["certs"], compose.volumes["phantom"]
    argv = {name: compose.argv(name) for name in ["coordinator", *hospitals]}
    made = Deployment(
        root=root,
        cluster=cluster,
        compose=compose,
        run=Path(_option(argv["coordinator"], "--run-dir")),
        hospitals=hospitals,
        data={h: Path(_option(argv[h], "--data-dir")) for h in hospitals},
        state={h: Path(_option(argv[h], "--state-dir")) for h in hospitals},
        intruder_key=make_node_key(root / "intruder", "intruder")[0],
        usurper_key=make_node_key(root / "usurper", "usurper")[0],
        data_before=_snapshot(phantom),
        certs_before=_snapshot(certs),
    )
    cluster.port = int(_option(argv["coordinator"], "--port"))
    try:
        cluster.start("server", [], argv=argv["coordinator"], env=compose.env("coordinator"))
        # Compose starts the hospitals once the coordinator's healthcheck passes.
        _wait_for(
            lambda: _healthcheck(compose, "coordinator") == 0, 120, "a healthy coordinator", cluster
        )
        # An outsider with only ca.crt registers a key of its own through the SuperLink's
        # Control API (same port), under a hospital's name, and connects with it.
        outsider = root / "usurper" / "flwr"
        write_connection(outsider, "x", f"127.0.0.1:{cluster.port}", certs / "ca.crt")
        made.usurper_node = register_node(
            outsider, "x", made.usurper_key.with_suffix(".pub"), hospitals[0]
        )
        cluster.start(
            "usurper",
            ["client", "--data-dir", str(made.data[hospitals[0]]), "--superlink",
             f"127.0.0.1:{cluster.port}", "--ca", str(certs / "ca.crt"),
             "--key", str(made.usurper_key), "--state-dir", "state-usurper",
             "--runtime-port", str(free_port())],
        )  # fmt: skip
        for hospital in hospitals:
            cluster.start(hospital, [], argv=argv[hospital], env=compose.env(hospital))
        cluster.start(
            "intruder",
            ["client", "--data-dir", str(made.data[hospitals[0]]), "--superlink",
             f"127.0.0.1:{cluster.port}", "--ca", str(certs / "ca.crt"),
             "--key", str(made.intruder_key), "--state-dir", "state-intruder",
             "--runtime-port", str(free_port())],
        )  # fmt: skip
        cluster.procs["server"].wait(600)
        made.healthy = {h: _healthcheck(compose, h) for h in hospitals}
        made.data_after, made.certs_after = _snapshot(phantom), _snapshot(certs)
        yield made
    finally:
        cluster.stop_all()
        cluster.kill_pidfile(made.run / "superlink.pid")


def test_deployment_with_tls_and_node_auth_runs_two_rounds(deployment: Deployment) -> None:
    cluster, run, hospitals = deployment.cluster, deployment.run, deployment.hospitals
    assert cluster.procs["server"].returncode == 0, cluster.log("server")[-3000:]
    rounds = _rounds(run)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["accepted"] == hospitals == ["hospital-a", "hospital-b", "hospital-c"]
        assert (round_dir(run, r["round"]) / "generators.safetensors").exists()
    # Unequal sites: the largest trains on the most examples.
    examples = {s: m["num-examples"] for s, m in rounds[0]["train_metrics"].items()}
    by_folder = {deployment.data[h].name: examples[h] for h in hospitals}
    assert by_folder["site-1"] > by_folder["site-3"]
    # Bytes on the wire: every float32 generator parameter, once per site and direction.
    weights = load_file(str(round_dir(run, 2) / "generators.safetensors"))
    payload = sum(v.nbytes for v in weights.values())
    assert rounds[1]["bytes_up"] == dict.fromkeys(hospitals, payload)
    assert rounds[1]["bytes_down"] == dict.fromkeys(hospitals, payload)
    assert "round 2/2" in cluster.log("server")
    assert not (run / "superlink.pid").exists()
    # Patient-level DP: each site's cumulative epsilon, each round, as Opacus recomputes it.
    for r in rounds:
        for hospital in hospitals:
            expected = _expected_epsilon(deployment.data[hospital], DP, r["round"])
            assert r["epsilon"][hospital] == pytest.approx(expected, rel=1e-9)
            assert r["train_metrics"][hospital]["epsilon"] == r["epsilon"][hospital]
    assert "epsilon max" in cluster.log("server")


def test_an_unregistered_node_key_is_refused(deployment: Deployment) -> None:
    cluster = deployment.cluster
    rounds = _rounds(deployment.run)
    assert all("intruder" not in r["sites"] for r in rounds)
    assert len(rounds[0]["sites"]) == 3
    # The SuperLink refused the intruder's key (and the intruder never got a node).
    key = load_ssh_private_key(deployment.intruder_key.read_bytes(), None)
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    body = pem.splitlines()[1]
    refusals = [
        line
        for line in (deployment.run / "superlink.log").read_text(encoding="utf-8").splitlines()
        if body in line
    ]
    assert refusals and all("No SuperNode found with the given public key" in r for r in refusals)
    # Its SuperNode says so: with the warm worker (--isolation process) Flower gives up at once
    # with exit code 305; with its own SuperExec it retried ("connection attempt failed").
    said = cluster.log("intruder").lower()
    assert "failed to activate supernode" in said or "connection attempt failed" in said


def test_a_node_registered_through_the_control_api_takes_no_part(deployment: Deployment) -> None:
    # Flower 1.42 let the outsider register (this is what the coordinator has to defend against).
    assert deployment.usurper_node > 0
    log = (deployment.run / "coordinator.log").read_text(encoding="utf-8")
    assert f"ignoring node {deployment.usurper_node} (registered as 'hospital-a')" in log
    for r in _rounds(deployment.run):
        assert sorted(r["sites"]) == deployment.hospitals  # the real hospital-a, by its key
    assert "train message" not in deployment.cluster.log("usurper")  # never sent a round


def test_audit_sites_send_only_generator_tensors_and_whitelisted_scalars(
    deployment: Deployment,
) -> None:
    root = deployment.root
    weights = load_file(str(round_dir(deployment.run, 1) / "generators.safetensors"))
    expected_shapes = {key: list(value.shape) for key, value in weights.items()}
    for hospital in deployment.hospitals:
        # compose.yaml's hospitals write --audit-log /state/audit.jsonl
        lines = (deployment.state[hospital] / "audit.jsonl").read_text(encoding="utf-8")
        lines = lines.splitlines()
        entries = [json.loads(line) for line in lines]
        assert [e["type"] for e in entries] == ["train", "evaluate", "train", "evaluate"]
        for entry in entries:
            assert "error" not in entry
            records = entry["records"]
            kinds = {name: record["kind"] for name, record in records.items()}
            if entry["type"] == "train":
                assert kinds == {"arrays": "arrays", "metrics": "metrics"}
                # Numbers only, packed (fedsynth.common.wire): one float32 vector of every generator
                # parameter, no names, nothing image-shaped.
                sent = records["arrays"]["entries"]
                values = sum(int(np.prod(shape)) for shape in expected_shapes.values())
                assert sent == {"values": {"dtype": "float32", "shape": [values]}}
                # Which parameters the numbers are, from the coordinator's layout.
                packed = records["arrays"]["packed"]
                assert {k: v["shape"] for k, v in packed.items()} == expected_shapes
                assert all(k.startswith(("g_ab.", "g_ba.")) for k in packed)
                assert all(v["dtype"] == "float32" for v in packed.values())
                allowed = ALLOWED_TRAIN_METRICS
            else:
                assert kinds == {"metrics": "metrics"}
                allowed = ALLOWED_EVALUATE_METRICS
            metrics = records["metrics"]["entries"]
            assert set(metrics) <= allowed, set(metrics) - allowed
            assert all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
            )
        text = "\n".join(lines)
        assert "sub-" not in text and str(root) not in text and "/" not in text


def test_compose_services_as_deployed_keep_data_and_keys_and_stop_on_sigterm(
    deployment: Deployment,
) -> None:
    """What compose.yaml promises beyond the run: read-only mounts stay untouched, each
    hospital's healthcheck passes while its daemon waits, and `docker stop`'s SIGTERM ends
    every process within Docker's 10 s grace, freeing every port."""
    compose, cluster = deployment.compose, deployment.cluster
    assert deployment.data_after == deployment.data_before and deployment.data_before
    assert deployment.certs_after == deployment.certs_before and deployment.certs_before
    assert deployment.healthy == dict.fromkeys(deployment.hospitals, 0)
    for hospital in deployment.hospitals:
        # Each hospital dialled the coordinator with its own key, and only its own.
        assert Path(_option(cluster.procs[hospital].args, "--key")).name == f"{hospital}.key"
        proc = cluster.procs[hospital]
        assert proc.poll() is None, cluster.log(hospital)[-3000:]
        os.kill(proc.pid, signal.SIGTERM)  # to the daemon only, as `docker stop` via tini does
    for hospital in deployment.hospitals:
        pid = cluster.procs[hospital].pid
        assert cluster.procs[hospital].wait(10) is not None
        with pytest.raises(ProcessLookupError):  # nothing it started outlives it
            os.killpg(pid, 0)
    assert all(_port_is_free(port) for port in compose.ports.values()), compose.ports
    assert not (deployment.run / "superlink.pid").exists()


# --------------------------------------------------------------------------- faults


def test_faults_killed_site_bad_update_rejoin_and_coordinator_resume(
    cluster: Cluster, tmp_path: Path
) -> None:
    sites = phantom_sites(tmp_path / "data", (2, 2, 1))
    certs = make_certificates(tmp_path / "certs", ["site-1", "site-2", "site-3"])
    config = _config_file(
        tmp_path / "consortium.toml",
        "federation.rounds=4",
        "federation.min_sites=1",
        "federation.start_sites=3",
        "federation.evaluate_sites=false",
        "federation.rejoin_grace_s=240",
        "federation.round_timeout_s=300",
    )
    run = tmp_path / "run"
    server_args = ["server", "--run-dir", "run", "--certs", "certs", "--host", "127.0.0.1",
                   "--port", str(cluster.port)]  # fmt: skip

    runtime_ports: dict[str, int] = {}

    def client(index: int, extra: list[str] = ()) -> None:  # type: ignore[assignment]
        name = f"site-{index}"
        runtime_ports[name] = free_port()
        cluster.start(
            name,
            ["client", "--data-dir", str(sites[index - 1]), "--superlink",
             f"127.0.0.1:{cluster.port}", "--ca", str(certs.ca_cert),
             "--key", str(certs.node_keys[name][0]), "--state-dir", f"state-{index}",
             "--runtime-port", str(runtime_ports[name]), *extra],
        )  # fmt: skip

    # Before round 1: SIGTERM (docker stop) to the coordinator while it waits for sites. It
    # stops its SuperLink and ServerApp, records why, says how to go on and exits 143.
    first_start = [*server_args, "--config", str(config), "--resume-if-exists"]
    cluster.start("server", first_start)
    _wait_for(lambda: _live_state(run) == "waiting", 120, "the coordinator", cluster)
    serverapp = int(json.loads((run / "status.json").read_text())["pid"])
    cluster.procs["server"].send_signal(signal.SIGTERM)
    assert cluster.procs["server"].wait(60) == 128 + signal.SIGTERM
    said = cluster.log("server")
    assert "stopped by SIGTERM" in said
    assert "continue with: fedsynth server --run-dir run --certs certs --resume" in said
    # What Flower did: it ended the ServerApp with a signal, which the coordinator took for an
    # interruption (and said so in its own log) before `fedsynth server` recorded the stop.
    assert "interrupted (" in (run / "coordinator.log").read_text(encoding="utf-8")
    assert read_status(run).state == "interrupted"
    assert not (run / "superlink.pid").exists()
    _wait_for(lambda: not _alive(serverapp), 30, "the ServerApp to exit", cluster)
    (tmp_path / "server.log").rename(tmp_path / "server-before-sigterm.log")
    # The same command line again continues the run (what a restarting service does).
    cluster.start("server", first_start)
    _wait_for(lambda: "submitted" in cluster.log("server"), 120, "the run", cluster)
    assert "holds a run: continuing it" in cluster.log("server")
    client(1)
    client(2)
    client(3, ["--fault", "nan"])

    # Round 1: the NaN update is refused and logged with the site's name.
    _wait_for(lambda: len(_rounds(run)) >= 1, 300, "round 1", cluster)
    first = _rounds(run)[0]
    assert first["accepted"] == ["site-1", "site-2"]
    assert "NaN" in " ".join(first["rejected"]["site-3"])
    coordinator_log = run / "coordinator.log"
    assert re.search(r"left out site-3: .*NaN", coordinator_log.read_text(encoding="utf-8"))

    # Round 2: site-2's daemon is stopped mid-round by SIGTERM to its own process (as docker
    # stop does): it exits 143 and leaves no process (Flower starts the SuperExec and ClientApp
    # in sessions of their own) and no half-written state; the round completes with the others.
    helpers = _processes_mentioning(f":{runtime_ports['site-2']}")
    assert helpers  # the SuperNode's SuperExec, at least
    cluster.procs["site-2"].send_signal(signal.SIGTERM)
    assert cluster.procs["site-2"].wait(60) == 128 + signal.SIGTERM
    assert not [p for p in helpers if _alive(p)]
    assert not list((tmp_path / "state-2").rglob(".*.tmp*"))
    assert "stopping the SuperNode" in cluster.log("site-2")
    _wait_for(lambda: len(_rounds(run)) >= 2, 400, "round 2", cluster)
    second = _rounds(run)[1]
    assert second["accepted"] == ["site-1"]
    assert "site-2" in second["rejected"]

    # Round 3: site-2 restarts and rejoins.
    client(2)
    _wait_for(lambda: len(_rounds(run)) >= 3, 400, "round 3", cluster)
    assert _rounds(run)[2]["accepted"] == ["site-1", "site-2"]

    # Round 4: the coordinator (and its SuperLink) is killed, then restarted with --resume.
    cluster.kill("server")
    cluster.kill_pidfile(run / "superlink.pid")
    time.sleep(3)
    done = len(_rounds(run))
    assert latest_round(run) == done
    (tmp_path / "server.log").rename(tmp_path / "server-before-crash.log")
    cluster.start("server", [*server_args, "--resume"])
    assert cluster.procs["server"].wait(600) == 0, cluster.log("server")[-3000:]
    rounds = _rounds(run)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert f"resuming {run} after round {done}" in coordinator_log.read_text(encoding="utf-8")
    assert "round 4/4" in cluster.log("server")  # the restarted coordinator's terminal
    assert latest_round(run) == 4


# --------------------------------------------------------------------------- damaged scans


def _serve(cluster: Cluster, config: Path, run: Path) -> None:
    """`fedsynth server` on the cluster's port, with TLS and node authentication, until it waits."""
    cluster.start(
        "server",
        ["server", "--run-dir", "run", "--certs", "certs", "--host", "127.0.0.1",
         "--port", str(cluster.port), "--config", str(config)],
    )  # fmt: skip
    _wait_for(lambda: _live_state(run) == "waiting", 120, "the coordinator", cluster)


def _serve_one_site(cluster: Cluster, tmp_path: Path, rounds: int) -> tuple[CertificateSet, Path]:
    """`fedsynth server` for a consortium of one site (`site-1`), no site evaluation."""
    certs = make_certificates(tmp_path / "certs", ["site-1"])
    config = _config_file(
        tmp_path / "consortium.toml",
        f"federation.rounds={rounds}",
        "federation.min_sites=1",
        "federation.evaluate_sites=false",
    )
    run = tmp_path / "run"
    _serve(cluster, config, run)
    return certs, run


def _daemon(
    cluster: Cluster,
    name: str,
    data: Path,
    certs: CertificateSet,
    *extra: str,
) -> int:
    """A hospital's `fedsynth client` named ``name``; returns its runtime port."""
    port = free_port()
    cluster.start(
        name,
        ["client", "--data-dir", str(data), "--superlink", f"127.0.0.1:{cluster.port}",
         "--ca", str(certs.ca_cert), "--key", str(certs.node_keys[name][0]),
         "--state-dir", f"state-{name}", "--runtime-port", str(port), *extra],
    )  # fmt: skip
    return port


def test_daemons_with_damaged_scans_report_them_or_train_without_them(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Two hospitals, each with one good T1w/T2w pair and every kind of damaged file
    (tests/intake.py): the one started with --skip-bad trains on its pair every round; the
    other answers every round with 'unusable files', naming no file, and stays connected."""
    lenient, strict = "site-skip-bad", "site-strict"
    bad = {name: write_bad_site(tmp_path / "data" / name) for name in (lenient, strict)}
    certs = make_certificates(tmp_path / "certs", [lenient, strict])
    config = _config_file(
        tmp_path / "consortium.toml",
        "federation.rounds=2",
        "federation.min_sites=1",
        "federation.start_sites=2",  # round 1 waits for both daemons
        "federation.evaluate_sites=false",
        "federation.round_timeout_s=300",
    )
    run = tmp_path / "run"
    _serve(cluster, config, run)
    runtime_ports = {
        name: _daemon(cluster, name, tmp_path / "data" / name, certs, *extra)
        for name, extra in ((lenient, ["--skip-bad"]), (strict, []))
    }

    _wait_for(lambda: len(_rounds(run)) >= 1, 400, "round 1", cluster)
    # No process fedsynth started reports to Flower's telemetry or checks for updates: the
    # daemons, their SuperNodes and SuperExecs, the coordinator, its SuperLink and ServerApp.
    daemons = [cluster.procs[name].pid for name in (lenient, strict, "server")]
    helpers = [pid for port in runtime_ports.values() for pid in _processes_mentioning(f":{port}")]
    linked = _processes_mentioning(f":{cluster.port}")
    assert len(helpers) >= 2 and len(linked) >= 2  # SuperExecs; SuperNodes and the SuperLink
    _assert_private(daemons + helpers + linked)
    _wait_for(lambda: len(_rounds(run)) >= 2, 400, "two rounds", cluster)
    # Both daemons outlive the run's last round (the strict one was asked, and answered, twice).
    for name in (lenient, strict):
        assert cluster.procs[name].poll() is None, cluster.log(name)[-3000:]
    assert cluster.procs["server"].wait(120) == 0, cluster.log("server")[-3000:]
    rounds = _rounds(run)
    assert [r["round"] for r in rounds] == [1, 2]
    # The lenient site trained on its good pair alone: every full batch of the pair's examples
    # (the loader drops a last, partial batch).
    lenient_config = tiny_config("data.skip_bad=true")
    examples = training_examples(tmp_path / "data" / lenient, lenient_config, tmp_path / "cache")
    batch = lenient_config.training.batch_size
    assert examples > batch
    reasons = []
    for r in rounds:
        assert r["accepted"] == [lenient]
        assert r["train_metrics"][lenient]["num-examples"] == examples - examples % batch
        assert list(r["rejected"]) == [strict]
        (reason,) = r["rejected"][strict]
        assert "unusable files" in reason and f"{len(bad[strict])} scan(s)" in reason
        assert "sub-" not in reason and "/" not in reason and ".nii" not in reason
        reasons.append(reason)
    assert reasons[0] == reasons[1]  # the same answer in round 2: asked again, answered again
    assert latest_round(run) == 2
    # Each daemon's log names every damaged file and why; none of them raised a traceback.
    for name, said in ((lenient, "skipping"), (strict, "unusable scan(s)")):
        log = cluster.log(name)
        assert said in log and "Traceback" not in log, log[-3000:]
        for path, fragment in bad[name].items():
            assert path.name in log and fragment in log, (path.name, fragment)
    # Once per round, and once only: Opacus' import gives the root logger a stderr handler of its
    # own, which fedsynth.common.logs removes (each line used to appear a second time, reformatted).
    assert cluster.log(strict).count("declining train: unusable files") == 2
    assert cluster.log(strict).count("ERROR fedsynth: declining train: unusable files") == 2
    coordinator_log = (run / "coordinator.log").read_text(encoding="utf-8")
    assert (
        len(re.findall(rf"round [12]: left out {strict}: .*unusable files", coordinator_log)) == 2
    )
    # Still running (its SuperNode retrying the coordinator that ended) until the fixture stops it.
    assert cluster.procs[strict].poll() is None, cluster.log(strict)[-3000:]
    # Each daemon imported its ClientApp once, in its warm worker, and served every message of
    # the run from it: one forked child per message, never with other threads running.
    for name in (lenient, strict):
        log = cluster.log(name)
        ready = re.findall(r"warm ClientApp worker ready \(pid (\d+), 1 thread\(s\)\)", log)
        served = re.findall(r"warm worker (\d+): message (\d+)", log)
        assert len(ready) == 1, log[-3000:]
        assert len(served) >= 2 and {pid for pid, _ in served} == set(ready)
        assert [int(n) for _, n in served] == list(range(1, len(served) + 1))
        assert "threads at fork time" not in log


def test_a_run_stopped_by_min_sites_is_recorded_as_failed_at_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The coordinator's only site cannot train (unusable files): round 1 has no valid update,
    the coordinator stops the run, and Flower records it as failed within seconds, not when the
    ServerApp's heartbeat expires (as when it ended with SystemExit)."""
    write_bad_site(tmp_path / "data" / "site-1", kinds=["units50mm"])
    certs, run = _serve_one_site(cluster, tmp_path, rounds=2)
    _daemon(cluster, "site-1", tmp_path / "data" / "site-1", certs)
    assert cluster.procs["server"].wait(400) == 1, cluster.log("server")[-3000:]
    ended = time.time()
    stopped = (run / "STOPPED").stat().st_mtime
    said = cluster.log("server")
    assert "0 valid update(s)" in (run / "STOPPED").read_text(encoding="utf-8")
    assert "the run stopped" in said
    assert "ended as running" not in said and "did not finish" not in said
    # Flower had the outcome when `fedsynth server` read it: the run is over in its records.
    assert ended - stopped < 5.0, f"{ended - stopped:.1f} s from the stop to the recorded end"
    assert read_status(run).state == "stopped"


def test_flwr_stop_is_recorded_as_a_stop_not_an_interruption(
    cluster: Cluster, tmp_path: Path
) -> None:
    """An operator ends the run with the stock `flwr stop`: `fedsynth server` exits 0, and
    status says the run was stopped on purpose and how to continue, not "interrupted"."""
    sites = phantom_sites(tmp_path / "data", (2,))
    certs, run = _serve_one_site(cluster, tmp_path, rounds=3)
    _daemon(cluster, "site-1", sites[0], certs)
    _wait_for(lambda: len(_rounds(run)) >= 1, 300, "round 1", cluster)
    found = re.search(r"run (\d+) submitted", cluster.log("server"))
    assert found, cluster.log("server")[-2000:]
    flwr(["stop", found.group(1), "fedsynth"], run / "flwr")
    assert cluster.procs["server"].wait(120) == 0, cluster.log("server")[-3000:]
    status = read_status(run)
    assert status.state == "stopped", status
    assert "flwr stop" in status.detail and "interrupted" not in status.detail
    done = latest_round(run)
    assert done is not None and done < 3
    said = cluster.log("server")
    assert f"after round {done} of 3" in said
    assert "continue with: fedsynth server --run-dir run --certs certs --resume" in said
    # What Flower did: it ended the ServerApp with a signal, which the coordinator took for an
    # interruption (and said so in its own log) before `fedsynth server` recorded the stop.
    assert "interrupted (" in (run / "coordinator.log").read_text(encoding="utf-8")
