"""Settings: defaults -> YAML -> overrides, errors that name the field and value, no secrets in dumps."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distcls.config import (DemoConfig, EvaluateConfig, LabelConfig, StorageConfig, TrainConfig, load_config,
                            public_dict)
from distcls.errors import UsageError
from distcls.models import list_models

CANARY = "testing-secret-canary-7f3a9"  # conftest's AWS_SECRET_ACCESS_KEY
REQUIRED = {"input": "lake", "output": "out"}


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def _error(cls, path: str | None = None, overrides: dict | None = None) -> str:
    with pytest.raises(UsageError) as info:
        load_config(cls, path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert CANARY not in message
    return message


def test_defaults_then_yaml_then_overrides(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "input: s3://bucket/lake\noutput: runs/a\nepochs: 3\nlr: 0.05\n")
    default_batch = TrainConfig.model_fields["batch_size"].default

    config = load_config(TrainConfig, path, {"epochs": 7, "lr": None, "output": "runs/b"})

    assert config.input == "s3://bucket/lake"  # YAML only
    assert config.epochs == 7 and config.output == "runs/b"  # override beats YAML
    assert config.lr == 0.05  # an override of None means "flag not given": YAML stays
    assert config.batch_size == default_batch  # default where neither says anything


def test_cli_strings_are_coerced_to_field_types() -> None:
    config = load_config(TrainConfig, None, {**REQUIRED, "epochs": "5", "lr": "0.1", "gpu": "true"})
    assert (config.epochs, config.lr, config.gpu) == (5, 0.1, True)


def test_empty_yaml_means_defaults(tmp_path: Path) -> None:
    config = load_config(LabelConfig, _yaml(tmp_path, ""), {"model": "m", "output": "o", "extensions": ["JPG", ".Png"]})
    assert config.top_k == LabelConfig.model_fields["top_k"].default
    assert config.extensions == [".jpg", ".png"]


def test_unknown_field_in_yaml_is_named_with_the_file(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "input: x\noutput: y\nepoch: 3\n")
    message = _error(TrainConfig, path)
    assert "unknown field 'epoch'" in message and path in message


def test_unknown_field_in_overrides_is_named() -> None:
    message = _error(EvaluateConfig, None, {"input": "d", "model": "m", "bach_size": 4})
    assert "unknown field 'bach_size'" in message


@pytest.mark.parametrize("field, value, expected", [
    ("epochs", -1, "greater than or equal to 1"),
    ("batch_size", "many", "valid integer"),
    ("val_fraction", 1.0, "less than 1"),
    ("endpoint_url", "localhost:9000", "must start with http:// or https://"),
])
def test_bad_value_names_field_and_value(field: str, value: object, expected: str) -> None:
    message = _error(TrainConfig, None, {**REQUIRED, field: value})
    assert f"--{field.replace('_', '-')}:" in message and repr(value) in message and expected in message


def test_unknown_arch_lists_the_known_ones() -> None:
    for cls, overrides in ((TrainConfig, REQUIRED), (DemoConfig, {})):
        message = _error(cls, None, {**overrides, "arch": "resnet9000"})
        assert "--arch:" in message and "'resnet9000'" in message
        assert all(name in message for name in list_models())


def test_every_missing_required_field_is_named() -> None:
    message = _error(TrainConfig, None, {"epochs": 2})
    assert "--input is required" in message and "--output is required" in message


@pytest.mark.parametrize("text, kind", [("- data\n- output\n", "list"), ("just a string\n", "str")])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    message = _error(TrainConfig, _yaml(tmp_path, text))
    assert "must hold a mapping" in message and kind in message


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    message = _error(TrainConfig, _yaml(tmp_path, "input: [unclosed\noutput: y\n"))
    assert "not valid YAML" in message


def test_missing_config_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert _error(TrainConfig, missing) == f"config file not found: {missing}"


def test_storage_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.local:9000")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert StorageConfig().endpoint_url == "http://minio.local:9000"
    assert StorageConfig().region == "eu-central-1"
    explicit = load_config(TrainConfig, None, {**REQUIRED, "endpoint_url": "https://s3.example.com"})
    assert explicit.endpoint_url == "https://s3.example.com"
    assert explicit.storage() == StorageConfig(endpoint_url="https://s3.example.com", region="eu-central-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert StorageConfig().endpoint_url is None


def test_max_attempts_comes_from_aws_max_attempts_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert StorageConfig().max_attempts == 8
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert load_config(LabelConfig, None, {"model": "m", "output": "o"}).storage().max_attempts == 3
    assert load_config(LabelConfig, None, {"model": "m", "output": "o", "max_attempts": "5"}).max_attempts == 5
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "lots")
    message = _error(LabelConfig, None, {"model": "m", "output": "o"})
    assert "--max-attempts" in message and "lots" in message
    assert "--max-attempts" in _error(LabelConfig, None, {"model": "m", "output": "o", "max_attempts": "0"})


def test_public_dict_holds_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-canary-1b2c")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == CANARY
    for config in (load_config(TrainConfig, None, REQUIRED),
                   load_config(LabelConfig, None, {"model": "m", "output": "o"}),
                   load_config(EvaluateConfig, None, {"input": "d", "model": "m"}),
                   load_config(DemoConfig)):
        dumped = json.dumps(public_dict(config))
        assert CANARY not in dumped and "session-token-canary" not in dumped and os.environ["AWS_ACCESS_KEY_ID"] not in dumped
        assert not any(k in dumped.lower() for k in ("secret", "access_key", "token", "password"))
        assert json.loads(dumped) == public_dict(config)  # plain JSON, round-trips


def test_credentials_cannot_be_config_fields() -> None:
    message = _error(TrainConfig, None, {**REQUIRED, "aws_secret_access_key": "typed-secret-canary-99"})
    assert "unknown field 'aws_secret_access_key'" in message
    assert "typed-secret-canary-99" not in message  # an unknown field's value is never echoed


def test_train_defaults_are_the_default_archs_recipe_and_another_arch_brings_its_own(tmp_path: Path) -> None:
    from distcls.models import recipe

    fields = TrainConfig.model_fields
    default_arch = fields["arch"].default
    # The field defaults are written out in config.py (no torch import for --help): they must be the recipe.
    assert {name: fields[name].default for name in recipe(default_arch)} == recipe(default_arch)
    assert TrainConfig(**REQUIRED).model_dump(include=set(recipe(default_arch))) == recipe(default_arch)
    small = TrainConfig(**REQUIRED, arch="resnet_small")
    assert small.model_dump(include=set(recipe("resnet_small"))) == recipe("resnet_small") != recipe(default_arch)
    # What is given wins over the recipe: a flag, a YAML key, the old --model spelling.
    assert load_config(TrainConfig, None, {**REQUIRED, "arch": "resnet_small", "lr": 0.07}).lr == 0.07
    path = _yaml(tmp_path, "arch: resnet_small\nbatch_size: 96\n")
    config = load_config(TrainConfig, path, REQUIRED)
    assert (config.batch_size, config.epochs) == (96, recipe("resnet_small")["epochs"])
    assert TrainConfig(**REQUIRED, model="resnet_small").epochs == recipe("resnet_small")["epochs"]
