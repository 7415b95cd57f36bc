"""Evaluation metrics against a hand-computed confusion matrix, and the CLI end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from distcls.cli import main
from distcls.evaluate import confusion_matrix, scores
from distcls.storage import Store


def test_scores_match_a_hand_computed_example() -> None:
    # truth:     a a a b b c      predicted: a b a b c c
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 0, 1, 2, 2])
    matrix = confusion_matrix(truth, predicted, 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    result = scores(matrix, ["a", "b", "c"])
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["images"] == 6
    a, b, c = (result["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"]) == (pytest.approx(0.5), pytest.approx(0.5))
    assert (c["precision"], c["recall"]) == (pytest.approx(0.5), 1.0)
    assert a["f1"] == pytest.approx(0.8) and c["f1"] == pytest.approx(2 / 3)
    assert result["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_never_predicted_class_has_zero_precision_not_nan() -> None:
    result = scores(confusion_matrix(np.array([0, 1]), np.array([0, 0]), 2), ["a", "b"])
    assert result["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_evaluate_cli_matches_predictions_made_by_hand(ray_local, tiny_model, synthetic_lake, tmp_path, capsys) -> None:
    """The report's matrix equals one built here from direct model calls on the same decoded images."""
    from distcls import load_model
    from distcls.artifact import predict_proba
    from distcls.images import decode

    lake = synthetic_lake(2)
    model, info = load_model(Store(str(tiny_model)))
    expected = np.zeros((10, 10), dtype=int)
    for path in sorted(lake.rglob("*.jpg")):
        pixels = decode(path.read_bytes(), info.image_size)[0]
        expected[info.classes.index(path.parent.name), int(predict_proba(model, info, pixels[None]).argmax())] += 1

    code = main(["evaluate", "--input", str(lake), "--model", str(tiny_model), "--report", str(tmp_path / "report")])
    out, err = capsys.readouterr()
    assert code == 0
    summary = json.loads(out)  # stdout is the JSON summary and nothing else
    assert summary["images"] == 20
    assert summary["accuracy"] == pytest.approx(np.trace(expected) / 20)
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert report["classes"] == info.classes
    assert report["confusion_matrix"] == expected.tolist()
    assert (tmp_path / "report" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "precision" in err and "confusion matrix" in err  # the table is for people: stderr


def test_evaluate_on_a_class_the_model_does_not_know_is_a_usage_error(tmp_path, tiny_model, capsys) -> None:
    from PIL import Image

    (tmp_path / "lake" / "zebra").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "lake" / "zebra" / "z.png")
    (tmp_path / "lake" / "circle").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "lake" / "circle" / "c.png")
    assert main(["evaluate", "--input", str(tmp_path / "lake"), "--model", str(tiny_model)]) == 2
    assert "zebra" in capsys.readouterr().err
