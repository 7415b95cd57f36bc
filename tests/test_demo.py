"""`distcls demo` end to end on a small synthetic lake: every promised output exists and is sane."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from distcls.cli import main


@pytest.mark.slow
def test_demo_makes_every_output(ray_local, tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--output", str(out), "--per-class", "30", "--unlabelled", "20", "--epochs", "3"])
    printed, said = capsys.readouterr()
    assert code == 0
    result = json.loads(printed)  # stdout: the JSON summary alone
    assert result["labelled"] == 20 and result["errors"] == 3  # the three broken files it planted
    for name in ("train/model/model.json", "train/model/model.safetensors", "train/curves.png",
                 "train/metrics.jsonl", "train/val.parquet", "evaluation/confusion.png",
                 "evaluation/metrics.json", "labels/_SUCCESS", "labels_summary.png"):
        assert (out / name).stat().st_size > 0, name
    rows = pd.read_parquet(out / "labels")
    assert len(rows) == 23 and rows["path"].is_unique
    assert set(rows.loc[rows["error"].notna(), "path"].map(lambda p: p.rsplit("/", 1)[-1])) == {
        "empty.jpg", "notes.jpg", "truncated.jpg"}
    assert "confusion matrix" in said and "outputs" in said


def test_more_workers_than_the_demo_holds_out_is_a_usage_error_naming_its_own_flags(tmp_path, capsys) -> None:
    """Training's check named --val-fraction, which the demo does not take."""
    assert main(["demo", "--per-class", "10", "--workers", "11", "--output", str(tmp_path / "demo")]) == 2
    assert capsys.readouterr().err.strip() == (
        "distcls demo: error: --workers 11 is more than the 10 images the demo holds out (a tenth of --per-class 10, "
        "per class): give --per-class 20 or more, or fewer --workers")
    assert not (tmp_path / "demo").exists()
