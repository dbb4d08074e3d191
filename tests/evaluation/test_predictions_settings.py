"""A predictions file remembers how its rows were made; resuming it with other decoding settings is refused
(before the model loads) instead of mixing two decodings in one file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonknee3d.evaluation.predict import predict
from reasonknee3d.evaluation.predictions_io import PredictionWriter, read_predictions, settings_path_for

A = {"box_decoding": "median", "grade_prior_tau": 0.0}
B = {"box_decoding": "median", "grade_prior_tau": 0.5}


def test_resuming_with_other_settings_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    with PredictionWriter(out, A) as w:
        w.write({"sample_id": "v:q1", "output": "x"})
        w.write({"sample_id": "v:q2", "output": "y"})
    assert json.loads(settings_path_for(out).read_text()) == A
    before = out.read_bytes()
    with pytest.raises(ValueError, match=r"p.jsonl holds 2 rows written with other settings \(grade_prior_tau: "
                                         r"0.0 then, 0.5 now; see .*p.settings.json\); resuming would mix them"):
        with PredictionWriter(out, B):
            pass
    assert out.read_bytes() == before and json.loads(settings_path_for(out).read_text()) == A
    with PredictionWriter(out, A) as w:  # the same settings resume
        assert not w.write({"sample_id": "v:q1", "output": "other"}) and w.write({"sample_id": "v:q3", "output": "z"})
    assert [r["sample_id"] for r in read_predictions(out)] == ["v:q1", "v:q2", "v:q3"]
    out.unlink()
    with PredictionWriter(out, B) as w:  # a new file takes the new settings
        w.write({"sample_id": "v:q1", "output": "x"})
    assert json.loads(settings_path_for(out).read_text()) == B


def test_predict_refuses_other_settings_before_loading_the_model(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    settings = {"constrained": True, "max_new_tokens": 512, "box_decoding": "median", "grade_prior_tau": 0.0,
                "grade_prior_split": "train"}
    with PredictionWriter(out, settings) as w:
        w.write({"sample_id": "v:q1", "output": "x"})
    with pytest.raises(ValueError, match=r"grade_prior_tau: 0.0 then, 1.0 now"):
        predict(tmp_path / "no-model", tmp_path, "test", out, grade_prior_tau=1.0)
    with pytest.raises(FileNotFoundError, match="no config.json"):  # same settings: on to loading the model
        predict(tmp_path / "no-model", tmp_path, "test", out)
