"""Configuration of a whole fedsynth run: data, model, training, privacy, federation, simulation.

A run's configuration is built in layers, each overriding the one before:

1. the field defaults (Zhu et al. 2017 CycleGAN values where the paper fixes them);
2. a preset (``cpu-small``, ``gpu-paper``; TOML files shipped in ``common/presets/``);
3. a TOML file (``--config run.toml``), which may itself name a preset (``preset = "cpu-small"``);
4. environment variables ``FEDSYNTH_<SECTION>__<FIELD>`` (``FEDSYNTH_TRAINING__LR=1e-4``);
5. command-line overrides ``--set section.field=value``.

Every value remembers where it came from, so an invalid one fails with its dotted name, the value
found, where it was found and what is allowed. :func:`write_resolved_config` writes the final
configuration beside a run's outputs, marking what differs from the defaults.

What is where: :mod:`.values` (field value types and the sections' base model), :mod:`.site`
(``[data]``, ``[model]``, ``[training]``, ``[privacy]``), :mod:`.run` (``[federation]``,
``[simulation]`` and :class:`RunConfig`), :mod:`.errors` (:class:`ConfigError`), :mod:`.layering`
(presets and the layers above, :func:`load_config`) and :mod:`.writing` (the resolved TOML).
Every public name is importable from ``fedsynth.common.config`` itself.
"""

from __future__ import annotations

from fedsynth.common.config.errors import ConfigError, ConfigIssue
from fedsynth.common.config.layering import (
    ENV_NESTED,
    ENV_PREFIX,
    available_presets,
    env_overrides,
    load_config,
    load_preset,
    parse_override,
    parse_value,
    validate_layers,
)
from fedsynth.common.config.run import (
    Baseline,
    FederationConfig,
    RunConfig,
    SimulationConfig,
    SplitScheme,
)
from fedsynth.common.config.site import DataConfig, ModelConfig, PrivacyConfig, TrainingConfig
from fedsynth.common.config.values import AbsolutePath, DeviceStr, DirectionStr, Misalignment
from fedsynth.common.config.writing import (
    RESOLVED_CONFIG_NAME,
    config_differences,
    dumps_config,
    loads_config,
    write_resolved_config,
)

__all__ = [
    "ENV_NESTED",
    "ENV_PREFIX",
    "RESOLVED_CONFIG_NAME",
    "AbsolutePath",
    "Baseline",
    "ConfigError",
    "ConfigIssue",
    "DataConfig",
    "DeviceStr",
    "DirectionStr",
    "FederationConfig",
    "Misalignment",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SimulationConfig",
    "SplitScheme",
    "TrainingConfig",
    "available_presets",
    "config_differences",
    "dumps_config",
    "env_overrides",
    "load_config",
    "load_preset",
    "loads_config",
    "parse_override",
    "parse_value",
    "validate_layers",
    "write_resolved_config",
]
