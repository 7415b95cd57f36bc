"""Security: no code runs from weights or images, no credentials anywhere they could leak, manifests
confined to their allowed roots, and pods that meet Kubernetes' restricted profile.

Covered elsewhere, and not repeated here: malicious pickles planted as model.safetensors or given to
``load_state_dict`` (test_artifact.py), unknown config fields and credentials as config fields
(test_config.py, test_cli.py), non-root containers, token auth, private dashboards and literal
secrets in k8s/ and cluster/ (test_k8s.py, test_cluster_configs.py), the canary absent from an S3
label run's ``_SUCCESS`` (test_label.py), model.json tampering (test_artifact.py).
"""
from __future__ import annotations

import builtins
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from distcls.cli import main
from distcls.config import LabelConfig
from distcls.images import ImageError, decode
from distcls.label import label

REPO = Path(__file__).resolve().parents[1]
CANARY = "testing-secret-canary-7f3a9"  # conftest's AWS_SECRET_ACCESS_KEY
# A canary in every credential field (moto accepts any keys and ignores the token).
CANARIES = {"AWS_ACCESS_KEY_ID": "keyid-canary-3c1e8", "AWS_SECRET_ACCESS_KEY": CANARY,
            "AWS_SESSION_TOKEN": "token-canary-5d27b"}
USERINFO = ("userinfo-canary-9a4f", "pass/canary+0b6d")  # the secret holds '/', as AWS secret keys may


# ---------------------------------------------------------------------------------------------
# No code from weights, checkpoints or images


class _CreatesFile:
    """Unpickling this calls open(path, "w"): the shape of any code-execution payload."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _torch_payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"conv.weight": _CreatesFile(marker)}, buffer)
    return buffer.getvalue()


# Calls that deserialise arbitrary objects; the package may only use the restricted forms.
_UNSAFE_CALLS = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bcloudpickle\.loads?\("), "cloudpickle.load"),
    (re.compile(r"\bjoblib\.load\("), "joblib.load"),
    (re.compile(r"\byaml\.(unsafe_)?load\("), "yaml.load (use safe_load)"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),
]


def _unsafe_calls(text: str) -> list[str]:
    found = [name for pattern, name in _UNSAFE_CALLS if pattern.search(text)]
    for call in re.finditer(r"(?<![\w.])torch\.load\(([^()]|\([^()]*\))*\)", text):
        if "weights_only=True" not in call.group(0):
            found.append(f"{call.group(0)} without weights_only=True")
    return found


def test_the_package_never_deserialises_with_unrestricted_pickle() -> None:
    found = {f.name: _unsafe_calls(f.read_text()) for f in sorted((REPO / "distcls").glob("*.py"))}
    assert {name: calls for name, calls in found.items() if calls} == {}
    planted = ("state = torch.load(path, map_location=open('x').name)\npickle.loads(b)\nyaml.load(t)\n"
               "np.load(f, allow_pickle=True)\neval(s)\nsafetensors.torch.load(b)\n")
    assert len(_unsafe_calls(planted)) == 5  # the scan itself works; safetensors' load is fine


@pytest.mark.parametrize("name", ["init.pt", "init.safetensors"])
def test_malicious_init_weights_are_refused_before_training_starts(tmp_path: Path, synthetic_lake, capsys,
                                                                    name: str) -> None:
    """Refused on the driver, before the lake is split, Ray started or anything written: not a
    worker failure that Ray Train would retry --max-failures times."""
    marker = tmp_path / "pwned"
    weights = tmp_path / name
    weights.write_bytes(_torch_payload(marker))
    output = tmp_path / "run"
    started = time.monotonic()
    code = main(["train", "--input", str(synthetic_lake(3)), "--output", str(output), "--init-weights", str(weights),
                 "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{weights}: " in err and ("refused to load weights" in err or "not a safetensors file" in err)
    assert not marker.exists() and not output.exists()
    assert time.monotonic() - started < 10


def test_a_planted_checkpoint_state_is_never_unpickled(tmp_path: Path) -> None:
    """What a resumed run loads from a checkpoint folder (which lives in the output bucket,
    writable by more people than the code) goes through the same restricted unpickler."""
    import ray.train

    from distcls.train import STATE_FILE, _restore

    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / STATE_FILE).write_bytes(_torch_payload(marker))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _restore(ray.train.Checkpoint.from_directory(str(folder)))
    assert not marker.exists()


def _saveable_formats_outside_the_allowlist() -> dict[str, bytes]:
    """Real files of formats Pillow can open but distcls does not accept, each named .jpg."""
    rgb = Image.new("RGB", (16, 16), (200, 30, 30))
    files = {}
    for fmt, image in (("PPM", rgb), ("ICO", rgb), ("TGA", rgb), ("PCX", rgb), ("SGI", rgb), ("IM", rgb),
                       ("DDS", rgb.convert("RGBA")), ("QOI", rgb), ("XBM", rgb.convert("1")),
                       ("MSP", rgb.convert("1")), ("SPIDER", rgb.convert("F")), ("PDF", rgb)):
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        files[f"{fmt.lower()}-named.jpg"] = buffer.getvalue()
    files["eps-named.jpg"] = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
                              b"(%pipe%touch /tmp/distcls-pwned) (w) file\nshowpage\n%%EOF\n")
    return files


def test_decoding_opens_only_the_supported_formats_and_never_runs_a_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow would hand an EPS to Ghostscript (a long line of sandbox escapes) whatever the
    file is called, and knows ~35 rarely used formats; decode accepts only JPEG, PNG, GIF, BMP,
    TIFF and WebP, so none of those parsers ever sees a lake's bytes."""
    launched = []

    def no_programs(*args, **kwargs):
        launched.append(args)
        raise AssertionError(f"a decoder tried to run {args}")

    monkeypatch.setattr(subprocess, "Popen", no_programs)
    monkeypatch.setattr(subprocess, "check_call", no_programs)
    for name, data in _saveable_formats_outside_the_allowlist().items():
        with pytest.raises(ImageError, match="^not an image"):
            decode(data, 32)
    assert launched == [] and not Path("/tmp/distcls-pwned").exists()


# ---------------------------------------------------------------------------------------------
# Credentials: never in outputs, logs or errors


def _cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m distcls`` in a subprocess, stdout and stderr captured."""
    return subprocess.run([sys.executable, "-m", "distcls", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def _objects(bucket: str, prefix: str, **keys: str) -> dict[str, bytes]:
    """{key: bytes} of every object under ``prefix``."""
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                          **{name.lower(): value for name, value in keys.items()})
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def _files_holding(folder: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(f) for f in folder.rglob("*") if f.is_file() and not f.is_symlink() and needle in f.read_bytes()]


def test_credentials_never_appear_in_errors(s3_bucket: str, model_uri: str, s3_auth: dict[str, str]) -> None:
    """Failing runs, with the traceback switched on: an endpoint where nothing listens, and keys
    the store rejects (the rejected secret is the canary)."""
    args = ("label", "--input", f"s3://{s3_bucket}/lake", "--model", model_uri, "--output", f"s3://{s3_bucket}/labels")
    with socketless_port() as port:
        unreachable = _cli(*args, "--endpoint-url", f"http://127.0.0.1:{port}", env={"DISTCLS_DEBUG": "1"})
    rejected = _cli(*args, env={"DISTCLS_DEBUG": "1", "AWS_ACCESS_KEY_ID": s3_auth["AWS_ACCESS_KEY_ID"],
                                "AWS_SECRET_ACCESS_KEY": CANARY})
    assert unreachable.returncode == 2 and "endpoint unreachable" in unreachable.stderr
    assert rejected.returncode == 2 and "access denied" in rejected.stderr
    for done in (unreachable, rejected):
        assert CANARY not in done.stdout + done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, no SDK dump
    assert _objects(s3_bucket, "labels/", **s3_auth) == {}


class socketless_port:
    """A bound 127.0.0.1 port that nothing listens on (connections are refused)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_credentials_never_appear_in_train_evaluate_and_label_runs_on_s3(no_ray, s3_bucket: str, upload_folder,
                                                                       synthetic_lake) -> None:
    """A canary in every credential variable (key id, secret, session token) of every process:
    train (1 epoch), evaluate and label on S3 through the CLI. None may reach stdout, stderr or any
    object written (model.json, metrics.jsonl, checkpoints, Ray Train's state, which could pickle
    the S3 filesystem, the report, _SUCCESS, Parquet), nor a file of the Rays they start (their
    own, under RAY_TMPDIR, so that every log file can be searched and every worker has the canaries)."""
    lake = upload_folder(synthetic_lake(10), f"{s3_bucket}/lake")
    run = f"s3://{s3_bucket}/run"
    ray_tmp = Path(f"/tmp/rs{os.getpid()}")  # short: Ray's socket paths are limited
    env = {**CANARIES, "RAY_TMPDIR": str(ray_tmp)}
    try:
        runs = [_cli("train", "--input", lake, "--output", run, "--epochs", "1", "--workers", "1", "--batch-size", "32",
                     "--arch", "simple_cnn", env=env),
                _cli("evaluate", "--input", f"{run}/val.parquet", "--model", f"{run}/model", "--report", f"{run}/report",
                     env=env),
                _cli("label", "--input", f"{lake}/circle", "--model", f"{run}/model", "--output", f"{run}/labels",
                     env=env)]
        for done in runs:
            assert done.returncode == 0, done.stderr[-3000:]
        written = _objects(s3_bucket, "run/")
        expected = ["run/model/model.json", "run/metrics.jsonl", "run/report/metrics.json", "run/labels/_SUCCESS"]
        assert all(key in written for key in expected), sorted(written)
        assert any("checkpoint" in k for k in written) and any(k.startswith("run/labels/part-") for k in written)
        labels = [v for k, v in written.items() if k.startswith("run/labels/part-")]
        assert sum(pq.read_table(pa.BufferReader(v)).num_rows for v in labels) == 10
        for canary in CANARIES.values():
            assert [k for k, v in written.items() if canary.encode() in v] == []
            assert [i for i, done in enumerate(runs) if canary in done.stdout + done.stderr] == []
            assert _files_holding(ray_tmp, canary) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


_BAD_URIS = {
    "--endpoint-url": f"https://{USERINFO[0]}:{USERINFO[1]}@127.0.0.1:9",
    "$AWS_ENDPOINT_URL": f"http://{USERINFO[0]}:{USERINFO[1]}@127.0.0.1:9",
    "user only": f"http://{USERINFO[0]}@127.0.0.1:9",
    "no scheme": f"{USERINFO[0]}:{USERINFO[1]}@127.0.0.1:9",
    "data URI": f"s3://{USERINFO[0]}:{USERINFO[1]}@bucket/lake",
}


@pytest.mark.parametrize("case", sorted(_BAD_URIS))
@pytest.mark.parametrize("command", ["train", "evaluate", "label"])
def test_credentials_in_a_uri_are_refused_and_never_echoed(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path,
                                                            command: str, case: str) -> None:
    """Exit 2 at config validation, one line naming the field, the canaries nowhere, nothing written."""
    uri = _BAD_URIS[case]
    out = str(tmp_path / "out")
    argv = {"train": ["--input", "d", "--output", out], "evaluate": ["--input", "d", "--model", "m", "--report", out],
            "label": ["--input", "d", "--model", "m", "--output", out]}[command]
    field = "endpoint_url"
    if case == "$AWS_ENDPOINT_URL":
        monkeypatch.setenv("AWS_ENDPOINT_URL", uri)
    elif case == "data URI":
        argv[1], field = uri, "input"
    else:
        argv += ["--endpoint-url", uri]
    code = main([command, *argv])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured.err
    assert f"--{field.replace('_', '-')}:" in captured.err and "credentials" in captured.err
    assert ("$AWS_ENDPOINT_URL" in captured.err) == (case == "$AWS_ENDPOINT_URL")
    assert not any(part in captured.err for part in (*USERINFO, "canary"))
    assert not Path(out).exists()


# ---------------------------------------------------------------------------------------------
# Manifests confined to allowed roots


def test_manifest_paths_outside_allowed_roots_are_never_opened(ray_local, tmp_path: Path, synthetic_lake,
                                                                model_uri: str) -> None:
    """Absolute, ``..``, relative-to-manifest, file:// and symlinked ways out of the root all
    become "outside allowed roots" rows, and the files they name are never read: their access
    time (relatime updates it on the first read after a change) stays where the test put it."""
    root = tmp_path / "lake"
    shutil.copytree(synthetic_lake(1, labelled=False), root)
    private = tmp_path / "private"
    private.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"):
        shutil.copy(root / "img-000000.jpg", private / name)  # each would label fine
    (root / "link.jpg").symlink_to(private / "e.jpg")
    paths = [str(root / "img-000001.jpg"), str(private / "a.jpg"), f"{root}/../private/b.jpg", "../private/c.jpg",
             f"file://{private}/d.jpg", str(root / "link.jpg")]
    pq.write_table(pa.table({"path": paths}), root / "_manifest.parquet")
    inside, outside = root / "img-000001.jpg", sorted(private.iterdir())
    for file in [inside, *outside]:
        os.utime(file, (0, time.time()))  # atime before mtime: the next read moves it

    summary = label(LabelConfig(manifest=str(root / "_manifest.parquet"), model=model_uri,
                                output=str(tmp_path / "out"), allowed_roots=[str(root)]))
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert rows.pop(str(inside))["error"] is None
    assert len(rows) == 5 and all(r["error"] == "outside allowed roots" and r["label"] is None for r in rows.values())
    assert summary["errors"] == 5
    if os.stat(inside).st_atime == 0:
        pytest.skip("this filesystem does not record access times (noatime); reads cannot be observed")
    assert [f.name for f in outside if os.stat(f).st_atime != 0] == []


# ---------------------------------------------------------------------------------------------
# Kubernetes: the restricted Pod Security Standard, which test_k8s.py checks only in part


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    """https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted: beyond
    test_k8s.py's non-root and no-privilege-escalation checks, every container drops all
    capabilities, every pod runs under the RuntimeDefault seccomp profile, and nothing touches
    the host."""
    from test_k8s import _manifests, pod_specs

    problems = []
    for name, doc in _manifests():
        for where, pod in pod_specs(doc):
            here = f"{name}: {where}"
            pod_seccomp = ((pod.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
            problems += [f"{here}.{key}" for key in ("hostNetwork", "hostPID", "hostIPC") if pod.get(key)]
            problems += [f"{here}: hostPath volume {v['name']}" for v in pod.get("volumes") or [] if "hostPath" in v]
            for container in [*(pod.get("initContainers") or []), *pod["containers"]]:
                security = container.get("securityContext") or {}
                seccomp = (security.get("seccompProfile") or {}).get("type", pod_seccomp)
                if seccomp not in ("RuntimeDefault", "Localhost"):
                    problems.append(f"{here}[{container['name']}]: seccompProfile {seccomp}")
                if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
                    problems.append(f"{here}[{container['name']}]: capabilities.drop must include ALL")
                if security.get("privileged"):
                    problems.append(f"{here}[{container['name']}]: privileged")
    assert problems == []
