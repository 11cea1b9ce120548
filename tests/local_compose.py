"""docker/compose.yaml's services as local processes: the containers' commands, on loopback.

There is no Docker engine in CI, so the tests run what each container would run, read from the
two files that define it: the service's ``entrypoint`` (or its image target's ``ENTRYPOINT`` in
docker/Dockerfile) and ``command``, the image's ``ENV`` and the service's ``environment``. Only
what a single machine forces is mapped:

* container paths of the service's mounts (``/certs``, ``/phantom``, ``/runs``, ``/state``,
  ``/config/...``) -> folders under the test's root (one per named volume; a bind-mounted file
  -> the replacement the test provides under the same file name);
* ``<service>:<port>`` -> ``127.0.0.1:<free port>``, ``--host 0.0.0.0`` -> ``127.0.0.1``, and the
  value of ``--port``/``--runtime-port`` -> a free port per service (the three hospitals share one
  machine here, so they cannot all use 9094); the image's HEALTHCHECK gets the same ports;
* ``/opt/venv/bin`` on ``PATH`` -> this interpreter's ``bin``, ``HOME`` -> a folder under root.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fedsynth.common.flower_processes import free_port

DOCKER = Path(__file__).resolve().parents[1] / "docker"
BIN = Path(sys.executable).parent
IMAGE_VENV_BIN = "/opt/venv/bin"
PORT_OPTIONS = ("--port", "--runtime-port")


@dataclass(frozen=True)
class Stage:
    """What a Dockerfile stage sets that a container's process sees (inherited from its parent)."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    workdir: str | None = None
    entrypoint: tuple[str, ...] = ()
    healthcheck: tuple[str, ...] = ()  # the CMD's argv
    volumes: tuple[str, ...] = ()


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def dockerfile_stages(path: Path = DOCKER / "Dockerfile") -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in _instructions(path):
        if keyword == "FROM":
            words = rest.split()
            if len(words) != 3 or words[1].upper() != "AS":
                raise ValueError(f"{path}: every stage is named (FROM image AS name): {rest!r}")
            parent = stages.get(words[0])
            current = replace(parent, name=words[2]) if parent else Stage(name=words[2])
            stages[current.name] = current
            continue
        if current is None:
            continue
        if keyword == "ENV":
            env = dict(current.env)
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ValueError(f"{path}: ENV {rest!r}: use KEY=VALUE")
                env[key] = value
            current = replace(current, env=env)
        elif keyword == "USER":
            current = replace(current, user=rest)
        elif keyword == "WORKDIR":
            current = replace(current, workdir=rest)
        elif keyword == "ENTRYPOINT":
            current = replace(current, entrypoint=tuple(json.loads(rest)))
        elif keyword == "VOLUME":
            current = replace(current, volumes=(*current.volumes, *json.loads(rest)))
        elif keyword == "HEALTHCHECK":
            _, sep, cmd = rest.partition(" CMD ")
            if not sep:
                raise ValueError(f"{path}: HEALTHCHECK without CMD in stage {current.name}")
            current = replace(current, healthcheck=tuple(json.loads(cmd)))
        stages[current.name] = current
    return stages


def load_compose(*files: Path) -> dict[str, Any]:
    """The compose files, later ones merged over earlier ones (services' keys replaced whole,
    except ``build``, which is merged, as Compose does for the keys this project uses)."""
    merged: dict[str, Any] = {}
    for path in files or (DOCKER / "compose.yaml",):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
            raise ValueError(f"{path}: no services: mapping")
        for key, value in data.items():
            if key != "services":
                merged.setdefault(key, {}).update(value or {})
        services = merged.setdefault("services", {})
        for name, service in data["services"].items():
            base = services.setdefault(name, {})
            for key, value in service.items():
                if key == "build" and isinstance(base.get("build"), dict):
                    base["build"] = {**base["build"], **value}
                else:
                    base[key] = value
    return merged


def mounts(service: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, container path, read-only) for each short-syntax ``volumes`` entry."""
    result = []
    for entry in service.get("volumes", []):
        parts = str(entry).split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"volume {entry!r}: expected SOURCE:TARGET[:MODE]")
        result.append((parts[0], parts[1], len(parts) == 3 and "ro" in parts[2].split(",")))
    return result


class LocalCompose:
    """Map compose services onto this machine under ``root`` (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        binds: Mapping[str, Path],
        compose_file: Path = DOCKER / "compose.yaml",
        dockerfile: Path = DOCKER / "Dockerfile",
    ):
        self.root = root
        self.compose = load_compose(compose_file)
        self.services: dict[str, dict[str, Any]] = self.compose["services"]
        self.stages = dockerfile_stages(dockerfile)
        self.volumes = {name: root / "volumes" / name for name in self.compose.get("volumes", {})}
        self.binds = dict(binds)
        self.ports: dict[tuple[str, int], int] = {}

    def stage(self, service: str) -> Stage:
        target = self.services[service]["build"]["target"]
        return self.stages[target]

    def local_mounts(self, service: str) -> list[tuple[str, Path, bool]]:
        """(container path, local path, read-only) of the service's mounts."""
        result = []
        for source, target, read_only in mounts(self.services[service]):
            if source in self.volumes:
                local = self.volumes[source]
                local.mkdir(parents=True, exist_ok=True)
            elif source in self.binds:
                local = self.binds[source]
            else:
                raise KeyError(f"{service}: no local stand-in for the bind mount {source!r}")
            result.append((target, local, read_only))
        return result

    def path(self, service: str, value: str) -> str:
        for target, local, _ in sorted(self.local_mounts(service), key=lambda m: -len(m[0])):
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return str(local) + value[len(target) :]
        return value

    def port(self, service: str, container_port: int) -> int:
        key = (service, container_port)
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def argv(self, service: str, options: Mapping[str, str] | None = None) -> list[str]:
        """The container's argv, mapped; ``options`` replace the values of options it has."""
        spec = self.services[service]
        entrypoint = list(spec.get("entrypoint") or self.stage(service).entrypoint)
        command = [str(word) for word in spec.get("command", [])]
        for option, value in (options or {}).items():
            if option not in command:
                raise ValueError(f"{service}: command has no {option} to replace")
            command[command.index(option) + 1] = value
        words = [*entrypoint, *command]
        mapped: list[str] = []
        for index, word in enumerate(words):
            previous = words[index - 1] if index else ""
            host, sep, port = word.rpartition(":")
            if previous in PORT_OPTIONS:
                word = str(self.port(service, int(word)))
            elif previous == "--host" and word in ("0.0.0.0", "::"):
                word = "127.0.0.1"
            elif sep and host in self.services and port.isdigit():
                word = f"127.0.0.1:{self.port(host, int(port))}"
            else:
                word = self.path(service, word)
            mapped.append(word)
        return self._resolve(mapped, service)

    def env(self, service: str) -> dict[str, str]:
        """This machine's environment, then the image's ENV, then the service's environment."""
        image = self.stage(service).env
        env = dict(os.environ)
        for key, value in image.items():
            value = value.replace("$PATH", os.environ.get("PATH", "")).replace(
                IMAGE_VENV_BIN, str(BIN)
            )
            if key == "HOME":
                value = str(self.root / "home")
                Path(value).mkdir(parents=True, exist_ok=True)
            env[key] = self.path(service, value)
        extra = self.services[service].get("environment") or {}
        if isinstance(extra, list):
            extra = dict(item.split("=", 1) for item in extra)
        env.update({k: self.path(service, str(v)) for k, v in extra.items()})
        return env

    def healthcheck(self, service: str) -> list[str]:
        """The image's HEALTHCHECK command with this service's ports mapped."""
        words = list(self.services[service].get("healthcheck", {}).get("test", [])[1:])
        words = words or list(self.stage(service).healthcheck)
        mapped = []
        for word in words:
            for (owner, container_port), host_port in self.ports.items():
                if owner == service:
                    word = word.replace(f", {container_port})", f", {host_port})")
            mapped.append(word)
        return self._resolve(mapped, service)

    def _resolve(self, argv: list[str], service: str) -> list[str]:
        """The program as the image's PATH finds it (e.g. ``fedsynth`` in the venv)."""
        program = shutil.which(argv[0], path=self.env(service)["PATH"])
        if program is None:
            raise FileNotFoundError(f"{service}: {argv[0]} not on the image's PATH here")
        return [program, *argv[1:]]
