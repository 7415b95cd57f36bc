"""The quality report of a labeling run (distcls.quality): distances and the report on hand-made
tables; the report committed with the run (``_SUCCESS.quality``, ``_report.png``) through the
commit protocol; drift end to end through the CLI, with --fail-on-drift's exit code 3; the model's
validation distribution in model.json; the distcls metrics on the Ray node's Prometheus endpoint."""
from __future__ import annotations

import json
import math
import re
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import torch

from distcls import quality, storage
from distcls.artifact import ModelInfo, model_id_of, read_info
from distcls.cli import EXIT_DRIFT, main
from distcls.dataset import COMMITTING, REPORT, STAGING, SUCCESS, Dataset
from distcls.errors import JobError, UsageError
from distcls.storage import Store
from distcls.models import create_model
from distcls.synthetic import CLASSES
from distcls.train import CachedShard, eval_epoch
from test_dataset import RUN_B, SETTINGS, _DiesAfterMoves, _inputs, _rows, _tree

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table(labels: list[str | None], scores: list[float | None], kinds: list[str | None]) -> pa.Table:
    return pa.table({"label": pa.array(labels, pa.string()), "score": pa.array(scores, pa.float32()),
                     "error_kind": pa.array(kinds, pa.string())})


# ------------------------------------------------------------------------------------------------
# Distances and the report


def test_total_variation_and_psi_of_hand_made_distributions() -> None:
    same = {"a": 0.5, "b": 0.5}
    assert quality.total_variation(same, same) == 0 and quality.psi(same, same) == 0
    assert quality.total_variation({"a": 1.0}, {"b": 1.0}) == 1.0
    p, q = {"a": 0.6, "b": 0.4}, {"a": 0.4, "b": 0.6}
    assert quality.total_variation(p, q) == pytest.approx(0.2)
    assert quality.psi(p, q) == pytest.approx(0.4 * math.log(1.5))  # 0.2 ln 1.5 + (-0.2) ln (2/3)
    # A class one side never predicts counts at PSI_EPSILON, so PSI stays finite.
    eps = quality.PSI_EPSILON
    assert quality.psi({"a": 1.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.5 * math.log(2) + (eps - 0.5) * math.log(eps / 0.5))
    assert quality.total_variation({"a": 1.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.5)


def test_the_report_of_hand_made_tables_counts_scores_errors_and_drift() -> None:
    tables = [_table(["a", "a", None], [0.9, 0.3, None], [None, None, "corrupt"]),
              _table(["b", None, "a"], [0.5, None, 1.0], [None, "not_found", None])]
    found = quality.tally(tables, low_confidence=0.5)
    validation = {"predicted": {"a": 0.5, "b": 0.5}, "mean_top1": 0.8, "images": 40}
    previous = ({"a": 3, "b": 0}, 2)
    block = quality.report(found, validation=validation, previous=previous, drift_threshold=0.2)

    assert block["images"] == 4 and block["labels"] == {"a": 3, "b": 1}
    assert block["shares"] == {"a": 0.75, "b": 0.25}
    assert block["mean_top1"] == pytest.approx((0.9 + 0.3 + 0.5 + 1.0) / 4, abs=1e-6)
    assert block["low_confidence"] == {"threshold": 0.5, "images": 1, "share": 0.25}  # 0.5 itself is not below
    assert sum(block["score_histogram"]) == 4 and block["score_histogram"][-1] == 1  # 1.0 in the last bin
    assert block["errors_by_kind"] == {"corrupt": 1, "not_found": 1}
    against_validation, against_previous = block["references"]["validation"], block["references"]["previous_runs"]
    assert against_validation["total_variation"] == pytest.approx(0.25)
    assert against_validation["psi"] == pytest.approx(quality.psi({"a": 0.75, "b": 0.25}, {"a": 0.5, "b": 0.5}), abs=1e-6)
    assert against_previous == {**against_previous, "runs": 2, "images": 3, "shares": {"a": 1.0, "b": 0.0}}
    assert against_previous["total_variation"] == pytest.approx(0.25)
    assert block["drift"] is True and block["drifted_from"] == ["validation", "previous_runs"]
    assert block["psi_epsilon"] == quality.PSI_EPSILON and block["notes"] == []

    calm = quality.report(found, validation=validation, previous=previous, drift_threshold=0.25)
    assert calm["drift"] is False and calm["drifted_from"] == []  # exceeding, not reaching, is drift


def test_without_references_or_labels_there_is_no_drift_and_the_report_says_why() -> None:
    nothing = quality.report(quality.tally([_table([None], [None], ["corrupt"])], 0.5), validation=None,
                             previous=({}, 0), drift_threshold=0.2)
    assert nothing["images"] == 0 and nothing["mean_top1"] is None and nothing["drift"] is False
    assert nothing["references"] == {"validation": None, "previous_runs": None}
    assert any("no validation distribution" in n for n in nothing["notes"])
    assert any("no earlier committed run" in n for n in nothing["notes"])


def test_previous_runs_pool_only_this_models_other_runs_that_have_a_report() -> None:
    summaries = [{"model_id": "m", "run_id": "r1", "quality": {"labels": {"a": 2}}},
                 {"model_id": "m", "run_id": "r2", "quality": {"labels": {"a": 1, "b": 4}}},
                 {"model_id": "other", "run_id": "r3", "quality": {"labels": {"c": 9}}},
                 {"model_id": "m", "run_id": "r4"},  # committed before the report existed
                 {"model_id": "m", "run_id": "this", "quality": {"labels": {"a": 100}}}]
    assert quality.previous_counts(summaries, "m", "this") == ({"a": 3, "b": 4}, 2)


# ------------------------------------------------------------------------------------------------
# The validation distribution in model.json


def test_eval_epoch_records_the_predicted_distribution_and_mean_top1() -> None:
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=3).eval()
    images = torch.randint(0, 256, (10, 32, 32, 3), dtype=torch.uint8)
    state = {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    evaluation = eval_epoch(model, CachedShard(images, torch.zeros(10, dtype=torch.int64)).batches(4), state,
                            torch.device("cpu"), 3)

    from distcls.transforms import normalize
    with torch.no_grad():
        probs = torch.softmax(model(normalize(images, state["mean"], state["std"])).float(), dim=1)
    expected = np.bincount(probs.argmax(1).numpy(), minlength=3)
    assert evaluation.images == 10 and evaluation.predicted == expected.tolist()
    assert evaluation.mean_top1 == pytest.approx(probs.max(1).values.mean().item(), abs=1e-6)
    distribution = evaluation.distribution(["x", "y", "z"])
    assert distribution["predicted"] == dict(zip(["x", "y", "z"], (expected / 10).tolist()))
    assert ModelInfo(arch="simple_cnn", classes=["x", "y", "z"], image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                     validation=distribution).validation.images == 10


def test_a_validation_distribution_keeps_model_id_and_old_artifacts_load(tiny_model: Path, tmp_path: Path) -> None:
    old = read_info(Store(str(tiny_model)))
    assert old.validation is None  # saved without one: loads as before
    with_validation = _with_validation(tiny_model, tmp_path / "model", {name: 0.1 for name in CLASSES})
    info = read_info(Store(with_validation))
    assert info.validation.images == 100 and info.model_id == old.model_id == model_id_of(info)
    odd = _with_validation(tiny_model, tmp_path / "odd", {"unicorn": 1.0})
    with pytest.raises(UsageError, match="field 'validation'|validation.predicted names classes"):
        read_info(Store(odd))


def _with_validation(model: Path | str, target: Path, predicted: dict[str, float]) -> str:
    """A copy of an artifact with a validation distribution in its model.json (not an identity
    field: the copy keeps the model_id)."""
    shutil.copytree(model, target)
    meta = json.loads((target / "model.json").read_text())
    meta["validation"] = {"predicted": predicted, "mean_top1": 0.8, "images": 100}
    (target / "model.json").write_text(json.dumps(meta))
    return str(target)


# ------------------------------------------------------------------------------------------------
# The report in the commit protocol


def _commit(output: Dataset, paths: list[str], report: bytes, *, incremental: bool = False,
            overwrite: bool = False) -> dict:
    """One run through the dataset's interface, as label.py does it, with a report."""
    with output.lock() as lock:
        output.roll_forward()
        output.check_existing(overwrite=overwrite, incremental=incremental)
        run = output.start_run(resume=False, settings=SETTINGS, model_id="m", inputs=_inputs(paths))
        lock.name_run(run.run_id)
        output.write_staged(run.run_id, [_rows(paths)], rows_per_file=2)
        output.staged_counts(run.run_id, expected=len(paths))
        return output.commit(run.run_id, {"run_id": run.run_id}, incremental=incremental, overwrite=overwrite,
                             lock=lock, report=report)


def test_the_report_is_committed_listed_and_replaced_by_overwrite(tmp_path: Path) -> None:
    output = Dataset(Store(str(tmp_path)))
    first = _commit(output, ["a", "b"], PNG_MAGIC + b"first", incremental=True)
    second = _commit(output, ["c"], PNG_MAGIC + b"second", incremental=True)
    for summary, body in ((first, b"first"), (second, b"second")):
        assert summary["report"] == f"run={summary['run_id']}/{REPORT}"
        assert (tmp_path / summary["report"]).read_bytes() == PNG_MAGIC + body
        assert REPORT not in " ".join(summary["files"])  # files stay the Parquet files
    # Dataset readers skip the _-named report: the output reads as the rows, partitioned by run.
    table = pads.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()
    assert sorted(table["path"].to_pylist()) == ["a", "b", "c"]

    plain = _commit(output, ["d"], PNG_MAGIC + b"plain", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([REPORT, SUCCESS, *plain["files"]])
    assert (tmp_path / REPORT).read_bytes() == PNG_MAGIC + b"plain" and plain["report"] == REPORT
    again = _commit(output, ["e"], PNG_MAGIC + b"again", overwrite=True)  # the same name, replaced
    assert (tmp_path / REPORT).read_bytes() == PNG_MAGIC + b"again"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([REPORT, SUCCESS, *again["files"]])


def test_the_report_is_committed_and_replaced_on_s3(s3_bucket: str) -> None:
    """On an object store a move is a copy and a delete: the same outcome."""
    output = Dataset(Store(f"s3://{s3_bucket}/out"))
    fs, root = output.store.fs, output.store.path()
    first = _commit(output, ["a"], PNG_MAGIC + b"first", incremental=True)
    assert fs.open_input_stream(f"{root}/{first['report']}").read() == PNG_MAGIC + b"first"
    plain = _commit(output, ["b"], PNG_MAGIC + b"plain", overwrite=True)
    names = sorted(info.path.removeprefix(root + "/") for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if info.type == pafs.FileType.File)
    assert names == sorted([REPORT, SUCCESS, *plain["files"]])
    assert fs.open_input_stream(f"{root}/{REPORT}").read() == PNG_MAGIC + b"plain"


def test_an_overwrite_interrupted_at_any_rename_commits_the_new_report_or_keeps_the_old(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain --overwrite: the old and the new report share the name _report.png. A crash at each
    rename of the commit (counted on a whole commit first: retire the old _SUCCESS, its report
    deleted just before, move the Parquet file and the report, and what the store writes by
    rename) is rolled forward to the new report, or, before the plan exists, leaves the old one."""
    real = storage.arrow_filesystem

    def overwrite(root: Path, moves: int) -> _DiesAfterMoves:
        fs = _DiesAfterMoves(moves)
        monkeypatch.setattr(storage, "arrow_filesystem", lambda uri, config: (fs, real(uri, config)[1]))
        try:
            _commit(Dataset(Store(str(root))), ["new"], PNG_MAGIC + b"new", overwrite=True)
        finally:
            monkeypatch.undo()
        return fs

    _commit(Dataset(Store(str(tmp_path / "whole"))), ["old"], PNG_MAGIC + b"old")
    renames = 1000 - overwrite(tmp_path / "whole", 1000).moves
    assert renames >= 3  # at least: retire, move the Parquet file, move the report
    for moves in range(renames):
        root = tmp_path / f"crash-{moves}"
        _commit(Dataset(Store(str(root))), ["old"], PNG_MAGIC + b"old")
        with pytest.raises(KeyboardInterrupt):
            overwrite(root, moves)
        planned = (root / COMMITTING).exists()
        finished = Dataset(Store(str(root))).roll_forward()
        expected = "new" if planned else "old"
        assert (root / REPORT).read_bytes() == PNG_MAGIC + expected.encode(), moves
        assert pd.read_parquet(root)["path"].tolist() == [expected], moves
        files = finished["files"] if planned else json.loads((root / SUCCESS).read_text())["files"]
        assert sorted(p.name for p in root.iterdir() if p.name != STAGING) == sorted([REPORT, SUCCESS, *files]), moves


def _plan_with_report(output: Path) -> dict:
    """A staged file and report of RUN_B and the plan committing them, as distcls writes it."""
    Dataset(Store(str(output))).write_staged(RUN_B, [_rows(["n1"])], rows_per_file=10)
    staged = f"{STAGING}/{RUN_B}/" + next((output / STAGING / RUN_B).iterdir()).name
    (output / STAGING / RUN_B / REPORT).write_bytes(PNG_MAGIC)
    plan = {"run_id": RUN_B, "delete": [], "success": SUCCESS,
            "moves": [[staged, f"part-{RUN_B}-00000.parquet"], [f"{STAGING}/{RUN_B}/{REPORT}", REPORT]],
            "summary": {"run_id": RUN_B, "files": [f"part-{RUN_B}-00000.parquet"], "report": REPORT}}
    (output / COMMITTING).write_text(json.dumps(plan))
    return plan


def test_a_found_plan_with_a_report_is_rolled_forward(tmp_path: Path) -> None:
    _plan_with_report(tmp_path)
    summary = Dataset(Store(str(tmp_path))).roll_forward()
    assert summary["report"] == REPORT and (tmp_path / REPORT).read_bytes() == PNG_MAGIC
    assert json.loads((tmp_path / SUCCESS).read_text()) == summary and not (tmp_path / STAGING).exists()


def _move_report_to(plan: dict, name: str) -> None:
    plan["moves"][1][1] = name


@pytest.mark.parametrize("entry, tamper", [
    (f"'notes.png' is not the report of run {RUN_B}", lambda plan: _move_report_to(plan, "notes.png")),
    (f"'run={RUN_B}/{REPORT}' is not the report", lambda plan: _move_report_to(plan, f"run={RUN_B}/{REPORT}")),
    ("the summary's report differs", lambda plan: plan["summary"].pop("report")),
    ("the summary's report differs", lambda plan: plan["summary"].update(report="run=x/_report.png")),
    (f"'{REPORT}' is a report whose {SUCCESS} the plan does not delete", lambda plan: plan.update(delete=[REPORT])),
], ids=["report-moved-elsewhere", "report-into-a-partition", "report-not-in-summary", "summary-names-another-report",
        "report-deleted-alone"])
def test_a_tampered_plan_with_a_report_is_refused_and_nothing_is_touched(tmp_path: Path, entry: str, tamper) -> None:
    output = tmp_path / "out"
    _commit(Dataset(Store(str(output))), ["old"], PNG_MAGIC + b"old")
    plan = _plan_with_report(output)
    tamper(plan)
    (output / COMMITTING).write_text(json.dumps(plan))
    before = _tree(tmp_path)
    with pytest.raises(JobError, match=re.escape(entry)):
        Dataset(Store(str(output))).roll_forward()
    assert _tree(tmp_path) == before


def test_a_partition_left_with_its_report_and_no_success_is_deleted(tmp_path: Path) -> None:
    """A plan lost after the moves: the partition holds its Parquet files and its report."""
    output = Dataset(Store(str(tmp_path)))
    _commit(output, ["a"], PNG_MAGIC, incremental=True)
    left = tmp_path / "run=20260101T000000Z-aaaaaa"
    left.mkdir()
    (left / "part-00000.parquet").write_bytes(b"rows")
    (left / REPORT).write_bytes(PNG_MAGIC)
    _commit(output, ["b"], PNG_MAGIC, incremental=True)
    assert not left.exists()


# ------------------------------------------------------------------------------------------------
# End to end through the CLI


@pytest.mark.parametrize("flag, value", [("--drift-threshold", "1.5"), ("--drift-threshold", "0"),
                                         ("--low-confidence", "-0.1"), ("--low-confidence", "nan")])
def test_a_bad_threshold_exits_2_with_one_line_naming_the_flag(tmp_path: Path, capsys, flag: str, value: str) -> None:
    code = main(["label", "--input", str(tmp_path), "--model", str(tmp_path), "--output", str(tmp_path / "out"),
                 flag, value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "out").exists()


def _success(output: Path, run_id: str) -> dict:
    return json.loads((output / f"run={run_id}" / SUCCESS).read_text())


def test_a_drifted_lake_sets_drift_and_fail_on_drift_exits_3_with_the_run_committed(
        ray_local, tmp_path: Path, synthetic_lake, model_uri: str, capsys) -> None:
    """Run 1: a lake of every class (and one broken file) with a model whose model.json has no
    validation distribution. Run 2: a lake of only two classes, with the same model carrying one
    (uniform): drift against both references, exit 3, committed. Then `runs` and the metrics."""
    balanced = tmp_path / "balanced"
    shutil.copytree(synthetic_lake(2, labelled=False), balanced)
    (balanced / "broken.jpg").write_bytes(b"not an image")
    drifted = tmp_path / "drifted"
    drifted.mkdir()
    for name in CLASSES[:2]:
        for file in (synthetic_lake(3) / name).glob("*.jpg"):
            shutil.copy(file, drifted / f"{name}-{file.name}")
    output = tmp_path / "out"
    argv = ["label", "--model", model_uri, "--output", str(output), "--incremental", "--batch-size", "16"]

    assert main([*argv, "--input", str(balanced)]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = pd.read_parquet(output / f"run={first['run_id']}")
    check = first["quality"]
    assert first == _success(output, first["run_id"])
    assert check["images"] == rows["label"].notna().sum() == 20 and check["errors_by_kind"] == {"corrupt": 1}
    assert check["labels"] == rows["label"].value_counts().to_dict()
    assert check["mean_top1"] == pytest.approx(rows["score"].mean(), abs=1e-5)
    assert check["low_confidence"]["images"] == (rows["score"] < 0.5).sum()
    assert check["references"] == {"validation": None, "previous_runs": None} and check["drift"] is False
    assert any("no validation distribution" in note for note in check["notes"])
    assert first["report"] == f"run={first['run_id']}/{REPORT}"
    assert (output / first["report"]).read_bytes().startswith(PNG_MAGIC)

    model = _with_validation(model_uri, tmp_path / "model", {name: 1 / len(CLASSES) for name in CLASSES})
    code = main([*argv, "--model", model, "--input", str(drifted), "--fail-on-drift"])
    captured = capsys.readouterr()
    second = json.loads(captured.out.strip().splitlines()[-1])
    assert code == EXIT_DRIFT == 3 and "drift" in captured.err.strip().splitlines()[-1]
    assert second == _success(output, second["run_id"]) and second["model_id"] == first["model_id"]
    drift = second["quality"]
    assert drift["drift"] is True and drift["drifted_from"] == ["validation", "previous_runs"]
    previous = drift["references"]["previous_runs"]
    assert previous["runs"] == 1 and previous["images"] == 20
    assert previous["total_variation"] == pytest.approx(
        quality.total_variation(drift["shares"], quality.shares(check["labels"])), abs=1e-5)
    assert drift["references"]["validation"]["total_variation"] > 0.2
    assert (output / second["report"]).read_bytes().startswith(PNG_MAGIC)
    # The data is valid: committed, read by a dataset reader beside the reports.
    table = pads.dataset(str(output), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 21 + 6 and set(table["run"].to_pylist()) == {first["run_id"], second["run_id"]}

    assert main(["runs", str(output), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["run_id"], r["drift"]) for r in listed] == [(second["run_id"], True), (first["run_id"], False)]
    assert listed[0]["quality"] == drift and listed[1]["mean_top1"] == check["mean_top1"]
    assert main(["runs", str(output)]) == 0
    table_lines = capsys.readouterr().out.splitlines()
    assert table_lines[0].split()[5:7] == ["mean_top1", "drift"] and table_lines[1].split()[6] == "yes"

    _assert_metrics(str(output), first, second)


def _assert_metrics(output: str, first: dict, second: dict, timeout_s: float = 60) -> None:
    """The distcls metrics on the local Ray node's Prometheus endpoint: counted by the inference
    actors (images, errors by kind) and set by the driver (gauges of the last run of this output).
    Ray exports every few seconds: polled until a deadline."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    tagged = re.escape(f'output="{output}"')
    deadline = time.time() + timeout_s
    while True:
        samples = _samples(urllib.request.urlopen(url, timeout=10).read().decode())
        drift = [v for k, v in samples.items() if k.startswith("ray_distcls_label_drift{") and re.search(tagged, k)
                 and 'reference="previous_runs"' in k]
        labelled = sum(v for k, v in samples.items() if k.startswith("ray_distcls_images_labelled_total{"))
        corrupt = sum(v for k, v in samples.items()
                      if k.startswith("ray_distcls_image_errors_total{") and 'kind="corrupt"' in k)
        if drift and labelled >= 26 and corrupt >= 1 or time.time() > deadline:
            break
        time.sleep(1)
    # Other tests of this session label through the same Ray: the counters are at least this test's images.
    assert labelled >= 26 and corrupt >= 1, {k: v for k, v in samples.items() if "distcls" in k}
    assert drift == [pytest.approx(second["quality"]["references"]["previous_runs"]["total_variation"], abs=1e-6)]
    rate = [v for k, v in samples.items() if k.startswith("ray_distcls_images_per_second{") and re.search(tagged, k)]
    seconds = [v for k, v in samples.items() if k.startswith("ray_distcls_run_seconds{") and re.search(tagged, k)]
    assert rate == [pytest.approx(second["images_per_s"])] and seconds == [pytest.approx(second["seconds"])]


def _samples(text: str) -> dict[str, float]:
    """Prometheus text format -> {name{labels}: value}."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


def test_the_report_of_a_model_with_thousands_of_classes_draws_only_the_largest_shares(monkeypatch) -> None:
    """A 20,000-class model (its validation distribution names them all): one bar and tick per
    class took about a minute per 5,000 classes on the driver, holding the lock after the run.
    The report draws the classes with the largest shares only, and says so."""
    from matplotlib.axes import Axes

    from distcls import plots

    classes = [f"class-{i:05d}" for i in range(20000)]
    found = quality.tally([_table(classes[:3] * 10, [0.9] * 30, [None] * 30)], 0.5)
    validation = {"images": 40000, "mean_top1": 0.5, "predicted": {c: 1 / len(classes) for c in classes}}
    checked = quality.report(found, validation=validation, previous=({c: 2 for c in classes}, 1), drift_threshold=0.2)
    ticks, titles = [], []
    real_ticks, real_set = Axes.set_xticks, Axes.set

    def spy_ticks(self, positions, *args, **kwargs):
        ticks.append(len(positions))
        return real_ticks(self, positions, *args, **kwargs)

    def spy_set(self, **kwargs):
        titles.append(kwargs.get("title"))
        return real_set(self, **kwargs)

    monkeypatch.setattr(Axes, "set_xticks", spy_ticks)
    monkeypatch.setattr(Axes, "set", spy_set)
    assert plots.quality_report(checked, "r").startswith(PNG_MAGIC)
    assert ticks == [plots.MAX_CLASSES_DRAWN]
    assert f"{plots.MAX_CLASSES_DRAWN} with the largest shares of 20000" in titles[0]


@pytest.mark.parametrize("predicted", [{}, {"circle": 0.0}, {"circle": 0.2, "square": 0.2}])
def test_a_validation_distribution_that_is_not_one_is_refused_in_one_line(
        no_ray, tiny_model: Path, synthetic_lake, tmp_path: Path, capsys, predicted: dict) -> None:
    """A model.json whose validation shares do not add up to 1 (empty, all zero, partial): every
    run was at total variation >= 1/2 from it, so drift was set on every run (exit 3 with
    --fail-on-drift). Refused as the bad artifact it is, before any Ray work."""
    model = _with_validation(tiny_model, tmp_path / "model", predicted)
    code = main(["label", "--input", str(synthetic_lake(1, labelled=False)), "--model", model,
                 "--output", str(tmp_path / "out"), "--fail-on-drift"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "validation" in err and "add up to" in err, err
    assert not (tmp_path / "out").exists()
