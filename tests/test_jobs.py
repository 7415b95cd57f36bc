"""`ray job submit` semantics against a real `ray start --head`: the label job entrypoint runs on
the cluster from an uploaded working dir, reads a lake from the test S3 server, writes Parquet."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, free_port


@pytest.fixture()
def ray_head(no_ray):
    """A Ray head of its own (not this test process's Ray), stopped by killing its process group
    so that no other Ray on the machine is touched (`ray stop` would stop them all). It inherits
    the session's token authentication settings from conftest."""
    gcs_port, dashboard_port = free_port(), free_port()
    # The agents' default ports are fixed: this test process's own Ray may hold them already, and
    # a head whose agent cannot bind answers every submission with "No available agent".
    agent_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port")]
    # Short and outside pytest's deep tmp path: Ray's unix sockets live under it (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--num-cpus=2",
         f"--port={gcs_port}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
         "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
         f"--temp-dir={temp_dir}", *agent_ports],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # `python` in a job's entrypoint is the head's: this environment's interpreter, as in the image.
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        yield address, _client(address)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)  # a head of this test's own: no need to wait for a graceful stop
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _client(address: str, timeout: float = 180):
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + timeout
    while True:
        try:
            return JobSubmissionClient(address)
        except ConnectionError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def _submit(client, timeout: float = 120, **job) -> str:
    """The head's job agent starts a little after its HTTP server; until then submission says so."""
    deadline = time.time() + timeout
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def _wait(client, job_id: str, timeout: float = 300) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(2)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s:\n{client.get_job_logs(job_id)[-3000:]}")


@pytest.mark.slow
def test_label_job_submitted_to_a_ray_head(ray_head, tiny_model, synthetic_lake, upload_folder, s3_bucket, s3_endpoint):
    address, client = ray_head
    lake = upload_folder(synthetic_lake(3, labelled=False), f"{s3_bucket}/lake")
    model = upload_folder(Path(tiny_model), f"{s3_bucket}/model")
    output = f"s3://{s3_bucket}/labels"
    job_id = _submit(
        client,
        entrypoint=f"python jobs/label.py --config jobs/configs/nightly_label.yaml "
                   f"--input {lake} --model {model} --output {output}",
        runtime_env={
            "working_dir": str(REPO),
            "excludes": [".venv", ".git", "**/__pycache__", "tests"],
            # Test-only credentials for the local S3 server; on a real cluster they come from the
            # nodes' instance profile / IRSA or a Secret, never from the job submission.
            "env_vars": {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                     "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")},
        },
    )
    status = _wait(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in logs

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    rows = pd.read_parquet(f"{s3_bucket}/labels", filesystem=fs)
    listed = {f"s3://{p}" for p in fs.find(f"{s3_bucket}/lake")}
    assert sorted(rows["path"]) == sorted(listed)  # every image once
    assert rows["error"].isna().all()
    assert yaml.safe_load((REPO / "jobs/configs/nightly_label.yaml").read_text())["incremental"] is True
    assert rows["run"].nunique() == 1  # the nightly config writes one run=<id>/ partition per run
