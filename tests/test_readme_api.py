"""The README's Python API block runs as written: against the folders `reasonknee3d demo` writes."""
from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import pytest

import reasonknee3d
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.models import save_model_dir
from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import build_reasonknee3d
from reasonknee3d.schema import get_question

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 32, 32)


def readme_api_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- python-api -->\n```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert m, "README.md: no ```python block after <!-- python-api -->"
    return m.group(1)


def test_readme_api_block_uses_the_demo_model_folder():
    code = readme_api_block()
    assert '"demo_out/runs/3d/final"' in code and "reasonknee3d.answer_question(" in code
    assert "generate(" not in code  # parsed, constrained answers: never raw generation


def test_readme_api_block_runs_and_prints_a_parsed_answer(tmp_path, monkeypatch):
    # Where `reasonknee3d demo` writes: the release and the 3D model's final folder, here a tiny untrained one.
    write_synthetic_release(tmp_path / "demo_out" / "release", n_volumes=2, shape=SHAPE, seed=3)
    model, processor = build_reasonknee3d(
        {"language_model": {"tiny": {"hidden_size": 32, "intermediate_size": 64, "bpe_vocab_size": 300}},
         "encoder": {"patch_size": [4, 8, 8], "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32}, "num_bins": 32},
        {"input_shape": list(SHAPE)})
    save_model_dir(model, processor, tmp_path / "demo_out" / "runs" / "3d" / "final")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_api_block(), "README.md", "exec"), {"__name__": "readme"})
    box_line, severity_line, *text_lines = out.getvalue().splitlines()
    box = ast.literal_eval(box_line)
    assert box is None or (len(box) == 6 and all(0 <= box[2 * a] <= box[2 * a + 1] < SHAPE[a] for a in range(3)))
    severity = ast.literal_eval(severity_line)
    spec = get_question(30)
    assert set(severity) == set(spec.field_keys)
    assert all(g is None or g in spec.field(k).grades for k, g in severity.items())
    text = "\n".join(text_lines)
    assert text == text.strip() and text.count("<|box_start|>") <= 1
    assert all(line == line.rstrip() for line in text_lines)  # no runs of padding spaces at line ends


def test_answer_question_is_a_package_attribute_and_checks_the_id_first(tmp_path):
    assert reasonknee3d.answer_question.__module__ == "reasonknee3d.evaluation.infer"
    with pytest.raises(KeyError, match=r"1\.\.69"):
        reasonknee3d.answer_question(tmp_path / "no_model", tmp_path / "no.nii.gz", 70)
