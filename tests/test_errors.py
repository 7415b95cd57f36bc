"""The errors people hit first, through the CLI entry point (in a new process where the environment
matters): one clear line naming the thing, exit 2 (their input) or 1 (a job that failed), never a
traceback. Exit codes reaching the shell are tested in test_cli.py."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import free_port
from distcls.cli import main


def _distcls(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The CLI in this process (what the console script calls), for errors that need no other
    environment: a new interpreter would spend ~10 s importing Ray and torch per call."""
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err.strip()


def _distcls_process(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-m", "distcls", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=180)
    return result.returncode, result.stderr.strip()


def _one_clear_line(stderr: str, *must_contain: str) -> None:
    last = stderr.splitlines()[-1]
    assert "Traceback" not in stderr, stderr
    for text in must_contain:
        assert text in last, f"{text!r} not in {last!r}"


def test_wrong_path(tmp_path, tiny_model, capsys) -> None:
    missing = tmp_path / "no-such-lake"
    code, err = _distcls(capsys, "label", "--input", str(missing), "--model", str(tiny_model), "--output", str(tmp_path / "out"))
    assert code == 2
    _one_clear_line(err, str(missing), "not found")


def test_empty_lake(tmp_path, tiny_model, capsys) -> None:
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "README.txt").write_text("no images here")
    code, err = _distcls(capsys, "label", "--input", str(tmp_path / "lake"), "--model", str(tiny_model),
                         "--output", str(tmp_path / "out"))
    assert code == 2
    _one_clear_line(err, str(tmp_path / "lake"), "no images")
    code, err = _distcls(capsys, "train", "--input", str(tmp_path / "lake"), "--output", str(tmp_path / "out"))
    assert code == 2
    _one_clear_line(err, str(tmp_path / "lake"), "no labelled images")


def test_model_uri_that_is_not_an_artifact(tmp_path, synthetic_lake, capsys) -> None:
    (tmp_path / "notamodel").mkdir()
    code, err = _distcls(capsys, "label", "--input", str(synthetic_lake(1, labelled=False)), "--model",
                         str(tmp_path / "notamodel"), "--output", str(tmp_path / "out"))
    assert code == 2
    _one_clear_line(err, str(tmp_path / "notamodel"), "not a distcls model artifact")


def test_unreachable_endpoint(tmp_path, tiny_model, capsys) -> None:
    with __import__("socket").socket() as held:  # bound but not listening: nothing answers there
        held.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{held.getsockname()[1]}"
        code, err = _distcls(capsys, "label", "--input", "s3://lake/images", "--model", str(tiny_model),
                             "--output", str(tmp_path / "out"), "--endpoint-url", endpoint)
    assert code == 2
    _one_clear_line(err, "s3://lake/images", "endpoint unreachable")


def test_no_credentials(tmp_path, tiny_model, s3_bucket, s3_auth, upload_folder, synthetic_lake) -> None:
    lake = f"s3://{s3_bucket}/lake"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")}
    env["HOME"] = str(tmp_path)  # no ~/.aws either
    result = subprocess.run([sys.executable, "-m", "distcls", "label", "--input", lake, "--model", str(tiny_model),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 2
    _one_clear_line(result.stderr.strip(), lake, "no AWS credentials found")


def test_ray_address_not_reachable(tmp_path, tiny_model, synthetic_lake) -> None:
    address = f"127.0.0.1:{free_port()}"
    code, err = _distcls_process("label", "--input", str(synthetic_lake(1, labelled=False)), "--model", str(tiny_model),
                                 "--output", str(tmp_path / "out"), env={"RAY_ADDRESS": address})
    assert code == 2
    _one_clear_line(err, f"RAY_ADDRESS={address}")
