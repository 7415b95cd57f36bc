"""Attacks on ``distcls label`` by a hostile user or an unlucky operator, through the CLI: files
planted in the output, special files where an artifact or a manifest should be, credentials in
manifest rows, stale staged rows, impossible locks. Each test names what must hold."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distcls.cli import main
from distcls.dataset import COMMITTING, LOCK, REPORT, STAGING, SUCCESS

RUN = "20990101T000000Z-aaaaaa"


def _label_args(source: Path | str, model: Path, output: Path | str, *flags: str, manifest: bool = False) -> list[str]:
    return ["label", "--manifest" if manifest else "--input", str(source), "--model", str(model),
            "--output", str(output), *flags]


def _someone_elses_parquet(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": [1, 2, 3]}), path)
    return path.read_bytes()


# ------------------------------------------------------------------------------------------------
# Symlinks planted in the output lead nowhere outside it


def test_a_planted_plan_never_moves_a_file_out_of_the_folder_a_staging_link_leads_to(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    """_staging/<run>/ a symlink to a folder outside the output, and a _COMMITTING (valid by every
    rule of the plan check) moving a file of it into the dataset: the commit would rename that
    file out of its folder into the output (and a later --overwrite delete it)."""
    output, victim = tmp_path / "out", tmp_path / "victim"
    before = _someone_elses_parquet(victim / "data.parquet")
    (output / STAGING).mkdir(parents=True)
    (output / STAGING / RUN).symlink_to(victim)
    final = f"part-{RUN}-00000.parquet"
    (output / COMMITTING).write_text(json.dumps({
        "run_id": RUN, "delete": [], "moves": [[f"{STAGING}/{RUN}/data.parquet", final]], "success": SUCCESS,
        "summary": {"run_id": RUN, "files": [final]}}))

    code = main(_label_args(synthetic_lake(1, labelled=False), tiny_model, output))
    capsys.readouterr()
    assert (victim / "data.parquet").read_bytes() == before
    assert code != 0 and not (output / SUCCESS).exists() and not (output / LOCK).exists()


@pytest.mark.usefixtures("ray_local")
def test_resume_never_deletes_files_in_the_folder_a_staging_link_leads_to(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    """_staging/<run>/ a symlink to someone's folder of Parquet files: --resume takes it for the
    newest staged run and deletes every file in it not made by this model."""
    output, victim = tmp_path / "out", tmp_path / "victim"
    before = _someone_elses_parquet(victim / "important.parquet")
    (output / STAGING).mkdir(parents=True)
    (output / STAGING / RUN).symlink_to(victim)

    main(_label_args(synthetic_lake(1, labelled=False), tiny_model, output, "--resume"))
    capsys.readouterr()
    assert sorted(os.listdir(victim)) == ["important.parquet"]
    assert (victim / "important.parquet").read_bytes() == before


# ------------------------------------------------------------------------------------------------
# Nothing foreign is deleted


@pytest.mark.usefixtures("ray_local")
def test_a_plain_run_deletes_no_parquet_file_that_distcls_did_not_write(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    """A hive-partitioned folder ``run=2024/part-0.parquet`` written by another tool (no _SUCCESS
    in it): a plain run, without --overwrite, must refuse it as foreign (exit 2, naming it) rather
    than delete it as "a partition left by an unfinished run"."""
    output = tmp_path / "out"
    before = _someone_elses_parquet(output / "run=2024" / "part-0.parquet")

    code = main(_label_args(synthetic_lake(1, labelled=False), tiny_model, output))
    err = capsys.readouterr().err
    assert (output / "run=2024" / "part-0.parquet").read_bytes() == before
    assert code == 2 and "run=2024" in err, err


# ------------------------------------------------------------------------------------------------
# Credentials


def test_credentials_in_manifest_rows_are_refused_and_never_written(
        tmp_path: Path, tiny_model: Path, capsys) -> None:
    """README: a URI holding credentials, ``s3://KEY:SECRET@bucket/...`` anywhere, is refused with
    exit 2 and no message shows it. A manifest row is such a place: it must not be copied into
    the path and error columns of the dataset."""
    manifest, output = tmp_path / "manifest.csv", tmp_path / "out"
    manifest.write_text("path\ns3://AKIACANARYKEY:CANARY/SECRET42@bucket/x.jpg\n"
                        "https://user:pwcanary42@example.com/y.jpg\n")

    code = main(_label_args(manifest, tiny_model, output, manifest=True))
    out, err = capsys.readouterr()
    assert code == 2 and "credentials" in err, err
    assert "CANARY" not in out + err and "pwcanary42" not in out + err
    assert not output.exists() or not any(output.rglob("*.parquet"))


# ------------------------------------------------------------------------------------------------
# Special files where a file is expected: one line, exit 2, never a hang or an unbounded read


@pytest.mark.parametrize("which", ["model.json-fifo", "weights-dev-zero"])
def test_an_artifact_file_that_is_not_a_regular_file_is_refused_without_reading_it(
        tmp_path: Path, tiny_model: Path, synthetic_lake, capsys, which: str) -> None:
    """model.json a FIFO (reading it blocks for ever) or model.safetensors a link to /dev/zero
    (reading it fills memory until the OOM killer comes): refused before it is opened."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("model.json", "model.safetensors"):
        (model / name).write_bytes((tiny_model / name).read_bytes())
    if which == "model.json-fifo":
        (model / "model.json").unlink()
        os.mkfifo(model / "model.json")
    else:
        (model / "model.safetensors").unlink()
        (model / "model.safetensors").symlink_to("/dev/zero")

    code = main(_label_args(synthetic_lake(1, labelled=False), model, tmp_path / "out"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a regular file" in err and len(err.splitlines()) == 1, err


def test_a_manifest_that_is_a_fifo_is_refused_without_reading_it(tmp_path: Path, tiny_model: Path, capsys) -> None:
    manifest = tmp_path / "manifest.csv"
    os.mkfifo(manifest)
    code = main(_label_args(manifest, tiny_model, tmp_path / "out", manifest=True))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a regular file" in err and len(err.splitlines()) == 1, err


# ------------------------------------------------------------------------------------------------
# --resume


def test_resume_relabels_a_file_that_changed_since_its_row_was_staged(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    """A run killed after staging every row; one image is then replaced by another (new size and
    mtime) and the run resumed. Committed rows must describe the files as they are now."""
    import shutil

    import pandas as pd

    from distcls.artifact import read_info
    from distcls.storage import Store
    from distcls.label import OUTPUT_SCHEMA
    from distcls.lake import list_files

    lake, output = tmp_path / "lake", tmp_path / "out"
    shutil.copytree(synthetic_lake(1, labelled=False), lake)
    listing = list_files(Store(str(lake))).to_pylist()
    model_id = read_info(Store(str(tiny_model))).model_id
    rows = [{"path": f["path"], "label": "circle", "label_id": 0, "score": 1.0, "topk_labels": ["circle"],
             "topk_scores": [1.0], "width": 8, "height": 8, "error": None, "error_kind": None, "size": f["size"],
             "mtime": pd.Timestamp(f["mtime"] // 1000, unit="us", tz="UTC"), "model_id": model_id, "run_id": RUN,
             "labeled_at": pd.Timestamp.now(tz="UTC")} for f in listing]
    (output / STAGING / RUN).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), output / STAGING / RUN / "a-00000.parquet")
    changed = Path(listing[0]["path"])
    changed.write_bytes(Path(listing[1]["path"]).read_bytes() + b"\0" * 7)  # another image, another size

    from distcls.config import LabelConfig
    from distcls.label import _row_settings

    settings = _row_settings(LabelConfig(input=str(lake), model="m", output="o"))
    (output / STAGING / RUN / "_settings.json").write_text(json.dumps(settings))
    code = main(_label_args(lake, tiny_model, output, "--resume"))
    capsys.readouterr()
    committed = pd.read_parquet(output).set_index("path")
    assert code == 0 and len(committed) == len(listing)
    assert committed.loc[str(changed), "size"] == changed.stat().st_size


# ------------------------------------------------------------------------------------------------
# Manifest spellings


def test_file_uris_with_a_host_are_never_read_relative_to_the_working_folder(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    """``file://localhost/abs/a.jpg`` (RFC 8089) is ``/abs/a.jpg``: one row with the plain spelling,
    labelled; ``file://otherhost/abs/a.jpg`` is refused (error row), not read as
    ``<cwd>/otherhost/abs/a.jpg``."""
    import pandas as pd

    image = next(synthetic_lake(1, labelled=False).rglob("*.jpg"))
    manifest, output = tmp_path / "manifest.csv", tmp_path / "out"
    manifest.write_text(f"path\n{image}\nfile://localhost{image}\nfile://otherhost{image}\n")

    code = main(_label_args(manifest, tiny_model, output, manifest=True))
    capsys.readouterr()
    rows = pd.read_parquet(output).set_index("path")
    assert code == 0 and sorted(rows.index) == sorted([str(image), f"file://otherhost{image}"])
    assert pd.isna(rows.loc[str(image), "error_kind"]) and rows.loc[f"file://otherhost{image}", "error_kind"] == "refused"


# ------------------------------------------------------------------------------------------------
# The lock


@pytest.mark.parametrize("expires", [float("nan"), 1e12], ids=["nan", "year-33658"])
def test_a_lock_with_a_lease_no_run_could_hold_is_taken_over(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys, expires: float) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "run_id": RUN, "token": "x",
                                           "expires": expires, "expires_at": "never"}))
    code = main(_label_args(synthetic_lake(1, labelled=False), tiny_model, output))
    err = capsys.readouterr().err
    assert "taking over the lock" in err and code == 0, err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [SUCCESS, LOCK])
def test_a_fifo_planted_as_an_output_marker_is_refused_not_waited_on(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys, name: str) -> None:
    output = tmp_path / "out"
    output.mkdir()
    os.mkfifo(output / name)
    code = main(_label_args(synthetic_lake(1, labelled=False), tiny_model, output))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a regular file" in err and name in err and len(err.splitlines()) == 1, err


def test_an_empty_manifest_is_refused_before_ray_starts_and_writes_nothing(no_ray, tmp_path: Path, tiny_model: Path,
                                                                           capsys) -> None:
    import ray

    manifest, output = tmp_path / "empty.csv", tmp_path / "out"
    manifest.write_text("path\n")
    for extra in ([], ["--dry-run"]):
        code = main(_label_args(manifest, tiny_model, output, *extra, manifest=True))
        err = capsys.readouterr().err.strip()
        assert code == 2 and "no images to label" in err and len(err.splitlines()) == 1, err
    assert not ray.is_initialized() and not output.exists()


# ------------------------------------------------------------------------------------------------
# The quality report: files planted where it goes, tampered quality blocks


def _plain_run(lake: Path, model: Path, output: Path, *flags: str) -> dict:
    assert main(_label_args(lake, model, output, *flags)) == 0
    return json.loads(Path(output / SUCCESS).read_text()) if (output / SUCCESS).exists() else {}


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("planted", ["report", "part"])
def test_overwrite_never_deletes_a_folder_planted_where_a_committed_file_was(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys, planted: str) -> None:
    """A committed run's _report.png (or one of its Parquet files) replaced by a folder of someone's
    files: --overwrite deletes what the old _SUCCESS lists, and Store.delete deletes a folder with
    everything below it. It must refuse (nothing changed) rather than delete the folder."""
    lake, output = synthetic_lake(1, labelled=False), tmp_path / "out"
    first = _plain_run(lake, tiny_model, output)
    capsys.readouterr()
    name = REPORT if planted == "report" else first["files"][0]
    (output / name).unlink()
    before = _someone_elses_parquet(output / name / "important.parquet")

    code = main(_label_args(lake, tiny_model, output, "--overwrite"))
    err = capsys.readouterr().err.strip()
    assert (output / name / "important.parquet").read_bytes() == before
    # Ray Data's progress lines come first: the failure is the last line, and the only distcls one.
    assert code == 1 and [line for line in err.splitlines() if line.startswith("distcls label:")] == [
        err.splitlines()[-1]] and name in err.splitlines()[-1], err
    assert json.loads((output / SUCCESS).read_text()) == first and not (output / LOCK).exists()


@pytest.mark.usefixtures("ray_local")
def test_a_folder_planted_as_the_report_of_a_new_output_is_refused_before_labelling(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    """_report.png a folder in an empty output: the commit's last move (staged report -> _report.png)
    fails after the Parquet files moved, and every later run rolls the same plan forward into the
    same failure. It is not distcls's (no _SUCCESS lists it): refused as foreign, exit 2."""
    output = tmp_path / "out"
    before = _someone_elses_parquet(output / REPORT / "important.parquet")

    code = main(_label_args(synthetic_lake(1, labelled=False), tiny_model, output))
    err = capsys.readouterr().err.strip()
    assert code == 2 and REPORT in err and len(err.splitlines()) == 1, err
    assert (output / REPORT / "important.parquet").read_bytes() == before
    assert sorted(p.name for p in output.iterdir()) == [REPORT]


@pytest.mark.usefixtures("ray_local")
def test_tampered_quality_blocks_of_earlier_runs_neither_fail_a_run_nor_runs(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    """Earlier runs' _SUCCESS with a quality block of the wrong types (a list; labels with NaN,
    negative, boolean and huge counts; mean_top1 a string; errors_by_kind a list): the next
    --incremental run pools only the well-formed counts and commits; `runs` lists every run."""
    lake, output = synthetic_lake(1, labelled=False), tmp_path / "out"
    argv = _label_args(lake, tiny_model, output, "--incremental")
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    success = output / f"run={first['run_id']}" / SUCCESS
    summary = json.loads(success.read_text())
    summary["quality"] = ["not", "a", "dict"]
    summary["errors_by_kind"] = ["x"]
    success.write_text(json.dumps(summary))
    # A second, hand-made committed run of the same model with nonsense numbers.
    other = "20990101T000000Z-bbbbbb"
    (output / f"run={other}").mkdir()
    (output / f"run={other}" / SUCCESS).write_text(json.dumps({
        **summary, "run_id": other, "files": [], "started_at": "x", "images_per_s": "fast",
        "quality": {"labels": {"a": float("nan"), "b": -5, "c": True, "d": 10**300}, "mean_top1": "high",
                    "drift": "maybe"}}))

    code = main([*argv, "--input", str(synthetic_lake(1, labelled=False, seed=1))])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    second = json.loads(captured.out.strip().splitlines()[-1])
    previous = second["quality"]["references"]["previous_runs"]
    assert previous == {**previous, "runs": 1, "images": 10**300}

    for flags in ([], ["--json"]):
        code = main(["runs", str(output), *flags])
        captured = capsys.readouterr()
        assert code == 0 and len(captured.out.strip().splitlines()) == (1 if flags else 4), captured.err
        assert {first["run_id"], second["run_id"], other} <= set(re.findall(r"\d{8}T\d{6}Z-\w{6}", captured.out))
        if flags:  # strict JSON for machines: a NaN or Infinity a _SUCCESS holds is null, not a bare token
            json.loads(captured.out, parse_constant=lambda token: pytest.fail(f"{token} on stdout"))


@pytest.mark.usefixtures("ray_local")
def test_a_manifest_row_with_a_nul_byte_is_its_own_error_row_not_a_failed_run(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    """A path with a NUL byte (os.stat raises ValueError, not OSError) crashed the inference actor:
    the whole run failed (exit 1) after reading. It is one refused row, as any path no file can have."""
    lake, manifest, output = synthetic_lake(1, labelled=False), tmp_path / "manifest.parquet", tmp_path / "out"
    good = sorted(str(p) for p in lake.rglob("*.jpg"))
    pq.write_table(pa.table({"path": [*good, f"{lake}/a\x00b.jpg"]}), manifest)

    code = main(_label_args(manifest, tiny_model, output, manifest=True))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = pq.read_table(output).to_pandas()
    assert sorted(rows["path"]) == sorted([*good, f"{lake}/a\x00b.jpg"])
    bad = rows[rows["path"].str.contains("\x00")]
    assert bad["error_kind"].tolist() == ["refused"] and bad["label"].isna().all()
    assert rows["error"].isna().sum() == len(good)


@pytest.mark.usefixtures("ray_local")
def test_the_input_reader_dying_while_the_pipeline_runs_is_one_line_and_a_rerun_labels_each_input_once(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys, monkeypatch) -> None:
    """The InputReader owns the input blocks: killed after it handed them over (here: at once),
    the inference actors get OwnerDiedError, which reached the CLI as Ray's multi-part text with
    colour codes. It must be one line, exit 1, nothing committed; --resume then labels each input once."""
    import ray

    from distcls import inputs

    pending = inputs.Reading.pending

    def then_die(self, *args, **kwargs):
        blocks = pending(self, *args, **kwargs)
        ray.kill(self._actor)
        return blocks

    lake, output = synthetic_lake(1, labelled=False), tmp_path / "out"
    monkeypatch.setattr(inputs.Reading, "pending", then_die)
    code = main(_label_args(lake, tiny_model, output))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("distcls label: failed: the input blocks were lost") and "\x1b" not in last
    assert "nothing was committed" in last and not (output / SUCCESS).exists() and not (output / LOCK).exists()

    monkeypatch.setattr(inputs.Reading, "pending", pending)
    assert main(_label_args(lake, tiny_model, output, "--resume")) == 0
    capsys.readouterr()
    paths = pq.read_table(output)["path"].to_pylist()
    assert sorted(paths) == sorted(str(p) for p in lake.rglob("*.jpg"))


@pytest.mark.usefixtures("ray_local")
def test_an_input_reader_the_drivers_node_refuses_is_one_line_and_commits_nothing(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys, monkeypatch) -> None:
    """The reader's affinity to the driver's node is hard; a node that refuses it (draining, or here
    one that does not exist) fails the run with one line, not Ray's exception text."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from distcls import inputs

    monkeypatch.setattr(inputs, "on_this_node", lambda: NodeAffinitySchedulingStrategy("ab" * 28, soft=False))
    lake, output = synthetic_lake(1, labelled=False), tmp_path / "out"
    code = main(_label_args(lake, tiny_model, output))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last.startswith("distcls label: failed: the process reading the inputs could not start "
                                         "on the driver's node (") and last.endswith("; nothing was committed")
    assert not (output / SUCCESS).exists() and not (output / LOCK).exists()


@pytest.mark.usefixtures("ray_local")
def test_an_s3_prefix_that_is_also_an_object_is_listed_page_by_page_with_odd_keys(
        s3_endpoint: str, s3_bucket: str, synthetic_lake, tiny_model: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """``s3://b/p`` is an object and ``p/`` holds images (keys with a space, unicode, ``%``, ``+``),
    listed 2 keys a page: the run refused the prefix as "is a file". It labels each image once."""
    import boto3

    from distcls import lake as lakes

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    files = sorted(synthetic_lake(1, labelled=False).rglob("*.jpg"))
    names = ["a b.jpg", "ünï €.jpg", "100%.jpg", "a+b.jpg", "x%20y.jpg"]
    for name, file in zip(names, files):
        client.upload_file(str(file), s3_bucket, f"p/{name}")
    client.upload_file(str(files[-1]), s3_bucket, "p")
    monkeypatch.setattr(lakes, "LIST_PAGE_KEYS", 2)
    output = tmp_path / "out"

    code = main(_label_args(f"s3://{s3_bucket}/p", tiny_model, output))
    err = capsys.readouterr().err
    assert code == 0, err
    rows = pq.read_table(output).to_pandas()
    assert sorted(rows["path"]) == sorted(f"s3://{s3_bucket}/p/{name}" for name in names)
    assert rows["error"].isna().all()


@pytest.mark.usefixtures("ray_local")
def test_an_earlier_run_of_only_error_rows_is_no_reference_for_drift(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    """Night 1 labels a folder of broken files only (every row an error, labels {}); night 2 a
    normal lake with --fail-on-drift. Compared with night 1's empty distribution night 2 was at
    total variation 0.5: drift, exit 3, every night after a bad one."""
    broken, output = tmp_path / "broken", tmp_path / "out"
    broken.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (broken / name).write_bytes(b"not an image")
    argv = ["--model", str(tiny_model), "--output", str(output), "--incremental", "--fail-on-drift"]

    assert main(["label", "--input", str(broken), *argv]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["quality"]["images"] == 0 and first["errors"] == 2
    code = main(["label", "--input", str(synthetic_lake(1, labelled=False)), *argv])
    captured = capsys.readouterr()
    second = json.loads(captured.out.strip().splitlines()[-1])
    assert code == 0 and second["quality"]["drift"] is False, captured.err
    assert second["quality"]["references"]["previous_runs"] is None


@pytest.mark.parametrize("rate", ["fast", [1], -5, 1e308])
def test_dry_run_estimates_from_no_tampered_rate(no_ray, tmp_path: Path, synthetic_lake, tiny_model: Path, capsys,
                                                 rate) -> None:
    """The last run's _SUCCESS with images_per_s a string, a list, negative or absurd: --dry-run
    divided by it (TypeError through the CLI's last-resort handler, exit 1) or printed a negative
    time. A rate that is not a positive finite number is no rate to estimate from."""
    output = tmp_path / "out"
    output.mkdir()
    (output / SUCCESS).write_text(json.dumps({"run_id": RUN, "files": [], "images_per_s": rate,
                                              "started_at": "2099-01-01T00:00:00+00:00"}))
    code = main(_label_args(synthetic_lake(1, labelled=False), tiny_model, output, "--dry-run", "--overwrite"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    plan = json.loads(captured.out.strip().splitlines()[-1])
    assert plan["pending"] == 10
    assert plan["estimated_seconds"] is None or 0 <= plan["estimated_seconds"] < 1, plan
