"""Build a configuration in layers: defaults, preset, TOML file, environment, ``--set``."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from fedsynth.common.config.errors import ConfigError, ConfigIssue
from fedsynth.common.config.run import RunConfig

ENV_PREFIX = "FEDSYNTH_"
ENV_NESTED = "__"


def available_presets() -> list[str]:
    """Names of the presets shipped with fedsynth."""
    folder = resources.files("fedsynth.common") / "presets"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_preset(name: str) -> dict[str, Any]:
    """The overrides a preset applies (a nested dict)."""
    if name not in available_presets():
        raise ConfigError(
            [
                ConfigIssue(
                    "preset", name, f"unknown preset; allowed: {', '.join(available_presets())}"
                )
            ]
        )
    text = (resources.files("fedsynth.common") / "presets" / f"{name}.toml").read_text(
        encoding="utf-8"
    )
    return tomllib.loads(text)


def parse_value(text: str) -> Any:
    """Interpret a CLI or environment string as a TOML value, falling back to the raw string.

    ``"1e-4"`` -> 0.0001, ``"true"`` -> True, ``"[2, 2, 2]"`` -> [2, 2, 2],
    ``"cuda:1"`` -> "cuda:1".
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """``{"training": {"lr": 1e-4}}`` -> ``("training.lr", 1e-4)``: every leaf by its dotted key."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten_tree(value, f"{dotted}.")
        else:
            yield dotted, value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([ConfigIssue(dotted, value, f"'{part}' is a value, not a section")])
        node = child
    node[parts[-1]] = value


class _Layers:
    """Merges nested dicts while remembering, per dotted key, which layer set it."""

    def __init__(self) -> None:
        self.tree: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def add(self, tree: Mapping[str, Any], source: str) -> None:
        for dotted, value in flatten_tree(tree):
            _set_dotted(self.tree, dotted, value)
            self.sources[dotted] = source


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([ConfigIssue("--config", str(path), "file not found")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("--config", str(path), f"not valid TOML: {exc}")]) from None


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """``FEDSYNTH_TRAINING__LR=1e-4`` -> ``{"training.lr": ("FEDSYNTH_TRAINING__LR", 1e-4)}``.

    ``FEDSYNTH_CONFIG`` and ``FEDSYNTH_PRESET`` are handled by :func:`load_config` itself.
    """
    found: dict[str, tuple[str, Any]] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ("FEDSYNTH_CONFIG", "FEDSYNTH_PRESET"):
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace(ENV_NESTED, ".")
        found[dotted] = (name, parse_value(text))
    return found


def parse_override(text: str) -> tuple[str, Any]:
    """Split a ``section.field=value`` override."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([ConfigIssue("--set", text, "expected section.field=value")])
    return key.strip(), parse_value(value.strip())


def _allowed_fields(loc: Sequence[str | int]) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def _describe(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        allowed = _allowed_fields(error["loc"])
        return "unknown field" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def validate_layers(tree: Mapping[str, Any], sources: Mapping[str, str]) -> RunConfig:
    """Validate a merged tree, turning pydantic errors into a :class:`ConfigError`."""
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as exc:
        issues = []
        for error in exc.errors():
            dotted = ".".join(str(p) for p in error["loc"]) or "<root>"
            # A model-level check reports the section; point at the section's keys' sources.
            source = sources.get(dotted) or next(
                (src for key, src in sources.items() if key.startswith(f"{dotted}.")), None
            )
            issues.append(ConfigIssue(dotted, error.get("input"), _describe(error), source))
        raise ConfigError(issues) from None
    config._sources = dict(sources)
    return config


def load_config(
    path: Path | None = None,
    *,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Build a run's configuration from defaults, preset, TOML file, environment and CLI.

    Args:
        path: A TOML file (``[data]``, ``[training]``, ... tables). ``FEDSYNTH_CONFIG`` is used
            when not given.
        preset: A preset name; beats a preset named in the file and ``FEDSYNTH_PRESET``.
        overrides: ``section.field=value`` strings (``--set``), applied last.
        environ: Environment to read ``FEDSYNTH_*`` from (default: ``os.environ``).

    Returns:
        The validated configuration; ``config.sources`` says where each non-default value came from.

    Raises:
        ConfigError: with every invalid value's dotted name, the value found, its origin and what
            is allowed.
    """
    environ = os.environ if environ is None else environ
    if path is None and environ.get("FEDSYNTH_CONFIG"):
        path = Path(environ["FEDSYNTH_CONFIG"])
    file_tree = _read_toml(path) if path is not None else {}

    chosen = preset or environ.get("FEDSYNTH_PRESET") or file_tree.get("preset")
    layers = _Layers()
    if chosen is not None:
        if not isinstance(chosen, str):
            raise ConfigError([ConfigIssue("preset", chosen, "must be a preset name (a string)")])
        layers.add(load_preset(chosen), f"preset {chosen}")
    if file_tree:
        layers.add(file_tree, f"file {path}")
    for dotted, (name, value) in env_overrides(environ).items():
        _set_dotted(layers.tree, dotted, value)
        layers.sources[dotted] = f"env {name}"
    for text in overrides:
        dotted, value = parse_override(text)
        _set_dotted(layers.tree, dotted, value)
        layers.sources[dotted] = f"--set {text}"
    if chosen is not None:
        layers.tree["preset"] = chosen
        layers.sources["preset"] = (
            "--preset"
            if preset
            else ("env FEDSYNTH_PRESET" if environ.get("FEDSYNTH_PRESET") else f"file {path}")
        )
    return validate_layers(layers.tree, layers.sources)
