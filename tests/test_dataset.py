"""The output dataset of ``distcls label`` (distcls.dataset): the lock, staging, resume, the commit
protocol and its validation, --overwrite, roll-forward, the keys of --incremental. Through the
module's public interface, and end to end through the CLI where the guarantee is the CLI's."""
from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from distcls import storage
from distcls.artifact import read_info
from distcls.cli import main
from distcls.config import LabelConfig, StorageConfig
from distcls.storage import Store
from distcls.dataset import COMMITTING, LOCK, STAGING, SUCCESS, Dataset, keys
from distcls.errors import JobError, UsageError
from distcls.lake import list_files

label_module = importlib.import_module("distcls.label")

RUN_A = "20260101T000000Z-aaaaaa"
RUN_B = "20260102T000000Z-bbbbbb"


SETTINGS = {"top_k": 5}  # what label passes as the row-shaping flags; a resumed run must match


def _stage_settings(output: Path, run_id: str, settings: dict) -> None:
    """The settings record a run writes when it starts staging (dataset.start_run)."""
    (output / STAGING / run_id).mkdir(parents=True, exist_ok=True)
    (output / STAGING / run_id / "_settings.json").write_text(json.dumps(settings))


def _inputs(paths: list[str] | pa.Array, size: int = 1, mtime_us: int = 0) -> Callable[[pa.Table], pa.Array]:
    """Inputs as label hands them to start_run: which staged rows (path, size, mtime) are of these
    paths with the size and mtime that _rows stages."""
    paths = pa.array(paths, pa.string())
    table = pa.table({"path": paths, "size": pa.array([size] * len(paths), pa.int64()),
                      "mtime": pa.array([mtime_us] * len(paths), pa.int64()).cast(pa.timestamp("us", tz="UTC"))})
    return lambda staged: pc.is_in(keys(staged), value_set=keys(table))


def _rows(paths: list[str], model_id: str = "m", error_kind: list[str | None] | None = None,
          sizes: list[int] | None = None, mtimes_us: list[int] | None = None) -> pa.Table:
    """Output rows as far as the dataset cares: path, error, size, mtime, model_id (+ error_kind)."""
    n = len(paths)
    columns = {
        "path": pa.array(paths, pa.string()),
        "error": pa.array([None if k is None else "failed" for k in (error_kind or [None] * n)], pa.string()),
        "size": pa.array(sizes or [1] * n, pa.int64()),
        "mtime": pa.array(mtimes_us or [0] * n, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        "model_id": pa.array([model_id] * n, pa.string()),
    }
    if error_kind is not None:
        columns["error_kind"] = pa.array(error_kind, pa.string())
    return pa.table(columns)


def _commit(output: Dataset, tables: list[pa.Table], *, incremental: bool = False, overwrite: bool = False,
            model_id: str = "m") -> dict:
    """One whole run through the interface, as label.py does it."""
    with output.lock() as lock:
        output.roll_forward()
        output.check_existing(overwrite=overwrite, incremental=incremental)
        paths = pa.concat_arrays([t["path"].combine_chunks() for t in tables])
        run = output.start_run(resume=False, settings=SETTINGS, model_id=model_id, inputs=_inputs(paths))
        lock.name_run(run.run_id)
        output.write_staged(run.run_id, tables, rows_per_file=3)
        output.staged_counts(run.run_id, expected=len(paths))
        return output.commit(run.run_id, {"run_id": run.run_id}, incremental=incremental, overwrite=overwrite,
                             lock=lock)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _label_args(lake: Path | str, model: Path, output: Path | str, *flags: str) -> list[str]:
    return ["label", "--input", str(lake), "--model", str(model), "--output", str(output), *flags]


# ------------------------------------------------------------------------------------------------
# Staging, counts, commit


def test_a_commit_makes_exactly_the_staged_rows_the_dataset_and_leaves_nothing_behind(tmp_path: Path) -> None:
    output = Dataset(Store(str(tmp_path / "out")))
    summary = _commit(output, [_rows(["a", "b"]), _rows(["c", "d", "e"])])
    assert sorted(pd.read_parquet(tmp_path / "out")["path"]) == ["a", "b", "c", "d", "e"]
    assert output.successes() == {SUCCESS: summary} and len(summary["files"]) == 2  # 3 rows per file
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([SUCCESS, *summary["files"]])


def test_run_ids_sort_by_time_and_differ(tmp_path: Path) -> None:
    output = Dataset(Store(str(tmp_path)))
    with output.lock():
        first, second = (output.start_run(resume=False, settings=SETTINGS, model_id="m", inputs=_inputs(["a"])).run_id for _ in range(2))
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", first) and first != second


def test_staged_files_have_rows_per_file_rows_in_order_and_return_name_and_rows(tmp_path: Path) -> None:
    """Batches of any size in, files of exactly rows_per_file rows out (the last one fewer), in row
    groups of at most row_group_rows; a second write into the same run adds files."""
    output = Dataset(Store(str(tmp_path)))
    batches = [pa.table({"path": [f"p{i}" for i in range(start, start + n)]}) for start, n in [(0, 3), (3, 10), (13, 1)]]
    written = output.write_staged(RUN_A, iter(batches), rows_per_file=4, row_group_rows=3)
    files = [tmp_path / STAGING / RUN_A / name for name, _ in written]
    assert [rows for _, rows in written] == [pq.read_metadata(f).num_rows for f in files] == [4, 4, 4, 2]
    assert max(pq.read_metadata(f).row_group(i).num_rows for f in files for i in range(pq.read_metadata(f).num_row_groups)) == 3
    assert pq.read_table(files).column("path").to_pylist() == [f"p{i}" for i in range(14)]
    again = output.write_staged(RUN_A, iter(batches[:1]), rows_per_file=4)
    assert len(list((tmp_path / STAGING / RUN_A).iterdir())) == 5 and again[0][0] not in dict(written)


def test_staged_rows_lost_or_doubled_are_never_committed(tmp_path: Path) -> None:
    output = Dataset(Store(str(tmp_path)))
    output.write_staged(RUN_A, [pa.table({"path": ["a", "b"], "error": [None, "empty file"]})], rows_per_file=10)
    assert output.staged_counts(RUN_A, expected=2) == {"images": 2, "labelled": 1, "errors": 1, "errors_by_kind": {}}
    output.write_staged(RUN_A, [pa.table({"path": ["b"], "error": pa.nulls(1, pa.string())})], rows_per_file=10)
    with pytest.raises(JobError, match="3 rows \\(2 distinct paths\\), expected 3; not committed"):
        output.staged_counts(RUN_A, expected=3)


def test_only_the_staged_files_reported_are_counted_and_committed(tmp_path: Path) -> None:
    """A file a retried write left in staging (its attempt never reported) is neither counted nor
    committed; the reported files are."""
    output = Dataset(Store(str(tmp_path / "out")))
    with output.lock() as lock:
        run = output.start_run(resume=False, settings=SETTINGS, model_id="m", inputs=_inputs(["a", "b"]))
        reported = [name for name, _ in output.write_staged(run.run_id, [_rows(["a", "b"])], rows_per_file=1)]
        output.write_staged(run.run_id, [_rows(["b"])], rows_per_file=10)  # the attempt that died
        assert output.staged_counts(run.run_id, expected=2, files=reported)["images"] == 2
        summary = output.commit(run.run_id, {"run_id": run.run_id}, incremental=False, overwrite=False, lock=lock,
                                files=reported)
    assert len(summary["files"]) == 2
    assert sorted(pd.read_parquet(tmp_path / "out")["path"]) == ["a", "b"]


def test_the_handle_pickles_and_a_ray_worker_writes_staged_files_into_s3(ray_local, s3_bucket: str) -> None:
    """The S3 case end to end through the interface: lock (a conditional create the moto server
    honours: a second lock is refused), staged files written inside a Ray task from a pickled
    handle, commit, committed keys."""
    import ray

    output = Dataset(Store(f"s3://{s3_bucket}/labels"))
    assert pickle.loads(pickle.dumps(output)) == output
    with output.lock() as lock:
        with pytest.raises(UsageError, match=f"output s3://{s3_bucket}/labels is in use by run .* on host "
                                             f"{socket.gethostname()} \\(pid {os.getpid()}\\)"):
            output.lock()
        run = output.start_run(resume=False, settings=SETTINGS, model_id="m", inputs=_inputs(["s3://x/1", "s3://x/2"]))
        write = ray.remote(lambda out, run_id, rows: out.write_staged(run_id, [rows], rows_per_file=10))
        written = ray.get(write.remote(output, run.run_id, _rows(["s3://x/1", "s3://x/2"], error_kind=[None, "transient"])))
        assert [rows for _, rows in written] == [2]
        output.commit(run.run_id, {"run_id": run.run_id}, incremental=True, overwrite=False, lock=lock)
    fs, root = storage.arrow_filesystem(output.uri, StorageConfig())
    assert fs.get_file_info(f"{root}/{LOCK}").type == pafs.FileType.NotFound  # released
    assert output.labelled_keys("m")["path"].to_pylist() == ["s3://x/1"]  # the transient row is read again
    assert [s["run_id"] for s in output.successes().values()] == [run.run_id]


# ------------------------------------------------------------------------------------------------
# The commit plan is validated before anything is applied


def _plant_plan(output: Path, **changes) -> dict:
    """A staged file of RUN_B and a plan to commit it, as distcls writes them, with ``changes``."""
    Dataset(Store(str(output))).write_staged(RUN_B, [_rows(["n1", "n2"])], rows_per_file=10)
    staged = f"{STAGING}/{RUN_B}/" + next((output / STAGING / RUN_B).iterdir()).name
    plan = {"run_id": RUN_B, "delete": [], "moves": [[staged, f"part-{RUN_B}-00000.parquet"]], "success": SUCCESS,
            "summary": {"run_id": RUN_B, "files": [f"part-{RUN_B}-00000.parquet"]}}
    plan.update(changes)
    (output / COMMITTING).write_text(json.dumps(plan))
    return plan


@pytest.mark.parametrize("entry, changes", [
    ("'../victim.txt'", {"delete": ["../victim.txt"]}),
    ("'run=x/../../victim.txt'", {"delete": ["run=x/../../victim.txt"]}),
    ("is not a relative name", {"delete": ["/abs/victim.txt"]}),
    ("is not a relative name", {"delete": ["s3://bucket/victim.txt"]}),
    ("'model/model.safetensors' is not a file of a distcls dataset", {"delete": ["model/model.safetensors"]}),
    (f"'part-{RUN_A}-00000.parquet' is not listed", {"delete": [f"part-{RUN_A}-00000.parquet"]}),
    ("'../victim.txt'", {"moves": [["../victim.txt", f"part-{RUN_B}-00000.parquet"]]}),
    (f"'{STAGING}/{RUN_A}/x.parquet' is not a staged file of run {RUN_B}",
     {"moves": [[f"{STAGING}/{RUN_A}/x.parquet", f"part-{RUN_B}-00000.parquet"]]}),
    ("'../escaped.parquet'", {"moves": [[f"{STAGING}/{RUN_B}/x.parquet", "../escaped.parquet"]]}),
    ("'../_SUCCESS'", {"success": "../_SUCCESS"}),
    ("'run=other/_SUCCESS' is neither", {"success": "run=other/_SUCCESS"}),
    ("run_id '../x' is not a run id", {"run_id": "../x"}),
    ("is not the review queue of run", {"moves": [[f"{STAGING}/{RUN_B}/_review/part-00000.parquet",
                                                   f"_review/run={RUN_A}/part-00000.parquet"]]}),
    ("is not the review queue of run", {"moves": [[f"{STAGING}/{RUN_B}/_review/part-00000.parquet",
                                                   f"part-{RUN_B}-00000.parquet"]]}),
    ("'_review/x.parquet' is not a file of a distcls dataset", {"delete": ["_review/x.parquet"]}),
], ids=["delete-dotdot", "delete-partition-dotdot", "delete-absolute", "delete-scheme", "delete-foreign",
        "delete-unlisted", "move-source-dotdot", "move-source-other-run", "move-target-dotdot", "success-dotdot",
        "success-other-partition", "run-id", "review-into-other-run", "review-as-dataset", "delete-review-foreign"])
def test_a_tampered_commit_plan_is_refused_with_exit_1_and_nothing_is_touched(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys, entry: str, changes: dict) -> None:
    """A _COMMITTING planted by anyone who can write the output: refused before its first step,
    naming the entry; the dataset, the staged files and everything outside the output unchanged."""
    output = tmp_path / "out"
    _commit(Dataset(Store(str(output))), [_rows(["old"])])
    (output / f"part-{RUN_A}-00000.parquet").write_bytes(b"not listed by _SUCCESS")
    (output / "model").mkdir()
    (output / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "victim.txt").write_text("outside the output")
    _plant_plan(output, **changes)
    before = _tree(tmp_path)

    code = main(_label_args(synthetic_lake(1, labelled=False), tiny_model, output))
    err = capsys.readouterr().err
    assert code == 1 and "refusing the commit plan" in err and entry in err and "nothing was changed" in err, err
    assert _tree(tmp_path) == before and not (output / LOCK).exists()


def test_success_is_not_written_when_a_file_it_would_list_is_gone(tmp_path: Path) -> None:
    """An --overwrite commit whose second staged file vanished: refused before the old dataset is
    touched, no _SUCCESS for the new one."""
    output = Dataset(Store(str(tmp_path)))
    old = _commit(output, [_rows(["old"])])
    plan = _plant_plan(tmp_path, delete=[SUCCESS, *old["files"]])
    plan["moves"].append([f"{STAGING}/{RUN_B}/gone.parquet", f"part-{RUN_B}-00001.parquet"])
    plan["summary"]["files"].append(f"part-{RUN_B}-00001.parquet")
    (tmp_path / COMMITTING).write_text(json.dumps(plan))
    before = _tree(tmp_path)
    with pytest.raises(JobError, match=f"staged files of the commit .* are gone \\({STAGING}/{RUN_B}/gone.parquet"):
        output.roll_forward()
    assert _tree(tmp_path) == before and json.loads((tmp_path / SUCCESS).read_text())["run_id"] == old["run_id"]


class _DiesAfterMoves(pafs.LocalFileSystem):
    """The local filesystem of a machine that dies after ``moves`` renames."""

    def __init__(self, moves: int) -> None:
        super().__init__()
        self.moves = moves

    def move(self, source: str, target: str) -> None:
        if self.moves == 0:
            raise KeyboardInterrupt("machine died")
        self.moves -= 1
        super().move(source, target)


@pytest.mark.parametrize("moves", [1, 2, 3, 4])
def test_an_overwrite_interrupted_at_any_step_is_rolled_forward_to_exactly_the_new_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moves: int) -> None:
    """Retire the old _SUCCESS, delete its files, move the new ones: a crash after each rename is
    finished by the next run, whose validation still accepts the half-applied plan."""
    output = Dataset(Store(str(tmp_path)))
    _commit(output, [_rows(["old1", "old2", "old3", "old4"])])
    real = storage.arrow_filesystem
    monkeypatch.setattr(storage, "arrow_filesystem", lambda uri, config: (_DiesAfterMoves(moves), real(uri, config)[1]))
    with pytest.raises(KeyboardInterrupt):
        _commit(Dataset(Store(str(tmp_path))), [_rows(["new1", "new2", "new3", "new4"])], overwrite=True)
    monkeypatch.undo()
    assert (tmp_path / COMMITTING).exists()
    finished = Dataset(Store(str(tmp_path))).roll_forward()
    assert sorted(pd.read_parquet(tmp_path)["path"]) == ["new1", "new2", "new3", "new4"]
    assert output.successes() == {SUCCESS: finished}
    assert not (tmp_path / COMMITTING).exists() and not (tmp_path / STAGING).exists()


# ------------------------------------------------------------------------------------------------
# What is in the output: --overwrite, foreign entries, inputs inside the output


def test_overwrite_deletes_only_what_success_lists(tmp_path: Path) -> None:
    output = Dataset(Store(str(tmp_path)))
    _commit(output, [_rows(["a", "b"])], incremental=True)
    _commit(output, [_rows(["c"])], incremental=True)
    (tmp_path / "_notes.txt").write_text("readers skip names starting with _")
    (tmp_path / ".hidden").write_text("and with .")
    summary = _commit(output, [_rows(["d"])], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".hidden", "_notes.txt", SUCCESS, *summary["files"]])
    assert pd.read_parquet(tmp_path)["path"].tolist() == ["d"]


@pytest.mark.parametrize("foreign", ["model/model.safetensors", "notes.txt", "run=20260101T000000Z-aaaaaa/notes.txt"])
def test_overwrite_refuses_an_output_holding_foreign_files_and_deletes_nothing(
        tmp_path: Path, synthetic_lake, tiny_model: Path, capsys, foreign: str) -> None:
    """A training run's folder (model/, notes) given as the output of --overwrite: exit 2 naming
    the entry, every file still there. Refusing rather than skipping: an output that mixes other
    files with the dataset would not read as one dataset (readers take every file as Parquet)."""
    output = tmp_path / "out"
    _commit(Dataset(Store(str(output))), [_rows(["x"])], incremental=True)
    (output / foreign).parent.mkdir(parents=True, exist_ok=True)
    (output / foreign).write_text("someone else's")
    before = _tree(output)
    code = main(_label_args(synthetic_lake(1, labelled=False), tiny_model, output, "--overwrite"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"distcls label: error: output {output} holds '{foreign.split('/model')[0]}'")
    assert _tree(output) == before and not (output / LOCK).exists()


@pytest.mark.parametrize("where", ["below", "equal", "symlink", "s3"])
def test_an_input_inside_the_output_is_refused(tmp_path: Path, s3_bucket: str, upload_folder, synthetic_lake,
                                               tiny_model: Path, capsys, where: str) -> None:
    output = tmp_path / "out"
    lake = output / "lake"
    shutil.copytree(synthetic_lake(1, labelled=False), lake)
    source: str = str(lake)
    if where == "equal":
        source = str(output)
    elif where == "symlink":
        (tmp_path / "link").symlink_to(lake)
        source = str(tmp_path / "link")
    elif where == "s3":
        source = upload_folder(lake, f"{s3_bucket}/out/lake")
        output = f"s3://{s3_bucket}/out"  # type: ignore[assignment]
    code = main(_label_args(source, tiny_model, output))
    err = capsys.readouterr().err
    assert code == 2 and " is inside the " in err, err
    assert not (tmp_path / "out" / SUCCESS).exists()


# ------------------------------------------------------------------------------------------------
# Roll forward, then this run


def test_another_runs_interrupted_commit_is_finished_then_this_input_labelled(
        ray_local, tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    """Run A's incremental commit stopped right after its plan was written. The next run (B, same
    lake plus new files) finishes A's commit, says so, and labels its own new inputs: every input
    exactly once, B's summary on stdout."""
    lake = tmp_path / "lake"
    shutil.copytree(synthetic_lake(1, labelled=False), lake)
    listing = list_files(Store(str(lake))).sort_by("path").slice(0, 6)
    model_id = read_info(Store(str(tiny_model))).model_id
    output = tmp_path / "out"
    Dataset(Store(str(output))).write_staged(RUN_A, [_rows(
        listing["path"].to_pylist(), model_id, sizes=listing["size"].to_pylist(),
        mtimes_us=[t // 1000 for t in listing["mtime"].to_pylist()])], rows_per_file=100)
    staged = f"{STAGING}/{RUN_A}/" + next((output / STAGING / RUN_A).iterdir()).name
    (output / COMMITTING).write_text(json.dumps({
        "run_id": RUN_A, "delete": [], "moves": [[staged, f"run={RUN_A}/part-00000.parquet"]],
        "success": f"run={RUN_A}/{SUCCESS}", "summary": {"run_id": RUN_A, "files": [f"run={RUN_A}/part-00000.parquet"]}}))

    code = main(_label_args(lake, tiny_model, output, "--incremental"))
    out, err = capsys.readouterr()
    assert code == 0 and f"finished the interrupted commit of run {RUN_A}" in err
    summary = json.loads(out)
    assert summary["run_id"] != RUN_A and summary["images"] == 4  # only the inputs A did not label
    frame = pd.read_parquet(output)
    assert sorted(frame["path"]) == sorted(str(p) for p in lake.glob("*.jpg"))
    assert sorted(frame["run"].unique()) == sorted([RUN_A, summary["run_id"]])


# ------------------------------------------------------------------------------------------------
# One run per output


def _plant_lock(output: Path, **owner) -> None:
    output.mkdir(parents=True, exist_ok=True)
    body = {"host": "other-host", "pid": 4242, "run_id": RUN_A, "token": "planted", "expires": time.time() + 600,
            "expires_at": "2099-01-01T00:00:00+00:00", **owner}
    (output / LOCK).write_text(json.dumps(body))


def test_a_second_run_on_a_locked_output_exits_2_naming_the_holder(tmp_path: Path, synthetic_lake,
                                                                   tiny_model: Path, capsys) -> None:
    """The first run holds the lock (here: this process, alive) and has staged rows; a second
    `distcls label` on the same output, even with --overwrite, stops before touching anything: it
    neither deletes the first run's staging nor its committed dataset."""
    output = tmp_path / "out"
    first = Dataset(Store(str(output)))
    _commit(first, [_rows(["a"])])
    with first.lock() as lock:
        lock.name_run(RUN_A)
        first.write_staged(RUN_A, [_rows(["b"])], rows_per_file=10)  # the first run's work in progress
        before = _tree(output)
        code = main(_label_args(synthetic_lake(1, labelled=False), tiny_model, output, "--overwrite"))
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith(f"distcls label: error: output {output} is in use by run {RUN_A} on "
                                            f"host {socket.gethostname()} (pid {os.getpid()}), lease until 20")
        assert _tree(output) == before
    assert not (output / LOCK).exists()


def test_a_folder_without_hard_links_still_gets_a_lock_that_refuses_a_second_run(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """link(2) fails with EPERM on some mounts (FUSE mounts of buckets, some SMB shares): the lock
    is then created exclusively and written, and still refuses a second run."""
    import errno

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(importlib.import_module("distcls.dataset").os, "link", no_links)
    output = Dataset(Store(str(tmp_path)))
    with output.lock() as lock:
        assert output.lock_holder()["token"] == lock.owner["token"]
        with pytest.raises(UsageError, match="is in use by run"):
            output.lock()
    assert not (tmp_path / LOCK).exists() and output.lock_holder() is None


def test_a_lock_planted_by_another_host_refuses_until_its_lease_ends(tmp_path: Path) -> None:
    _plant_lock(tmp_path)
    with pytest.raises(UsageError, match=f"in use by run {RUN_A} on host other-host \\(pid 4242\\), "
                                         "lease until 2099-01-01T00:00:00"):
        Dataset(Store(str(tmp_path))).lock()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "planted"


@pytest.mark.parametrize("holder", ["expired", "dead-process-here"])
def test_an_expired_lock_is_taken_over_and_said_so(tmp_path: Path, caplog, holder: str) -> None:
    if holder == "expired":
        _plant_lock(tmp_path, expires=time.time() - 1, expires_at="2020-01-01T00:00:00+00:00")
        reason = "its lease ended at 2020-01-01T00:00:00"
    else:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        _plant_lock(tmp_path, host=socket.gethostname(), pid=dead.pid)
        reason = f"process {dead.pid} on this host is gone"
    with Dataset(Store(str(tmp_path))).lock():
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    err = caplog.text  # the library logs (distcls.dataset); the CLI sends it to stderr
    assert f"taking over the lock of {tmp_path} from run {RUN_A}" in err and reason in err
    assert not (tmp_path / LOCK).exists()


def test_the_lease_is_renewed_while_the_run_holds_the_lock(tmp_path: Path) -> None:
    with Dataset(Store(str(tmp_path))).lock(lease_s=0.6):
        first = json.loads((tmp_path / LOCK).read_text())["expires"]
        deadline = time.monotonic() + 30
        while json.loads((tmp_path / LOCK).read_text())["expires"] == first:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
    assert not (tmp_path / LOCK).exists()


def test_a_run_whose_lock_was_taken_over_does_not_commit(tmp_path: Path) -> None:
    output = Dataset(Store(str(tmp_path)))
    with output.lock() as lock:
        run = output.start_run(resume=False, settings=SETTINGS, model_id="m", inputs=_inputs(["a"]))
        output.write_staged(run.run_id, [_rows(["a"])], rows_per_file=10)
        _plant_lock(tmp_path)  # what a takeover by another run looks like from here
        with pytest.raises(JobError, match=f"lost the lock of {tmp_path} to run {RUN_A} on host other-host"):
            output.commit(run.run_id, {"run_id": run.run_id}, incremental=False, overwrite=False, lock=lock)
    assert not (tmp_path / SUCCESS).exists() and json.loads((tmp_path / LOCK).read_text())["token"] == "planted"


def test_a_lock_removed_by_hand_while_held_is_said_to_be_removed(tmp_path: Path) -> None:
    """Not "lost to run (starting) on host ?": no other run holds it."""
    output = Dataset(Store(str(tmp_path)))
    with output.lock() as lock:
        (tmp_path / LOCK).unlink()
        with pytest.raises(JobError, match=f"^the lock of {tmp_path} was removed while this run held it; "
                                           "nothing was committed$"):
            lock.require_held()


# ------------------------------------------------------------------------------------------------
# --resume and --incremental


def test_resume_keeps_only_staged_rows_of_current_inputs(tmp_path: Path) -> None:
    output = Dataset(Store(str(tmp_path)))
    output.write_staged(RUN_A, [_rows(["a", "b", "c"]), _rows(["d"])], rows_per_file=3)  # files abc, d
    output.write_staged(RUN_A, [_rows(["e"], model_id="other")], rows_per_file=3)
    _stage_settings(tmp_path, RUN_A, SETTINGS)
    with output.lock():
        run = output.start_run(resume=True, settings=SETTINGS, model_id="m", inputs=_inputs(["a", "c", "e", "f"]))
    assert run.run_id == RUN_A and sorted(run.staged.to_pylist()) == ["a", "c"]
    staged = pq.read_table(list((tmp_path / STAGING / RUN_A).glob("*.parquet")))
    assert sorted(staged["path"].to_pylist()) == ["a", "c"]  # b, d dropped; e was another model's
    with output.lock():  # "c" rewritten since it was staged: its row goes too
        current, changed = _inputs(["a"]), _inputs(["c"], size=2)
        run = output.start_run(resume=True, settings=SETTINGS, model_id="m", inputs=lambda staged: pc.or_(current(staged), changed(staged)))
    assert sorted(run.staged.to_pylist()) == ["a"]


def test_resume_with_a_changed_input_labels_every_current_input_exactly_once(
        ray_local, tmp_path: Path, synthetic_lake, tiny_model: Path, capsys) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(synthetic_lake(1, labelled=False), lake)
    model_id = read_info(Store(str(tiny_model))).model_id
    output = tmp_path / "out"
    kept = sorted(str(p) for p in lake.glob("*.jpg"))[:3]
    stats = [Path(p).stat() for p in kept]
    Dataset(Store(str(output))).write_staged(
        RUN_A, [_rows(kept + [str(tmp_path / "removed-from-the-lake.jpg")], model_id,
                      sizes=[s.st_size for s in stats] + [1], mtimes_us=[s.st_mtime_ns // 1000 for s in stats] + [0])],
        rows_per_file=100)
    _stage_settings(output, RUN_A, label_module._row_settings(LabelConfig(input=str(lake), model="m", output="o")))
    code = main(_label_args(lake, tiny_model, output, "--resume"))
    out, err = capsys.readouterr()
    assert code == 0 and "dropping 1 staged rows" in err
    assert json.loads(out)["resumed"] == 3
    assert sorted(pd.read_parquet(output)["path"]) == sorted(str(p) for p in lake.glob("*.jpg"))


def test_incremental_keys_read_passing_errors_again_and_old_files_without_error_kind(tmp_path: Path) -> None:
    output = Dataset(Store(str(tmp_path)))
    _commit(output, [_rows(["old-1", "old-2"])], incremental=True)  # written before error_kind existed
    _commit(output, [_rows(["ok", "corrupt", "gone", "throttled"],
                           error_kind=[None, "corrupt", "not_found", "transient"])], incremental=True)
    _commit(output, [_rows(["other-model"], model_id="m2")], incremental=True)
    keys = output.labelled_keys("m")
    assert sorted(keys["path"].to_pylist()) == ["corrupt", "ok", "old-1", "old-2"]
    assert keys.column_names == ["path", "size", "mtime"]


@pytest.mark.parametrize("flag, value", [("--top-k", "1"), ("--allowed-roots", "/srv/nothing")])
def test_resume_under_other_row_settings_is_refused(tmp_path: Path, synthetic_lake, tiny_model: Path, capsys,
                                                    flag: str, value: str) -> None:
    """Rows staged under --top-k 5 and no --allowed-roots must not be committed as a run's that
    asked for another --top-k or for allowed roots (they would bypass them)."""
    lake = synthetic_lake(1, labelled=False)
    output = tmp_path / "out"
    settings = label_module._row_settings(LabelConfig(input=str(lake), model="m", output="o"))
    Dataset(Store(str(output))).write_staged(RUN_A, [_rows([str(next(Path(lake).iterdir()))])], 10)
    _stage_settings(output, RUN_A, settings)
    for extra in ([], ["--dry-run"]):
        code = main(_label_args(lake, tiny_model, output, "--resume", flag, value, *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and flag in err[-1] and "--resume" in err[-1], err
    assert not list(output.glob("part-*")) and (output / STAGING / RUN_A).is_dir()
