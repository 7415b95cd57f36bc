"""Labeling inputs: odd files, manifests, allowed roots, refusals, and the pure row/batch functions
(tested without Ray)."""
from __future__ import annotations

import importlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distcls import dedup, images, inputs, predict, storage
from distcls.dataset import keys
from distcls.artifact import read_info
from distcls.config import LabelConfig, StorageConfig
from distcls.errors import UsageError
from distcls.storage import Store
from distcls.cli import main
from distcls.label import OUTPUT_SCHEMA, label
from distcls.lake import list_files
from oddfiles import odd_files

# By name: the package re-exports a label() function under the same name as this module.
label_module = importlib.import_module("distcls.label")


def _listing(root: Path) -> pa.Table:
    listing = list_files(Store(str(root)))
    return inputs._input_table(listing["path"], listing["size"], listing["mtime"],
                                     pa.nulls(listing.num_rows, pa.string()))


def _s3_table(output: str) -> pa.Table:
    from distcls.storage import arrow_filesystem

    fs, path = arrow_filesystem(output, StorageConfig())
    return pq.read_table(path, filesystem=fs)


# ------------------------------------------------------------------------------------------------
# Pure functions, no Ray


def test_read_and_decode_gives_one_row_per_odd_file(tmp_path: Path) -> None:
    expected = odd_files(tmp_path)
    decoded = predict.read_and_decode(_listing(tmp_path), StorageConfig(), size=32, max_pixels=89_478_485)
    rows = {Path(r["path"]).name: r for r in decoded.drop_columns(["image"]).to_pylist()}
    assert sorted(rows) == sorted(expected)
    assert decoded["image"].combine_chunks().to_numpy().shape == (len(expected), 32, 32, 3)
    for name, want in expected.items():
        row = rows[name]
        if want.error:
            assert want.error in row["error"], name
            assert row["error_kind"] == ("too_large" if want.error == "too many pixels" else "corrupt"), name
            assert row["width"] is None and row["height"] is None
        else:
            assert row["error"] is None, (name, row["error"])
            assert (row["width"], row["height"]) == want.size, name


def test_read_and_decode_never_reads_rows_with_a_preset_error(tmp_path: Path) -> None:
    table = inputs._input_table(pa.array([str(tmp_path / "does-not-matter.jpg")]), pa.nulls(1, pa.int64()),
                                      pa.nulls(1, pa.int64()), pa.array(["outside allowed roots"]))
    decoded = predict.read_and_decode(table, StorageConfig(), size=8, max_pixels=100)
    assert decoded["error"].to_pylist() == ["outside allowed roots"]
    assert decoded["error_kind"].to_pylist() == ["refused"]
    assert not decoded["image"].combine_chunks().to_numpy().any()


def test_output_table_nulls_failed_rows_and_sorts_topk(model_uri: str) -> None:
    info = read_info(Store(model_uri))
    batch = pa.table({
        "path": ["a", "b", "c"], "size": pa.array([1, 2, None], pa.int64()),
        "mtime": pa.array([0, 0, None], pa.timestamp("us", tz="UTC")),
        "width": pa.array([5, None, 7], pa.int32()), "height": pa.array([6, None, 8], pa.int32()),
        "error": [None, "empty file", None], "error_kind": [None, "corrupt", None],
    })
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=2).astype(np.float32)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    table = label_module._output_table(batch, np.array([True, False, True]), probs, info, 3, "run-x", when)
    assert table.schema == OUTPUT_SCHEMA
    rows = table.to_pylist()
    assert [r["label_id"] for r in rows] == [int(probs[0].argmax()), None, int(probs[1].argmax())]
    assert rows[0]["label"] == info.classes[rows[0]["label_id"]]
    assert rows[1]["label"] is None and rows[1]["topk_labels"] is None and rows[1]["score"] is None
    assert rows[1]["error"] == "empty file" and rows[1]["error_kind"] == "corrupt" and rows[1]["size"] == 2
    for row, p in zip([rows[0], rows[2]], probs):
        assert row["topk_scores"] == sorted(row["topk_scores"], reverse=True) and len(row["topk_labels"]) == 3
        assert row["score"] == pytest.approx(p.max()) and row["topk_scores"][0] == row["score"]
    assert {r["run_id"] for r in rows} == {"run-x"} and {r["labeled_at"] for r in rows} == {when}


def test_pending_skips_staged_paths_and_same_keys_only() -> None:
    found = inputs._input_table(pa.array(["a", "b", "c", "d"]), pa.array([1, 2, 3, None], pa.int64()),
                                pa.array([1000, 2000, 3000, None], pa.int64()), pa.nulls(4, pa.string()))
    labelled = inputs._input_table(pa.array(["b", "c", "d"]), pa.array([2, 99, None], pa.int64()),
                                   pa.array([2000, 3000, None], pa.int64()), pa.nulls(3, pa.string()))
    seen = dedup.KeySet()
    seen.add(keys(labelled))
    todo = inputs.fresh(found, pa.array(["a"]), seen)
    # a: staged; b: same key; c: size changed; d: a manifest path (no size/mtime) labelled before
    assert todo["path"].to_pylist() == ["c"]


def test_normalize_collapses_local_paths_and_refuses_dotted_object_keys(tmp_path: Path) -> None:
    lake = str(tmp_path / "lake")
    for spelling in (f"{lake}/a.jpg", f"{lake}/./a.jpg", f"{lake}/x/../a.jpg", f"{lake}//a.jpg",
                     f"file://{lake}/a.jpg", f"/{lake}/a.jpg"):
        assert storage.normalize(spelling) == f"{lake}/a.jpg", spelling
    assert storage.normalize("S3://b/lake/a.jpg/") == "s3://b/lake/a.jpg"
    for key in ("s3://b/lake/../a.jpg", "s3://b/lake/./a.jpg", "s3://b/lake//a.jpg", "s3://b//a.jpg"):
        with pytest.raises(UsageError, match=f"^{re.escape(key)}: refused: an object key with"):
            storage.normalize(key)


def test_inside_compares_normalised_paths(tmp_path: Path) -> None:
    inside = storage.inside
    assert inside("s3://b/lake/x.jpg", "s3://b/lake") and inside("s3://b/lake/x.jpg", "s3://b/lake/")
    assert not inside("s3://b/lakeside/x.jpg", "s3://b/lake")
    assert not inside("s3://b/lake/../private/x.jpg", "s3://b/lake")
    assert not inside("s3://b/lake/x.jpg", "s3://b/lake/../lake")
    assert not inside("gs://b/lake/x.jpg", "s3://b/lake") and not inside("/b/lake/x.jpg", "s3://b/lake")
    assert inside("/data/lake/a.png", "file:///data/lake") and inside("/data/lake/a.png", "/data/x/../lake/")
    assert not inside("/data/lake/../etc/passwd", "/data/lake") and not inside("/data/lakeside/a", "/data/lake")
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "link").symlink_to("/etc")
    assert not inside(str(tmp_path / "lake" / "link" / "passwd"), str(tmp_path / "lake"))
    (tmp_path / "lake" / "a.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "to-a.jpg").symlink_to(tmp_path / "lake" / "a.jpg")
    (tmp_path / "elsewhere" / "to-lake").symlink_to(tmp_path / "lake")
    uris = ["s3://b/lake/x.jpg", "s3://b/lakeside/x.jpg", "s3://b/lake/../x.jpg", "/data/lake/a.png", "/data/lake/../a",
            str(tmp_path / "lake" / "link" / "passwd"), str(tmp_path / "elsewhere" / "to-a.jpg"),
            str(tmp_path / "elsewhere" / "to-lake" / "b.jpg"), str(tmp_path / "elsewhere" / "b.jpg"),
            str(tmp_path / "lake" / "a.jpg")]
    roots = ["s3://b/lake/", "file:///data/lake", str(tmp_path / "lake")]
    assert storage.inside_any(uris, roots) == [any(inside(u, r) for r in roots) for u in uris]
    assert storage.inside_any(uris, roots) == [True, False, False, True, False, False, True, True, False, True]


def test_an_object_key_with_dot_segments_is_a_refused_row_never_read() -> None:
    decoded = images.read_batch(np.array(["s3://b/lake/../private/x.jpg"]), StorageConfig(), size=8)
    assert decoded["error"].tolist() == ["s3://b/lake/../private/x.jpg: refused: an object key with '.', '..' "
                                         "or empty segments (the store takes keys literally)"]


def test_slices_spread_small_lakes_and_cap_big_ones() -> None:
    small = pa.table({"path": [str(i) for i in range(60)]})
    assert [s.num_rows for s in inputs.slices(small, workers=3)] == [5] * 12
    big = pa.table({"path": pa.array(np.arange(100_000).astype(str))})
    assert max(s.num_rows for s in inputs.slices(big, workers=2)) == 2000


# ------------------------------------------------------------------------------------------------
# Refusals: all before any Ray work


@pytest.mark.parametrize("sources", [{}, {"input": "a", "manifest": "b.csv"}])
def test_exactly_one_of_input_or_manifest(tmp_path: Path, sources: dict) -> None:
    with pytest.raises(UsageError, match="exactly one of --input"):
        label(LabelConfig(model="m", output=str(tmp_path / "out"), **sources))


def test_refuses_output_inside_input(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="inside the input"):
        label(LabelConfig(input=str(tmp_path), model="m", output=str(tmp_path / "labels")))


def test_refuses_a_missing_model_before_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(label_module.runtime, "ensure_ray", lambda: pytest.fail("Ray started"))
    with pytest.raises(UsageError, match="not a distcls model artifact"):
        label(LabelConfig(input=str(tmp_path), model=str(tmp_path / "nope"), output=str(tmp_path.parent / "o")))


def test_refuses_non_empty_output_without_overwrite(tmp_path: Path, synthetic_lake, model_uri: str) -> None:
    output = tmp_path / "labels"
    output.mkdir()
    (output / "part-0.parquet").write_bytes(b"old")
    (output / "_SUCCESS").write_text(json.dumps({"run_id": "old", "files": ["part-0.parquet"]}))
    with pytest.raises(UsageError, match=f"output {re.escape(str(output))} already holds a dataset.*--overwrite"):
        label(LabelConfig(input=str(synthetic_lake(1, labelled=False)), model=model_uri, output=str(output)))
    with pytest.raises(UsageError, match="not incremental"):
        label(LabelConfig(input=str(synthetic_lake(1, labelled=False)), model=model_uri, output=str(output),
                          incremental=True))


def test_refuses_gpu_without_gpus(ray_local, tmp_path: Path, synthetic_lake, model_uri: str) -> None:
    with pytest.raises(UsageError, match="no GPUs"):
        label(LabelConfig(input=str(synthetic_lake(1, labelled=False)), model=model_uri,
                          output=str(tmp_path / "out"), gpu=True))


# ------------------------------------------------------------------------------------------------
# Through Ray, on the S3 server


def test_odd_files_each_make_one_row_in_one_run(ray_local, s3_bucket: str, upload_folder, tmp_path: Path,
                                                model_uri: str) -> None:
    expected = odd_files(tmp_path)
    lake = upload_folder(tmp_path, f"{s3_bucket}/odd")
    summary = label(LabelConfig(input=lake, model=model_uri, output=f"s3://{s3_bucket}/labels", batch_size=8))
    rows = {r["path"]: r for r in _s3_table(summary["output"]).to_pylist()}
    assert sorted(rows) == sorted(f"{lake}/{name}" for name in expected)
    for name, want in expected.items():
        row = rows[f"{lake}/{name}"]
        if want.error:
            assert want.error in row["error"] and row["label"] is None, name
        else:
            assert row["error"] is None, (name, row["error"])
            assert (row["width"], row["height"]) == want.size, name
            assert row["label"] == row["topk_labels"][0] and len(row["topk_scores"]) == 5
    errors = sum(1 for e in expected.values() if e.error)
    assert (summary["images"], summary["errors"]) == (len(expected), errors)
    assert summary["labelled"] == len(expected) - errors


def test_manifest_with_missing_object_and_allowed_roots(ray_local, s3_bucket: str, upload_folder, synthetic_lake,
                                                       model_uri: str, tmp_path: Path) -> None:
    lake = upload_folder(synthetic_lake(1, labelled=False), f"{s3_bucket}/lake")
    upload_folder(synthetic_lake(1, labelled=False), f"{s3_bucket}/private")
    paths = [f"{lake}/img-000000.jpg", f"{lake}/img-000001.jpg", "img-000002.jpg", f"{lake}/img-000000.jpg",
             f"{lake}/missing.jpg", f"s3://{s3_bucket}/private/img-000003.jpg",
             f"{lake}/../private/img-000004.jpg", "./img-000000.jpg", "x/../img-000001.jpg"]
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"path": paths, "inventory_size": list(range(len(paths)))}), manifest)
    upload_folder(tmp_path, f"{s3_bucket}/lake")
    summary = label(LabelConfig(manifest=f"{lake}/manifest.parquet", model=model_uri, output=f"s3://{s3_bucket}/out",
                                allowed_roots=[lake]))
    rows = {r["path"]: r for r in _s3_table(summary["output"]).to_pylist()}
    assert len(rows) == summary["images"] == 6  # one row per distinct file, however the manifest spells it
    assert [rows[f"{lake}/img-00000{i}.jpg"]["error"] for i in range(3)] == [None] * 3
    assert rows[f"{lake}/missing.jpg"]["error"] == f"{lake}/missing.jpg: not found"
    assert rows[f"s3://{s3_bucket}/private/img-000003.jpg"]["error"] == "outside allowed roots"
    assert rows[f"{lake}/../private/img-000004.jpg"]["error"] == "outside allowed roots"
    assert rows[f"{lake}/missing.jpg"]["size"] is None and summary["errors"] == 3



# ------------------------------------------------------------------------------------------------
# One row per file, through the CLI


def _cli_rows(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, dict]:
    assert main(["label", *argv]) == 0, capsys.readouterr().err
    output = argv[argv.index("--output") + 1]
    return {r["path"]: r for r in pq.read_table(output).to_pylist()}


def test_a_symlink_loop_in_a_lake_gives_each_file_one_row(ray_local, tmp_path: Path, synthetic_lake,
                                                         model_uri: str, capsys) -> None:
    lake = tmp_path / "lake"
    (lake / "sub").mkdir(parents=True)
    source = synthetic_lake(1, labelled=False)
    for name in ("img-000000.jpg", "img-000001.jpg"):
        (lake / "sub" / name).write_bytes((source / name).read_bytes())
    (lake / "sub" / "loop").symlink_to("..")
    (lake / "again").symlink_to(lake / "sub")
    rows = _cli_rows(capsys, "--input", str(lake), "--model", model_uri, "--output", str(tmp_path / "out"))
    assert sorted(rows) == [str(lake / "sub" / "img-000000.jpg"), str(lake / "sub" / "img-000001.jpg")]
    assert all(r["error"] is None for r in rows.values())


def test_manifest_spellings_of_one_file_give_one_row_and_roots_compare_normalised(
        ray_local, tmp_path: Path, synthetic_lake, model_uri: str, capsys) -> None:
    lake, private = tmp_path / "lake", tmp_path / "private"
    lake.mkdir()
    private.mkdir()
    source = synthetic_lake(1, labelled=False)
    (lake / "a.jpg").write_bytes((source / "img-000000.jpg").read_bytes())
    (private / "p.jpg").write_bytes((source / "img-000001.jpg").read_bytes())
    entries = ["a.jpg", "./a.jpg", "x/../a.jpg", ".//a.jpg", f"{lake}//a.jpg", f"file://{lake}/a.jpg",
               f"{lake}/../private/p.jpg", "../private/p.jpg"]
    (lake / "_m.csv").write_text("path\n" + "\n".join(entries) + "\n")
    rows = _cli_rows(capsys, "--manifest", str(lake / "_m.csv"), "--model", model_uri,
                     "--output", str(tmp_path / "out"), "--allowed-roots", f"{tmp_path}/x/../lake/")
    assert sorted(rows) == [str(lake / "a.jpg"), str(private / "p.jpg")]
    assert rows[str(lake / "a.jpg")]["error"] is None
    assert rows[str(private / "p.jpg")]["error"] == "outside allowed roots"


def test_manifest_read_in_small_chunks_gives_each_file_once_with_roots_per_chunk(ray_local, tmp_path: Path) -> None:
    """Spellings of one file and repeats in different chunks of 2 rows: each file once, at its first
    row, outside-roots errors set chunk by chunk; --resume's test knows them all."""
    import ray

    (tmp_path / "lake").mkdir()
    entries = ["a.jpg", "b.jpg", "./a.jpg", "c.jpg", "x/../b.jpg", "/elsewhere/d.jpg", "c.jpg", "/elsewhere/d.jpg"]
    (tmp_path / "lake" / "m.csv").write_text("path\n" + "\n".join(entries) + "\n")
    config = LabelConfig(manifest=str(tmp_path / "lake" / "m.csv"), model="m", output=str(tmp_path / "out"),
                         allowed_roots=[str(tmp_path / "lake")])
    reader = inputs.InputReader(config, Store(config.manifest), chunk_rows=2)
    blocks = reader.read(workers=1)
    rows = pa.concat_tables(ray.get(blocks.refs)).to_pylist()
    lake = tmp_path / "lake"
    assert [(r["path"], r["error"]) for r in rows] == [
        (f"{lake}/a.jpg", None), (f"{lake}/b.jpg", None), (f"{lake}/c.jpg", None),
        ("/elsewhere/d.jpg", "outside allowed roots")]
    assert blocks.rows == 4
    staged = pa.table({"path": [f"{lake}/c.jpg", f"{lake}/e.jpg"], "size": pa.nulls(2, pa.int64()),
                       "mtime": pa.nulls(2, pa.timestamp("us", tz="UTC"))})
    assert reader.contains(staged).to_pylist() == [True, False]
    todo = reader.pending(staged["path"].combine_chunks(), None, "m", workers=1)
    assert sorted(pa.concat_tables(ray.get(todo.refs))["path"].to_pylist()) == [
        "/elsewhere/d.jpg", f"{lake}/a.jpg", f"{lake}/b.jpg"]


def test_a_bad_row_found_by_the_reading_actor_is_the_one_line_usage_error(
        ray_local, tmp_path: Path, model_uri: str, capsys) -> None:
    """A manifest whose first chunk is fine passes the driver's early check; the row with
    credentials in its second chunk is found by the actor that reads the inputs, and the CLI still
    says it in one line (exit 2) with the secret not shown and nothing written."""
    from distcls.lake import MANIFEST_CHUNK_ROWS

    rows = [f"/nowhere/{i}.jpg" for i in range(MANIFEST_CHUNK_ROWS + 10)]
    rows[MANIFEST_CHUNK_ROWS + 4] = "s3://AKIACANARY:CANARY/SECRET@bucket/x.jpg"
    manifest, output = tmp_path / "manifest.parquet", tmp_path / "out"
    pq.write_table(pa.table({"path": rows}), manifest)
    code = main(["label", "--manifest", str(manifest), "--model", model_uri, "--output", str(output)])
    out, err = capsys.readouterr()
    assert code == 2 and err.strip().splitlines() == [
        f"distcls label: error: {manifest}: data row {MANIFEST_CHUNK_ROWS + 5} holds a URI with credentials "
        "(user:password@; not shown): give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile"], err
    assert "CANARY" not in out + err
    assert not output.exists() or not [p for p in output.rglob("*") if p.is_file()]
