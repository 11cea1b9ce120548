"""Write and read back a run's resolved configuration (``config.resolved.toml``)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from fedsynth.common.config.errors import ConfigError, ConfigIssue
from fedsynth.common.config.layering import flatten_tree, validate_layers
from fedsynth.common.config.run import RunConfig
from fedsynth.common.io import atomic_write_text

RESOLVED_CONFIG_NAME = "config.resolved.toml"


def _toml_ready(value: Any) -> Any:
    """Drop ``None`` (TOML has no null: an absent key means the default) and stringify paths."""
    if isinstance(value, dict):
        return {k: _toml_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_toml_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_differences(config: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (value, default) for every value that differs from the field defaults."""
    current = dict(flatten_tree(config.model_dump(mode="json")))
    default = dict(flatten_tree(RunConfig().model_dump(mode="json")))
    return {k: (v, default.get(k)) for k, v in current.items() if v != default.get(k)}


def dumps_config(config: RunConfig) -> str:
    """The configuration as TOML, headed by comments naming every non-default value's origin."""
    header = ["# fedsynth resolved configuration: load it with `--config` to repeat this run."]
    differences = config_differences(config)
    if differences:
        header.append("# Differs from the defaults:")
        for key, (value, default) in differences.items():
            origin = config.sources.get(key, "derived")
            header.append(f"#   {key} = {value!r} (default {default!r}; {origin})")
    body = tomli_w.dumps(_toml_ready(config.model_dump(mode="json")))
    return "\n".join(header) + "\n\n" + body


def write_resolved_config(config: RunConfig, out_dir: Path) -> Path:
    """Write ``config.resolved.toml`` into ``out_dir`` (atomically) and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / RESOLVED_CONFIG_NAME
    atomic_write_text(target, dumps_config(config))
    return target


def loads_config(text: str, source: str) -> RunConfig:
    """Validate a resolved configuration received as TOML text (e.g. from the coordinator)."""
    try:
        tree = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigIssue("<root>", None, f"not valid TOML: {exc}", source)]) from None
    return validate_layers(tree, dict.fromkeys(dict(flatten_tree(tree)), source))
