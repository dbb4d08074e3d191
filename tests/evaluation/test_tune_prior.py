"""``tune-grade-prior`` picks tau on val by balanced accuracy (ties to the smaller tau), keeps every tau's
predictions and report, and the CLI checks and passes on its numbers; ``predict --grade-prior-tau`` builds the
prior from the train split and runs with a real tiny model."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from reasonknee3d import cli
from reasonknee3d.answer import format_answer
from reasonknee3d.data.release import iter_samples
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.evaluation import predict as predict_module
from reasonknee3d.evaluation.tune_prior import RESULT_FILE, format_tuning, tune_grade_prior
from reasonknee3d.prompts import reasoning_steps
from reasonknee3d.schema import get_question

SHAPE = (16, 32, 32)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune") / "release"
    write_synthetic_release(root, n_volumes=12, shape=SHAPE, seed=3, questions=[1, 2, 16])
    assert list(iter_samples(root, "val"))
    return root


def _fake_predict(good_taus: set[float], calls: list[float]):
    """A predict that writes the reference answers at ``good_taus`` and all-normal answers otherwise."""
    def fake(model_dir, data_dir, split, out, grade_prior_tau=0.0, grade_prior_split="train", **kwargs):
        calls.append(grade_prior_tau)
        rows = []
        for s in iter_samples(data_dir, split):
            spec = get_question(s.question_id)
            zero = {f.key: 0 for f in spec.fields}
            text = s.answer if grade_prior_tau in good_taus else format_answer(
                spec, reasoning_steps(spec, zero), s.box, zero)
            rows.append(json.dumps({"sample_id": s.sample_id, "question_id": s.question_id, "output": text}))
        Path(out).write_text("\n".join(rows) + "\n")
        return SimpleNamespace(skipped=[], skipped_path=None)
    return fake


def test_the_tau_with_the_best_val_balanced_accuracy_is_chosen(release: Path, tmp_path: Path, monkeypatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(predict_module, "predict", _fake_predict({0.5, 1.0}, calls))
    import reasonknee3d.families as families
    monkeypatch.setattr(families, "family_of_model_dir", lambda model_dir: None)
    out = tmp_path / "tune"
    result = tune_grade_prior("model", release, out, taus=[1, 0, 0.5])
    assert calls == [0.0, 0.5, 1.0]
    assert result["chosen_tau"] == 0.5  # 0.5 and 1 tie at perfect answers: the smaller change wins
    assert result["by_tau"]["0.5"]["balanced_acc"] == pytest.approx(1.0)
    assert result["by_tau"]["0"]["balanced_acc"] < 1.0
    assert json.loads((out / RESULT_FILE).read_text()) == json.loads(json.dumps(result))
    for name in ("0", "0p5", "1"):
        assert (out / f"predictions_val_tau{name}.jsonl").is_file()
        assert (out / f"report_val_tau{name}" / "report.json").is_file()
    table = format_tuning(result)
    assert "     0.5        1.000" in table and "<- chosen" in table.splitlines()[2]
    assert "chosen tau 0.5 (highest balanced_acc on val" in table


def test_tuning_refuses_the_prior_split_and_bad_taus(release: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tune on another split than the one the prior counts \('train'\)"):
        tune_grade_prior("model", release, tmp_path, split="train")
    with pytest.raises(ValueError, match=r"taus must be one or more numbers >= 0, got \[-1.0\]"):
        tune_grade_prior("model", release, tmp_path, taus=[-1])


def test_the_cli_checks_tau_and_passes_it_to_predict(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ["predict", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "p.jsonl")]
    assert cli.main([*args, "--grade-prior-tau", "-1"]) == 2
    assert "argument --grade-prior-tau: expected a finite number >= 0, got '-1'" in capsys.readouterr().err
    assert cli.main([*args, "--grade-prior-tau", "0.5", "--unconstrained"]) == 2
    assert "--grade-prior-tau needs constrained decoding" in capsys.readouterr().err
    classifier = tmp_path / "rg"
    (classifier / "encoder").mkdir(parents=True)
    (classifier / "region_heads.json").write_text("{}")
    (classifier / "encoder" / "config.json").write_text("{}")
    assert cli.main(["predict", "--model", str(classifier), *args[3:], "--grade-prior-tau", "0.5"]) == 2
    assert "--grade-prior-tau is for a language model's decoding" in capsys.readouterr().err
    seen = {}

    def fake(*a, **kw):
        seen.update(kw)
        return SimpleNamespace(n_written=0, n_skipped=0, n_split=0, seconds=0.0, out=tmp_path / "p.jsonl",
                               skipped=[], skipped_path=None, grade_prior="grade prior (tau 0.5): corrects 3")
    monkeypatch.setattr(predict_module, "predict", fake)
    assert cli.main([*args, "--grade-prior-tau", "0.5"]) == 0
    assert seen["grade_prior_tau"] == 0.5
    assert "grade prior (tau 0.5): corrects 3" in capsys.readouterr().out


def test_predict_with_a_grade_prior_runs_a_real_tiny_model(release: Path, tmp_path: Path, tiny_3d_model_dir) -> None:
    model_dir = tiny_3d_model_dir(tmp_path / "model", {"input_shape": list(SHAPE)})
    out = tmp_path / "p.jsonl"
    res = predict_module.predict(model_dir, release, "val", out, batch_size=4, limit=3, max_new_tokens=200,
                                 grade_prior_tau=0.5)
    assert res.n_written == 3 and not res.skipped
    assert res.grade_prior.startswith("grade prior (tau 0.5): corrects ")
    with pytest.raises(ValueError, match="grade_prior_tau 0.5 needs constrained decoding"):
        predict_module.predict(model_dir, release, "val", tmp_path / "q.jsonl", constrained=False,
                               grade_prior_tau=0.5)
