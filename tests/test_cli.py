"""The ``distcls`` command: flags generated from the settings classes, exit codes, one-line errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distcls import cli
from distcls.config import LabelConfig, TrainConfig
from distcls.errors import JobError, UsageError

SUBCOMMANDS = ("train", "evaluate", "label", "runs", "models", "export", "demo")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*args], capture_output=True, text=True, timeout=60)


def test_console_script_help_lists_every_subcommand() -> None:
    script = Path(sys.executable).parent / "distcls"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    done = _run(str(script), "--help")
    assert done.returncode == 0
    assert all(name in done.stdout for name in SUBCOMMANDS)


def test_python_dash_m_works_and_exit_code_2_reaches_the_shell() -> None:
    done = _run(sys.executable, "-m", "distcls", "--help")
    assert done.returncode == 0 and all(name in done.stdout for name in SUBCOMMANDS)

    done = _run(sys.executable, "-m", "distcls", "train", "--input", "lake", "--output", "out", "--epochs", "0")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "distcls train: error: invalid TrainConfig: --epochs: Input should be greater than or equal to 1 (got '0')"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_shows_config_and_every_field(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    settings = cli.COMMANDS[command][0]
    assert "--config FILE" in out
    positional = getattr(settings, "positional", ())
    for field, info in settings.model_fields.items():
        name = info.alias or field
        assert (name if field in positional else "--" + name.replace("_", "-")) in out, field


@pytest.mark.parametrize("argv, expected", [
    (["train", "--input", "d", "--output", "o", "--learning-rate", "3"], "unrecognized arguments: --learning-rate 3"),
    (["label", "--model", "m", "--output", "o", "--gpu=yes"], "ignored explicit argument 'yes'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required"),
])
def test_argparse_usage_errors_exit_2(argv: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0]


@pytest.mark.parametrize("argv, expected", [
    (["train", "--output", "o"], "--input is required"),
    (["train", "--input", "d", "--output", "o", "--batch-size", "lots"], "--batch-size:"),
    (["train", "--input", "d", "--output", "o", "--arch", "resnet9000"], "unknown architecture 'resnet9000'"),
    (["demo", "--arch", "resnet9000"], "unknown architecture 'resnet9000'"),
    (["evaluate", "--input", "d", "--model", "m", "--endpoint-url", "minio:9000"], "--endpoint-url:"),
    (["label", "--model", "m", "--output", "o", "--top-k", "0"], "--top-k:"),
])
def test_bad_values_exit_2_with_one_line_naming_the_field(argv: list[str], expected: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distcls {argv[0]}: error: ") and expected in lines[0]


@pytest.fixture()
def captured_config(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace every job with one that records the config it was given."""
    seen: dict[str, Any] = {}

    def fake(config: Any) -> dict[str, Any]:
        seen["config"] = config
        return {"ok": True, "path": Path("/x")}

    for name, (settings, _, help_text) in list(cli.COMMANDS.items()):
        monkeypatch.setitem(cli.COMMANDS, name, (settings, fake, help_text))
    return seen


def test_flags_map_to_typed_fields(captured_config: dict, capsys: pytest.CaptureFixture) -> None:
    argv = ["label", "--input", "s3://b/lake", "--model", "s3://b/model", "--output", "out", "--extensions", "JPG",
            "png", "--gpu", "--no-overwrite", "--top-k", "3", "--endpoint-url", "http://127.0.0.1:9000"]
    assert cli.main(argv) == 0
    config = captured_config["config"]
    assert isinstance(config, LabelConfig)
    assert config.extensions == [".jpg", ".png"] and config.gpu is True and config.overwrite is False
    assert config.top_k == 3 and config.endpoint_url == "http://127.0.0.1:9000"
    assert json.loads(capsys.readouterr().out) == {"ok": True, "path": "/x"}  # the job's result, as JSON


def test_flags_override_the_config_file(tmp_path: Path, captured_config: dict) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("input: s3://b/lake\noutput: runs/a\nepochs: 3\nlr: 0.05\ngpu: true\n")
    assert cli.main(["train", "--config", str(path), "--epochs", "9", "--no-gpu"]) == 0
    config = captured_config["config"]
    assert isinstance(config, TrainConfig)
    assert (config.input, config.epochs, config.lr, config.gpu) == ("s3://b/lake", 9, 0.05, False)


def test_unknown_key_in_config_file_exits_2(tmp_path: Path, captured_config: dict, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("input: d\noutput: o\nlearning_rate: 0.1\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    assert "config" not in captured_config
    assert "unknown field 'learning_rate'" in capsys.readouterr().err


@pytest.mark.parametrize("error, code, text", [
    (UsageError("s3://b/lake: not found"), 2, "distcls evaluate: error: s3://b/lake: not found"),
    (JobError("2 of 2 workers died"), 1, "distcls evaluate: failed: 2 of 2 workers died"),
    (RuntimeError("boom\nsecond line"), 1, "distcls evaluate: failed: RuntimeError: boom (set DISTCLS_DEBUG=1 for the traceback)"),
])
def test_job_failures_map_to_exit_codes(error: Exception, code: int, text: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    def failing(config: Any) -> dict[str, Any]:
        raise error

    monkeypatch.delenv("DISTCLS_DEBUG", raising=False)
    settings, _, help_text = cli.COMMANDS["evaluate"]
    monkeypatch.setitem(cli.COMMANDS, "evaluate", (settings, failing, help_text))
    assert cli.main(["evaluate", "--input", "d", "--model", "m"]) == code
    assert capsys.readouterr().err.splitlines() == [text]

    if code == 1 and not isinstance(error, JobError):
        monkeypatch.setenv("DISTCLS_DEBUG", "1")
        with pytest.raises(RuntimeError):
            cli.main(["evaluate", "--input", "d", "--model", "m"])


def test_version_and_models_commands(capsys: pytest.CaptureFixture) -> None:
    from distcls.models import list_models

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("distcls ")
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[::2]] == list_models()
    assert all(line.split()[0] == "defaults:" for line in lines[1::2])


def test_a_comma_separated_list_flag_is_split() -> None:
    from distcls.config import load_config

    config = load_config(LabelConfig, None, {"model": "m", "output": "o", "extensions": ["jpg,PNG", ".webp"]})
    assert config.extensions == [".jpg", ".png", ".webp"]
    with pytest.raises(UsageError, match="--extensions"):
        load_config(LabelConfig, None, {"model": "m", "output": "o", "extensions": [","]})


def test_every_flag_the_readme_cli_section_shows_exists(capsys: pytest.CaptureFixture) -> None:
    """README's usage lines are checked against each command's --help, so the docs cannot drift."""
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## CLI", 1)[1].split("\n## ", 1)[0]
    flags: dict[str, set[str]] = {}
    command = None
    for line in (line.strip() for line in section.splitlines() if line.startswith("    ")):
        named = re.match(r"distcls (\w+)|(POOL FLAGS)", line)
        if named:
            command = named.group(1) or "pool"
        flags.setdefault(command, set()).update(re.findall(r"--[a-z][a-z0-9-]*", line))
    pool = flags.pop("pool")
    assert set(flags) == set(cli.COMMANDS)
    for command, names in flags.items():
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        shown = capsys.readouterr().out
        wanted = names | (pool if command in ("evaluate", "label") else set())
        assert [flag for flag in sorted(wanted) if flag not in shown] == [], command


def test_old_spellings_still_work_and_warn(tmp_path: Path, captured_config: dict, capsys: pytest.CaptureFixture) -> None:
    """train's --data/--val-data/--model and the YAML keys data/model: the new fields, one warning each."""
    assert cli.main(["train", "--data", "lake", "--val-data", "held", "--model", "simple_cnn", "--output", "o"]) == 0
    config = captured_config["config"]
    assert (config.input, config.val_input, config.arch) == ("lake", "held", "simple_cnn")
    warnings = capsys.readouterr().err.splitlines()
    assert warnings == [f"distcls: warning: {old} is deprecated, use {new} (YAML key {key!r} for {old_key!r})"
                        for old, new, key, old_key in (("--data", "--input", "input", "data"),
                                                       ("--val-data", "--val-input", "val_input", "val_data"),
                                                       ("--model", "--arch", "arch", "model"))]
    path = tmp_path / "evaluate.yaml"
    path.write_text("data: lake\nmodel: runs/a/model\n")
    assert cli.main(["evaluate", "--config", str(path)]) == 0
    assert captured_config["config"].input == "lake" and captured_config["config"].model == "runs/a/model"
    assert capsys.readouterr().err.splitlines() == [
        "distcls: warning: --data is deprecated, use --input (YAML key 'input' for 'data')"]


def test_old_and_new_spelling_together_exit_2(captured_config: dict, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", "--data", "a", "--input", "b", "--output", "o"]) == 2
    assert "config" not in captured_config
    assert capsys.readouterr().err.splitlines() == [
        "distcls train: error: --data is the deprecated spelling of --input; give only --input"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_shows_the_required_flags_apart(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    shown = capsys.readouterr().out
    settings = cli.COMMANDS[command][0]
    positional = getattr(settings, "positional", ())
    required = {"--" + field.replace("_", "-") for field, info in settings.model_fields.items()
                if info.is_required() and field not in positional}
    section = shown.split("required (as flags or in --config):")[1].split("\n\n")[0] if required else ""
    listed = set(re.findall(r"^  (--[a-z-]+)", section, flags=re.MULTILINE))
    assert listed == required
    assert {"train": {"--input", "--output"}, "evaluate": {"--input", "--model"},
            "label": {"--model", "--output"}, "export": {"--model"}}.get(command, set()) == required


def test_verbose_shows_debug_lines_before_or_after_the_command(captured_config: dict,
                                                               capsys: pytest.CaptureFixture) -> None:
    argv = ["label", "--input", "lake", "--model", "m", "--output", "o"]
    assert cli.main(argv) == 0
    assert "DEBUG" not in capsys.readouterr().err
    try:
        for verbose in (["--verbose", *argv], [*argv, "--verbose"], ["-v", *argv]):
            assert cli.main(verbose) == 0
            out, err = capsys.readouterr()
            assert json.loads(out) == {"ok": True, "path": "/x"}
            assert re.search(r"DEBUG distcls\.cli: label settings: \{.*\"input\":\"lake\"", err), err
    finally:
        from distcls import console

        console.configure(verbose=False)  # as the next test's library calls expect


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_output_reaches_the_driver_only_with_verbose(verbose: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the CLI asks of ray.init: worker/actor logs forwarded (log_to_driver) and Ray's driver
    loggers below ERROR only with --verbose."""
    import logging

    import ray

    from distcls import console, runtime

    seen: dict[str, Any] = {}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    console.configure(verbose=verbose)
    try:
        runtime.ensure_ray()
    finally:
        console.configure(verbose=False)
    assert seen["log_to_driver"] is verbose
    assert seen["logging_level"] == (logging.DEBUG if verbose else logging.ERROR)


def test_a_new_flag_overrides_an_old_yaml_key(tmp_path: Path, captured_config: dict, capsys: pytest.CaptureFixture) -> None:
    """A YAML written for the old spellings (data:, model:) still takes the new flags over it, as flags override files."""
    path = tmp_path / "train.yaml"
    path.write_text("data: old-lake\nmodel: resnet18\noutput: o\n")
    assert cli.main(["train", "--config", str(path), "--input", "new-lake", "--arch", "simple_cnn"]) == 0
    config = captured_config["config"]
    assert (config.input, config.arch, config.output) == ("new-lake", "simple_cnn", "o")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("flag", ["--lr", "--weight-decay"])
def test_an_infinite_optimiser_setting_is_a_usage_error(flag: str, captured_config: dict,
                                                        capsys: pytest.CaptureFixture) -> None:
    """--lr inf passed (inf > 0) and trained a garbage model that exited 0."""
    assert cli.main(["train", "--input", "lake", "--output", "o", flag, "inf"]) == 2
    captured = capsys.readouterr()
    assert "config" not in captured_config and captured.out == ""
    assert captured.err.startswith(f"distcls train: error: invalid TrainConfig: {flag}: ") and "'inf'" in captured.err


@pytest.mark.parametrize("verbose", [False, True])
def test_what_ray_prints_on_stdout_while_a_command_runs_goes_to_stderr(verbose: bool, monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """Ray prints what its nodes push to the driver (here its own printer) on sys.stdout, whatever
    log_to_driver says: its raylet warning about worker processes broke the demo's JSON under load.
    That warning, which every training run on a 2-CPU machine gets, shows with --verbose only."""
    from ray._private.worker import print_to_stdstream

    # Other nodes in each case: Ray's printer drops a line it printed a moment ago.
    node = "verbose" if verbose else "quiet"
    startup = (f"WARNING: 8 PYTHON worker processes have been started on node: {node} with address: 10.0.0.1, "
               "which is 4x the maximum expected startup concurrency (2).")
    killed = f"A worker on node {node} died or was killed while executing a task by an unexpected system error."

    def noisy(config: object) -> dict:
        for line in (startup, killed):
            print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        print(f"a line whose end another thread's warning took, {node}: ", end="")  # kept whole, not dropped
        print_to_stdstream({"lines": [startup.replace("8 PYTHON", "16 PYTHON")], "pid": "raylet", "is_err": False},
                           ignore_prefix=False)
        print("an unfinished", end="")
        return {"done": True}

    settings, _, help_text = cli.COMMANDS["models"]
    monkeypatch.setitem(cli.COMMANDS, "models", (settings, noisy, help_text))
    assert cli.main(["--verbose", "models"] if verbose else ["models"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"done": True}  # stdout: the JSON line alone
    assert killed in err and f"a line whose end another thread's warning took, {node}: " in err
    assert err.endswith("an unfinished\n")  # ended, so that what the command prints next starts a line
    assert (startup in err) == verbose
