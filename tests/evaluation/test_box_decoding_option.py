"""``--box-decoding`` reaches the generation of ``predict`` and ``infer``; an unknown value is refused by argparse."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from reasonknee3d import cli
from reasonknee3d.constants import BOX_DECODINGS, DEFAULT_BOX_DECODING
from reasonknee3d.evaluation import infer as infer_module
from reasonknee3d.evaluation import predict as predict_module


def _capture(monkeypatch, module, name, result):
    seen = {}

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return result
    monkeypatch.setattr(module, name, fake)
    return seen


@pytest.mark.parametrize("choice", [None, *BOX_DECODINGS])
def test_predict_and_infer_pass_the_box_decoding_on(tmp_path: Path, monkeypatch, choice) -> None:
    extra = [] if choice is None else ["--box-decoding", choice]
    expected = DEFAULT_BOX_DECODING if choice is None else choice
    done = SimpleNamespace(n_written=0, n_skipped=0, n_split=0, seconds=0.0, out=tmp_path / "p.jsonl", skipped=[],
                           skipped_path=None)
    seen = _capture(monkeypatch, predict_module, "predict", done)
    cli.main(["predict", "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "p.jsonl"),
              *extra])
    assert seen["box_decoding"] == expected
    seen = _capture(monkeypatch, infer_module, "infer", SimpleNamespace(text="", box=None, severity={}, png=None))
    cli.main(["infer", "--model", str(tmp_path), "--volume", str(tmp_path / "v.nii.gz"), "--question-id", "1",
              *extra])
    assert seen["box_decoding"] == expected


def test_an_unknown_box_decoding_is_refused(tmp_path: Path, capsys) -> None:
    assert cli.main(["predict", "--model", str(tmp_path), "--data", str(tmp_path), "--out",
                     str(tmp_path / "p.jsonl"), "--box-decoding", "mean"]) == 2
    assert "argument --box-decoding: invalid choice: 'mean'" in capsys.readouterr().err


def test_predict_refuses_an_unknown_box_decoding_before_loading_anything(tmp_path: Path) -> None:
    out = tmp_path / "p.jsonl"
    with pytest.raises(ValueError, match=r"box_decoding must be one of \('median', 'argmax'\), got 'mean'"):
        predict_module.predict(tmp_path / "no-model", tmp_path, "test", out, box_decoding="mean")
    assert not out.exists()
