"""The review loop end to end: label --review-below/--review-sample writes the least confident
images into _review/ of the output, committed with the run; train --labels takes people's labels
for them back into training."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from distcls import storage
from distcls.artifact import load_model, predict_proba
from distcls.cli import main
from distcls.config import StorageConfig, TrainConfig
from distcls.dataset import COMMITTING, STAGING, Dataset
from distcls.images import decode
from distcls.label import OUTPUT_SCHEMA
from distcls.review import OUTPUT_COLUMNS, REVIEW_SCHEMA, candidates, queue
from distcls.train import _split


def _label(lake: Path, output: Path, model_uri: str, *flags: str) -> dict:
    code = main(["label", "--input", str(lake), "--model", model_uri, "--output", str(output), "--batch-size", "16",
                 *flags])
    assert code == 0
    return json.loads((output / "_SUCCESS").read_text())


def _review(output: Path, summary: dict) -> pd.DataFrame:
    files = summary["review"]["files"]
    assert files == [f"_review/run={summary['run_id']}/part-00000.parquet"]
    table = pq.read_table(output / files[0])
    assert table.schema.remove_metadata() == REVIEW_SCHEMA
    return table.to_pandas()


def _broken_lake(synthetic_lake, tmp_path: Path) -> Path:
    """30 drawn images and one that is not an image: an error row, never reviewed (no score)."""
    lake = tmp_path / "lake"
    shutil.copytree(synthetic_lake(3, labelled=False), lake)
    (lake / "broken.jpg").write_bytes(b"not an image")
    return lake


def _split_score(lake: Path, model_uri: str) -> float:
    """A score that splits the lake's images near the middle, at the widest gap there, from
    calling the model directly: the run's scores agree with these to ~1e-6."""
    model, info = load_model(model_uri)
    pixels = np.stack([decode(p.read_bytes(), info.image_size)[0] for p in sorted(lake.glob("*.jpg"))
                       if p.name != "broken.jpg"])
    scores = np.sort(predict_proba(model, info, pixels).numpy().max(1))
    middle = max(range(10, 20), key=lambda i: scores[i + 1] - scores[i])
    return float((scores[middle] + scores[middle + 1]) / 2)


class _DiesMovingTheQueue(pafs.LocalFileSystem):
    """The output's filesystem on a machine that dies as the commit moves the review queue (after
    the data files: the plan's last move)."""

    def move(self, source: str, target: str) -> None:
        if "/_review/" in target:
            raise RuntimeError("machine died")
        super().move(source, target)


def test_review_queue_is_committed_with_its_run(ray_local, synthetic_lake, model_uri: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """--review-below: exactly the scored rows below it; an interrupted commit is finished with its
    queue; --overwrite replaces the queue with the dataset; readers of the dataset never see it."""
    lake, output = _broken_lake(synthetic_lake, tmp_path), tmp_path / "labels"
    below = _split_score(lake, model_uri)
    label = ["label", "--input", str(lake), "--model", model_uri, "--output", str(output), "--batch-size", "16"]
    real = storage.arrow_filesystem
    monkeypatch.setattr(storage, "arrow_filesystem", lambda uri, s: (
        (_DiesMovingTheQueue(), real(uri, s)[1]) if uri == str(output) else real(uri, s)))
    assert main([*label, "--review-below", str(below), "--incremental"]) == 1
    monkeypatch.undo()
    plan = json.loads((output / COMMITTING).read_text())
    assert [target for _, target in plan["moves"]][-1] == f"_review/run={plan['run_id']}/part-00000.parquet"
    assert not list(output.glob("_review/*/*.parquet")) and list(output.glob(f"run={plan['run_id']}/part-*.parquet"))

    # The next run finishes that commit first (then refuses: a plain run into a dataset).
    assert main(label) == 2
    assert "finished the interrupted commit" in capsys.readouterr().err
    first = json.loads((output / f"run={plan['run_id']}" / "_SUCCESS").read_text())
    labels = pd.read_parquet(output)
    assert len(labels) == 31 and labels["error"].notna().sum() == 1
    expected = labels[labels["score"] < below].set_index("path").sort_index()
    queue = _review(output, first).set_index("path").sort_index()
    assert list(queue.index) == list(expected.index) and 10 <= len(queue) <= 20
    assert queue["topk_labels"].map(list).tolist() == expected["topk_labels"].map(list).tolist()
    assert (queue["predicted"] == expected["label"]).all() and (queue["size"] == expected["size"]).all()
    assert queue["label"].isna().all()  # for people to fill in
    assert first["review"] == {"images": len(queue), "below": below, "sample": None, "files": first["review"]["files"]}

    second = _label(lake, output, model_uri, "--review-sample", "4", "--overwrite")
    labels = pd.read_parquet(output)
    scored = labels[labels["score"].notna()].sort_values(["score", "path"])
    queue = _review(output, second)
    assert list(queue["path"]) == list(scored["path"][:4])  # the 4 lowest, lowest first
    assert list(queue["score"]) == pytest.approx(list(scored["score"][:4]))
    # --overwrite removed the first run's queue with its partition.
    assert sorted(p.relative_to(output).as_posix() for p in output.glob("_review/**/*.parquet")) == \
        second["review"]["files"]
    # Dataset readers skip _review/: they read the labels and nothing else.
    read = pads.dataset(output, format="parquet", partitioning="hive").to_table()
    assert read.num_rows == 31 and "predicted" not in read.column_names
    assert not (output / STAGING).exists() and not (output / COMMITTING).exists()


def test_the_sample_is_the_n_lowest_over_all_files_lowest_first_ties_by_path() -> None:
    def output_rows(scored: list[tuple[str, float]]) -> pa.Table:
        n = len(scored)
        return pa.table({"path": [p for p, _ in scored], "size": [1] * n,
                         "mtime": pa.array([0] * n, pa.timestamp("us", tz="UTC")), "label": ["circle"] * n,
                         "score": pa.array([s for _, s in scored], pa.float32()),
                         "topk_labels": [["circle"]] * n, "topk_scores": pa.array([[s] for _, s in scored],
                                                                                  pa.list_(pa.float32())),
                         "model_id": ["m"] * n, "run_id": ["r"] * n})

    files = [output_rows([("a", 0.9), ("b", 0.25), ("c", 0.5)]), output_rows([]),
             output_rows([("e", 0.25), ("d", 0.25), ("f", 0.75)])]
    [sample] = queue(iter(files), 3)
    assert sample.schema == REVIEW_SCHEMA
    assert sample.select(["path", "predicted"]).to_pylist() == [
        {"path": "b", "predicted": "circle"}, {"path": "d", "predicted": "circle"}, {"path": "e", "predicted": "circle"}]
    assert [t.num_rows for t in queue(iter(files), None)] == [3, 0, 3]  # without a sample: all, as they come


def test_the_queue_is_committed_and_replaced_on_an_object_store(s3_bucket: str) -> None:
    """What the label runs above do, on S3 (no folders; a move is a copy and a delete), without Ray."""
    output = Dataset(storage.Store(f"s3://{s3_bucket}/labels", StorageConfig()))
    scores = {f"s3://{s3_bucket}/lake/{i}.jpg": score for i, score in enumerate([0.9, 0.2, None, 0.4])}
    rows = pa.table({**{name: [None] * 4 for name in OUTPUT_SCHEMA.names},
                     "path": list(scores), "score": list(scores.values()), "model_id": ["m"] * 4}).cast(OUTPUT_SCHEMA)

    def run(sample: int, overwrite: bool) -> dict:
        with output.lock() as lock:
            output.check_existing(overwrite=overwrite, incremental=False)
            staged = output.start_run(resume=False, model_id="m", inputs=lambda t: pa.array([True] * len(t)),
                                      settings={})
            files = [name for name, _ in output.write_staged(staged.run_id, [rows], rows_per_file=10)]
            columns = pa.schema([OUTPUT_SCHEMA.field(name) for name in OUTPUT_COLUMNS])
            chosen = output.read_staged(staged.run_id, files, columns, candidates(0.5))
            queued, images = output.stage_review(staged.run_id, queue(chosen, sample))
            return output.commit(staged.run_id, {"run_id": staged.run_id, "review": {"images": images}},
                                 incremental=False, overwrite=overwrite, lock=lock, files=files, review=queued)

    fs, root = storage.arrow_filesystem(output.uri, StorageConfig())
    first = run(sample=1, overwrite=False)
    [file] = first["review"]["files"]
    assert pq.read_table(f"{root}/{file}", filesystem=fs)["path"].to_pylist() == [f"s3://{s3_bucket}/lake/1.jpg"]
    second = run(sample=5, overwrite=True)
    [file] = second["review"]["files"]
    assert pq.read_table(f"{root}/{file}", filesystem=fs)["path"].to_pylist() == [
        f"s3://{s3_bucket}/lake/{i}.jpg" for i in (1, 3)]
    listed = [info.path.removeprefix(f"{root}/") for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
              if info.type == pafs.FileType.File]
    assert sorted(listed) == sorted([*second["files"], file, "_SUCCESS"])  # the first queue is gone


@pytest.mark.parametrize("flags, named", [(["--review-below", "1.5"], "--review-below"),
                                          (["--review-below", "-0.1"], "--review-below"),
                                          (["--review-below", "nan"], "--review-below"),
                                          (["--review-sample", "0"], "--review-sample"),
                                          # used to fail the run after labelling: OverflowError, exit 1
                                          (["--review-sample", str(2**63)], "--review-sample")])
def test_review_flags_out_of_range_are_usage_errors(synthetic_lake, model_uri: str, tmp_path: Path, capsys,
                                                    flags: list[str], named: str) -> None:
    output = tmp_path / "labels"
    code = main(["label", "--input", str(synthetic_lake(3, labelled=False)), "--model", model_uri,
                 "--output", str(output), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err and flags[1] in err
    assert not output.exists()


# ---------------------------------------------------------------------------------------------
# Human labels back into training


def _write(rows: list[dict], path: Path) -> str:
    if path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_a_filled_in_review_file_relabels_and_adds_training_images(
        ray_local, synthetic_lake, model_uri: str, tmp_path: Path, capsys) -> None:
    """The recipe: label the training lake with a review queue, people fill in its label column,
    train --labels the filled-in file. Their labels replace the lake's; images the lake lacks join it."""
    lake = synthetic_lake(6)  # <root>/<class>/<image>: the classes of model_uri
    summary = _label(lake, tmp_path / "labels", model_uri, "--review-sample", "5")
    queue = _review(tmp_path / "labels", summary)
    # People say: the first two are squares (unless the lake says so already: then circles), the
    # third is what the lake says, the other two they did not get to.
    truth = {str(p): p.parent.name for p in lake.glob("*/*.jpg")}
    paths = queue["path"].tolist()
    relabelled = {p: ("circle" if truth[p] == "square" else "square") for p in paths[:2]}
    queue["label"] = [relabelled[paths[0]], relabelled[paths[1]], truth[paths[2]], None, None]
    extra = tmp_path / "more"
    extra.mkdir()
    for i, source in enumerate(sorted(synthetic_lake(1, seed=5).glob("*/*.jpg"))[:2]):
        shutil.copy(source, extra / f"x{i}.jpg")
    added = [{"path": str(extra / "x0.jpg"), "label": "dots"}, {"path": "more/x1.jpg", "label": "ring"}]
    filled = pd.concat([queue, pd.DataFrame(added)], ignore_index=True)
    manifest = tmp_path / "reviewed.parquet"
    filled.to_parquet(manifest)

    config = TrainConfig(input=str(lake), output=str(tmp_path / "run"), labels=str(manifest), arch="simple_cnn")
    train_rows, val_rows, classes, counts = _split(config)
    rows = pa.concat_tables([train_rows, val_rows]).to_pylist()
    got = {row["path"]: classes[row["label"]] for row in rows}
    assert len(rows) == len(got) == len(truth) + 2
    assert got == {**truth, **relabelled, str(extra / "x0.jpg"): "dots", str(extra / "x1.jpg"): "ring"}
    expected = {"manifest": str(manifest), "rows": 5, "changed": 2, "confirmed": 1, "added": 2}
    assert counts == expected

    code = main(["train", "--input", str(lake), "--output", str(tmp_path / "run"), "--labels", str(manifest),
                 "--arch", "simple_cnn", "--epochs", "1", "--batch-size", "32", "--workers", "1"])
    assert code == 0
    assert json.loads((tmp_path / "run" / "model" / "model.json").read_text())["human_labels"] == expected
    assert "2 labels changed, 1 confirmed, 2 images added" in capsys.readouterr().err


@pytest.mark.parametrize("rows, message", [
    ([{"path": "circle/0.jpg", "label": "circle"}, {"path": "a.jpg", "label": "dog"}], "row 2: label 'dog'"),
    ([{"path": "a.jpg", "label": "ring"}, {"path": "b.jpg", "label": "dots"}, {"path": "./a.jpg", "label": "dots"}],
     "row 3: label 'dots' of {root}/a.jpg contradicts row 1, which gives it 'ring'"),
    ([{"path": "a.jpg", "name": "ring"}], "no 'label' column"),
    ([{"path": "a.jpg", "label": None}], "no row with a label"),
])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_bad_labels_manifest_is_a_usage_error(synthetic_lake, tmp_path: Path, capsys, rows: list[dict],
                                                message: str, suffix: str) -> None:
    manifest = _write(rows, tmp_path / f"labels{suffix}")
    output = tmp_path / "run"
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output), "--labels", manifest])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"--labels {manifest}: " + message.format(root=tmp_path) in err
    assert not output.exists()


def test_a_labels_csv_labelled_only_past_its_first_block_is_read(synthetic_lake, tmp_path: Path, capsys) -> None:
    """A 100k-row review file as CSV with only its last row filled in: the CSV reader infers types
    from the first block (1 MB), where label is all empty; the label further down is still read
    (and here checked: it is not a class), not refused as 'cannot read manifest'."""
    manifest = tmp_path / "labels.csv"
    unlabelled = "".join(f"/elsewhere/{i:06d}.jpg,\n" for i in range(100_000))
    manifest.write_text("path,label\n" + unlabelled + "/elsewhere/last.jpg,giraffe\n")
    output = tmp_path / "run"
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output), "--labels", str(manifest)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"--labels {manifest}: row 100001: label 'giraffe' (of /elsewhere/last.jpg) is not one of" in err
    assert not output.exists()


def test_a_malformed_labels_csv_row_is_not_quoted_in_the_error(synthetic_lake, tmp_path: Path, capsys) -> None:
    """Arrow's CSV errors quote the bad row; a row that does not parse is never checked for
    credentials, so the error names what is wrong, not the row."""
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n/a.jpg,circle\ns3://AKIDCANARY:SECRETCANARY@bucket/b.jpg,circle,extra\n")
    output = tmp_path / "run"
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output), "--labels", str(manifest)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot read manifest (CSV parse error: Expected 2 columns, got 3)" in err and "CANARY" not in err
    assert not output.exists()


@pytest.mark.parametrize("table, message", [
    (pa.table({"path": ["/a.jpg"], "label": pa.array([["circle"]])}), "--labels {m}: the 'label' column is list<"),
    (pa.table({"path": pa.array([7], pa.int64()), "label": ["circle"]}), "{m}: manifest's 'path' column is int64, not text"),
])
def test_a_labels_column_of_the_wrong_type_is_a_usage_error(synthetic_lake, tmp_path: Path, capsys, table: pa.Table,
                                                            message: str) -> None:
    manifest = tmp_path / "labels.parquet"
    pq.write_table(table, manifest)
    output = tmp_path / "run"
    code = main(["train", "--input", str(synthetic_lake(6)), "--output", str(output), "--labels", str(manifest)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message.format(m=manifest) in err
    assert not output.exists()


def test_a_file_named_review_in_the_output_is_refused_before_the_run(synthetic_lake, model_uri: str, tmp_path: Path,
                                                                     capsys) -> None:
    """A plain file where the review queues go used to surface only at the commit (NotADirectoryError,
    exit 1), after the data files had moved: a half-committed output."""
    output = tmp_path / "labels"
    output.mkdir()
    (output / "_review").write_text("someone's notes")
    code = main(["label", "--input", str(synthetic_lake(3, labelled=False)), "--model", model_uri,
                 "--output", str(output), "--review-below", "1.0"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert f"output {output} holds a file '_review'" in captured.err
    assert [p.name for p in output.iterdir()] == ["_review"] and (output / "_review").read_text() == "someone's notes"
