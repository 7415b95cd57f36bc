"""`ray job submit` semantics against a real `ray start --head`: the label job entrypoint runs on
the cluster from an uploaded working dir, reads a lake from the test S3 server, writes Parquet."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, start_ray_head


@pytest.fixture()
def ray_head(no_ray):
    """A Ray head of its own (not this test process's Ray), with 2 CPUs; yields its dashboard
    address and a job client."""
    head = start_ray_head("--num-cpus=2")
    try:
        yield head.dashboard, _client(head.dashboard)
    finally:
        head.stop()


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
