"""Configuration: layering, provenance, error messages, presets, resolved-config round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsynth.common.config import (
    RESOLVED_CONFIG_NAME,
    ConfigError,
    RunConfig,
    available_presets,
    dumps_config,
    load_config,
    parse_value,
    write_resolved_config,
)


def test_defaults_are_valid_and_follow_zhu_et_al() -> None:
    config = load_config(environ={})
    assert config.model_dump() == RunConfig().model_dump()
    assert (config.training.lr, config.training.beta1, config.training.beta2) == (2e-4, 0.5, 0.999)
    assert (config.training.lambda_cycle, config.training.lambda_identity) == (10.0, 5.0)
    assert config.training.pool_size == 50


def test_presets_exist_and_differ_as_documented() -> None:
    assert {"cpu-small", "gpu-paper"} <= set(available_presets())
    paper = load_config(preset="gpu-paper", environ={})
    assert (paper.model.generator, paper.model.n_blocks, paper.model.ngf) == ("resnet", 9, 64)
    assert paper.data.image_size == 256
    small = load_config(preset="cpu-small", environ={})
    assert small.data.image_size < paper.data.image_size
    assert small.model.ngf < paper.model.ngf
    assert small.training.device == "cpu"


def test_layers_override_in_order(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text(
        'preset = "cpu-small"\n[training]\nlr = 3e-4\nbatch_size = 8\nseed = 5\n', encoding="utf-8"
    )
    env = {"FEDSYNTH_TRAINING__BATCH_SIZE": "16", "FEDSYNTH_TRAINING__SEED": "6"}
    config = load_config(file, overrides=["training.seed=7"], environ=env)
    assert config.data.image_size == 64  # preset named in the file
    assert config.training.lr == 3e-4  # file beats preset and defaults
    assert config.training.batch_size == 16  # env beats file
    assert config.training.seed == 7  # CLI beats env
    assert config.sources["training.lr"] == f"file {file}"
    assert config.sources["training.batch_size"] == "env FEDSYNTH_TRAINING__BATCH_SIZE"
    assert config.sources["training.seed"] == "--set training.seed=7"
    assert config.sources["data.image_size"] == "preset cpu-small"


def test_cli_preset_beats_the_file_preset(tmp_path: Path) -> None:
    file = tmp_path / "run.toml"
    file.write_text('preset = "cpu-small"\n', encoding="utf-8")
    assert load_config(file, preset="gpu-paper", environ={}).data.image_size == 256


def test_config_file_from_environment(tmp_path: Path) -> None:
    file = tmp_path / "env.toml"
    file.write_text("[federation]\nrounds = 42\n", encoding="utf-8")
    assert load_config(environ={"FEDSYNTH_CONFIG": str(file)}).federation.rounds == 42


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1e-4", 1e-4), ("true", True), ("[2, 2, 2]", [2, 2, 2]), ("cuda:1", "cuda:1"), ("7", 7)],
)
def test_parse_value(text: str, expected: object) -> None:
    assert parse_value(text) == expected


def test_invalid_value_names_key_value_source_and_rule() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["training.lr=-1"], environ={})
    (issue,) = info.value.issues
    assert issue.key == "training.lr"
    assert issue.found == -1
    assert issue.source == "--set training.lr=-1"
    assert "greater than 0" in issue.allowed
    assert "training.lr = -1 (from --set training.lr=-1): Input should be greater than 0" in str(
        info.value
    )


def test_invalid_choice_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"FEDSYNTH_TRAINING__GAN_LOSS": "wasserstein"})
    message = str(info.value)
    assert "training.gan_loss = 'wasserstein'" in message
    assert "env FEDSYNTH_TRAINING__GAN_LOSS" in message
    assert "'lsgan', 'vanilla' or 'hinge'" in message


def test_unknown_field_lists_the_fields_of_its_section() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["training.learning_rate=0.1"], environ={})
    (issue,) = info.value.issues
    assert issue.key == "training.learning_rate"
    assert "unknown field" in issue.allowed and "lr" in issue.allowed


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(
        '[data]\ndirection = "T1w->T1w"\nimage_size = 3\n[training]\ndevice = "gpu"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(file, environ={})
    keys = {issue.key for issue in info.value.issues}
    assert keys == {"data.direction", "data.image_size", "training.device"}
    assert all(issue.source == f"file {file}" for issue in info.value.issues)


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="either noise_multiplier or target_epsilon"):
        load_config(
            overrides=["privacy.noise_multiplier=1.0", "privacy.target_epsilon=8"], environ={}
        )
    with pytest.raises(ConfigError, match="needs noise_multiplier or target_epsilon"):
        load_config(overrides=["privacy.enabled=true"], environ={})
    with pytest.raises(ConfigError, match="subjects lists 2 sites but num_sites is 4"):
        load_config(overrides=["simulation.subjects=[3, 1]"], environ={})
    with pytest.raises(ConfigError, match="decay_epochs"):
        load_config(overrides=["training.epochs=5", "training.decay_epochs=9"], environ={})


def test_bad_files_and_presets_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[training\nlr = 1", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, environ={})
    with pytest.raises(ConfigError, match="unknown preset; allowed: cpu-small, gpu-paper"):
        load_config(preset="tpu-huge", environ={})


def test_direction_is_normalised() -> None:
    assert load_config(overrides=["data.direction=t1->flair"], environ={}).data.direction == (
        "T1w->FLAIR"
    )


def test_resolved_config_round_trips_and_marks_differences(tmp_path: Path) -> None:
    config = load_config(
        preset="cpu-small",
        overrides=["training.lr=1e-3", "privacy.enabled=true", "privacy.target_epsilon=8"],
        environ={},
    )
    path = write_resolved_config(config, tmp_path / "run")
    assert path.name == RESOLVED_CONFIG_NAME
    text = path.read_text(encoding="utf-8")
    assert "#   training.lr = 0.001 (default 0.0002; --set training.lr=1e-3)" in text
    assert "data.image_size = 64 (default 256; preset cpu-small)" in text
    assert "training.beta1" not in text.split("\n\n")[0]  # unchanged values are not flagged
    reloaded = load_config(path, environ={})
    assert reloaded.model_dump() == config.model_dump()
    assert tomllib.loads(text)["privacy"]["target_epsilon"] == 8
    assert dumps_config(reloaded).split("\n\n", 1)[1] == text.split("\n\n", 1)[1]


def test_dp_sites_train_at_privacy_lr_and_everything_else_at_training_lr() -> None:
    private = ["privacy.enabled=true", "privacy.noise_multiplier=1", "privacy.lr=1e-4"]
    assert load_config(overrides=private, environ={}).site_lr == 1e-4
    off = load_config(overrides=["privacy.lr=1e-4", "training.lr=3e-4"], environ={})
    assert off.site_lr == 3e-4  # privacy off: privacy.lr does not apply
    site = load_config(overrides=[*private, "privacy.level=site"], environ={})
    assert site.site_lr == site.training.lr  # site-level DP has no DP-SGD at the sites


def test_the_phantom_warm_start_is_on_by_default_under_dp_sgd_only(tmp_path: Path) -> None:
    dp = ["privacy.enabled=true", "privacy.noise_multiplier=1"]

    def warm(*overrides: str) -> bool:
        return load_config(overrides=list(overrides), environ={}).phantom_warm_start

    assert warm(*dp) and warm(*dp, "privacy.level=example")
    assert not warm() and not warm(*dp, "privacy.level=site")
    assert not warm(*dp, "federation.warm_start=none")
    assert warm("federation.warm_start=phantom")  # also without DP, when asked
    assert not warm(*dp, f"federation.initial_generators={tmp_path}")  # a start was given
