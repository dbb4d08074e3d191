"""Run every command of the `reasonknee3d` command line on bad input and tabulate what it answers.

Each case is one command with one bad input (a missing file, a malformed file, a bad value, a bad config key,
an output folder the command did not write). A case passes when the command exits with status 2 and prints
exactly one line to stderr, ``reasonknee3d <command>: error: ...``, with no traceback. The script also counts
what the goal is to never see:

- tracebacks: any ``Traceback`` in the output;
- silent wrong results: a bad input accepted (exit status 0);
- data lost: a file the cases' fixtures held before the run that is changed or gone after it.

    python scripts/bad_input_table.py [--out docs/hardening.md]

writes the Markdown table (default: print it). ``tests/test_cli_errors.py`` runs the same cases.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Case:
    command: str
    """The subcommand (the first element of ``argv``)."""
    what: str
    """The bad input, in words."""
    argv: tuple[str, ...]
    """Arguments after ``reasonknee3d``; ``{tmp}`` is replaced by the fixtures folder."""

    def resolved(self, tmp: Path) -> list[str]:
        return [a.replace("{tmp}", str(tmp)) for a in self.argv]


def _c(what: str, *argv: str) -> Case:
    return Case(argv[0], what, tuple(argv))


CASES: tuple[Case, ...] = (
    _c("output folder holds files synth did not write", "synth", "{tmp}/foreign", "--volumes", "2"),
    _c("--volumes 0", "synth", "{tmp}/new_release", "--volumes", "0"),
    _c("--shape with a zero size", "synth", "{tmp}/new_release", "--shape", "0", "64", "64"),
    _c("--shape with two sizes", "synth", "{tmp}/new_release", "--shape", "32", "64"),
    _c("--shape below the phantom's minimum", "synth", "{tmp}/new_release", "--shape", "8", "16", "16"),
    _c("DICOM folder missing", "convert-dicom", "{tmp}/missing_dir", "{tmp}/out.nii.gz"),
    _c("a file in the series is not DICOM", "convert-dicom", "{tmp}/junk_dicom", "{tmp}/out.nii.gz"),
    _c("release folder missing", "check-release", "{tmp}/missing_dir"),
    _c("--axis-check-volumes negative", "check-release", "{tmp}/foreign", "--axis-check-volumes", "-1"),
    _c("--json is a folder", "check-release", "{tmp}/foreign", "--json", "{tmp}/foreign"),
    _c("folder is not a release", "check-release", "{tmp}/foreign"),
    _c("release folder missing", "export-references", "--data", "{tmp}/missing_dir", "--out", "{tmp}/r.jsonl"),
    _c("unknown --split", "export-references", "--data", "{tmp}/foreign", "--split", "dev", "--out",
       "{tmp}/r.jsonl"),
    _c("unknown preset name", "preprocess", "--data", "{tmp}/foreign", "--config", "tiny_4d"),
    _c("config YAML with an unknown key", "preprocess", "--data", "{tmp}/foreign", "--config", "{tmp}/bad_key.yaml"),
    _c("unknown config key", "init", "--config", "tiny_3d", "--out", "{tmp}/init_out", "model.nope=1"),
    _c("config value of the wrong type", "init", "--config", "tiny_3d", "--out", "{tmp}/init_out",
       "model.num_bins=abc"),
    _c("output folder holds files init did not write", "init", "--config", "tiny_3d", "--out", "{tmp}/foreign"),
    _c("--max-steps 0", "train", "--config", "tiny_3d", "--max-steps", "0"),
    _c("unknown config key", "train", "--config", "tiny_3d", "--data", "{tmp}/foreign", "train.nope=3"),
    _c("non-finite learning rate", "train", "--config", "tiny_3d", "--data", "{tmp}/foreign",
       "train.learning_rate=.inf"),
    _c("config YAML that is not a mapping", "train", "--config", "{tmp}/list.yaml"),
    _c("model folder missing", "predict", "--model", "{tmp}/missing_dir", "--data", "{tmp}/foreign", "--out",
       "{tmp}/p.jsonl"),
    _c("--batch-size 0", "predict", "--model", "{tmp}/missing_dir", "--data", "{tmp}/foreign", "--out",
       "{tmp}/p.jsonl", "--batch-size", "0"),
    _c("--limit negative", "predict", "--model", "{tmp}/missing_dir", "--data", "{tmp}/foreign", "--out",
       "{tmp}/p.jsonl", "--limit", "-1"),
    _c("--max-new-tokens 0", "predict", "--model", "{tmp}/missing_dir", "--data", "{tmp}/foreign", "--out",
       "{tmp}/p.jsonl", "--max-new-tokens", "0"),
    _c("--out is a folder", "predict", "--model", "{tmp}/missing_dir", "--data", "{tmp}/foreign", "--out",
       "{tmp}/foreign"),
    _c("--grade-prior-tau negative", "predict", "--model", "{tmp}/missing_dir", "--data", "{tmp}/foreign", "--out",
       "{tmp}/p.jsonl", "--grade-prior-tau", "-0.5"),
    _c("model folder missing", "tune-grade-prior", "--model", "{tmp}/missing_dir", "--data", "{tmp}/foreign",
       "--out", "{tmp}/tune"),
    _c("--taus with a negative value", "tune-grade-prior", "--model", "{tmp}/missing_dir", "--data",
       "{tmp}/foreign", "--out", "{tmp}/tune", "--taus", "0", "-1"),
    _c("release folder missing", "zeroshot", "--backend", "hf", "--model", "{tmp}/missing_dir", "--data",
       "{tmp}/missing_dir", "--out", "{tmp}/p.jsonl"),
    _c("unknown --backend", "zeroshot", "--backend", "vllm", "--model", "m", "--data", "{tmp}/foreign", "--out",
       "{tmp}/p.jsonl"),
    _c("--frames 0", "zeroshot", "--backend", "openai", "--model", "m", "--data", "{tmp}/foreign", "--out",
       "{tmp}/p.jsonl", "--frames", "0"),
    _c("--concurrency 0", "zeroshot", "--backend", "openai", "--model", "m", "--data", "{tmp}/foreign", "--out",
       "{tmp}/p.jsonl", "--concurrency", "0"),
    _c("--timeout not finite", "zeroshot", "--backend", "openai", "--model", "m", "--data", "{tmp}/foreign",
       "--out", "{tmp}/p.jsonl", "--timeout", "inf"),
    _c("--timeout 0", "zeroshot", "--backend", "openai", "--model", "m", "--data", "{tmp}/foreign",
       "--out", "{tmp}/p.jsonl", "--timeout", "0"),
    _c("references file missing", "score", "--predictions", "{tmp}/bad_preds.jsonl", "--references",
       "{tmp}/missing.jsonl", "--out", "{tmp}/score_out"),
    _c("references line with an unknown question id", "score", "--predictions", "{tmp}/bad_preds.jsonl",
       "--references", "{tmp}/refs_bad_question.jsonl", "--out", "{tmp}/score_out"),
    _c("volume file missing", "infer", "--model", "{tmp}/missing_dir", "--volume", "{tmp}/missing.nii.gz",
       "--question-id", "1"),
    _c("volume is not NIfTI", "infer", "--model", "{tmp}/missing_dir", "--volume", "{tmp}/not_nifti.nii.gz",
       "--question-id", "1"),
    _c("--question-id 70 (valid: 1..69)", "infer", "--model", "{tmp}/missing_dir", "--volume",
       "{tmp}/not_nifti.nii.gz", "--question-id", "70"),
    _c("--question-id 0", "infer", "--model", "{tmp}/missing_dir", "--volume", "{tmp}/not_nifti.nii.gz",
       "--question-id", "0"),
    _c("--png with a .jpg name", "infer", "--model", "{tmp}/missing_dir", "--volume", "{tmp}/not_nifti.nii.gz",
       "--question-id", "1", "--png", "{tmp}/overlay.jpg"),
    _c("--box with min > max", "infer", "--model", "{tmp}/missing_dir", "--volume", "{tmp}/not_nifti.nii.gz",
       "--question-id", "1", "--box", "5", "2", "0", "3", "0", "3"),
    _c("--box with five values", "infer", "--model", "{tmp}/missing_dir", "--volume", "{tmp}/not_nifti.nii.gz",
       "--question-id", "1", "--box", "0", "2", "0", "3", "0"),
    _c("--box outside the volume", "infer", "--model", "{tmp}/missing_dir", "--volume", "{tmp}/small.nii.gz",
       "--question-id", "1", "--box", "0", "2", "0", "3", "0", "30"),
    _c("output folder holds files demo did not write", "demo", "--out", "{tmp}/foreign"),
    _c("--out is a file", "demo", "--out", "{tmp}/refs.jsonl"),
    _c("--repeats not a number", "bench", "--repeats", "three"),
    _c("--repeats 0", "bench", "--repeats", "0"),
    _c("--out is a folder", "bench", "--out", "{tmp}/foreign"),
    _c("unknown --category", "questions", "--category", "knee"),
)
"""Every command with at least one bad input; fixtures come from ``make_fixtures``."""


def make_fixtures(tmp: Path) -> Path:
    """Write the files the cases name under ``tmp`` (a folder of the user's, bad inputs, valid references)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "foreign").mkdir(exist_ok=True)
    (tmp / "foreign" / "notes.txt").write_text("the user's own file: no command may change or delete it\n")
    (tmp / "junk_dicom").mkdir(exist_ok=True)
    (tmp / "junk_dicom" / "IM0001").write_bytes(b"not a DICOM file\n")
    (tmp / "not_nifti.nii.gz").write_bytes(b"not a NIfTI volume\n")
    if not (tmp / "small.nii.gz").exists():
        import nibabel as nib
        import numpy as np
        nib.save(nib.Nifti1Image(np.arange(512, dtype=np.int16).reshape(8, 8, 8), np.eye(4)), str(tmp / "small.nii.gz"))
    (tmp / "bad_key.yaml").write_text("family: 3d\nmodel:\n  nope: 1\n")
    (tmp / "list.yaml").write_text("- family\n- 3d\n")
    (tmp / "bad_preds.jsonl").write_text('{"sample_id": "s1", "output": \n')
    (tmp / "refs.jsonl").write_text(json.dumps({"sample_id": "s1", "question_id": 30, "box": [1, 2, 1, 2, 1, 2],
                                                "severity": {"grade": 1}}) + "\n")
    (tmp / "refs_bad_question.jsonl").write_text(json.dumps({"sample_id": "s1", "question_id": 99, "box": None,
                                                             "severity": {"grade": 1}}) + "\n")
    return tmp


def snapshot(tmp: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``tmp``."""
    return {str(p.relative_to(tmp)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tmp.rglob("*")) if p.is_file()}


@dataclass
class Outcome:
    case: Case
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.splitlines()

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.out or "Traceback" in self.err

    @property
    def ok(self) -> bool:
        """Exit 2, one stderr line in the package's error style, no traceback."""
        return (self.code == 2 and len(self.err_lines) == 1 and not self.traceback
                and self.err_lines[0].startswith(f"reasonknee3d {self.case.command}: error: "))


def run_case(case: Case, tmp: Path, main: Optional[Callable[[list[str]], int]] = None) -> Outcome:
    """Run one case in this process, capturing stdout and stderr."""
    if main is None:
        from reasonknee3d.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(case.resolved(tmp))
    return Outcome(case, code, out.getvalue(), err.getvalue())


HEADER = """# Bad input: what every command answers

Generated by `python scripts/bad_input_table.py --out docs/hardening.md` (rerun it after changing a command;
`tests/test_cli_errors.py` runs the same cases). Each row runs one command with one bad input in-process
(`reasonknee3d.cli.main`). The goal for every row: exit status 2 and one line on stderr,
`reasonknee3d <command>: error: <what, where, what to do>`, no traceback (`--debug` or `REASONKNEE3D_DEBUG=1`
shows it), nothing of the user's changed. `{tmp}` is the folder of the cases' fixtures (a folder of the
user's with a file in it, a non-DICOM file, a non-NIfTI file, a YAML with an unknown key, score inputs).
Exit status 1 is kept for a batch command that skipped items (it lists them) and for an unexpected error (a
bug: one line naming the exception); 130 for Ctrl-C.

"""


def markdown(outcomes: list[Outcome], lost: list[str]) -> str:
    lines = [HEADER.rstrip("\n"), "", "| command | bad input | exit | stderr |", "|---|---|---|---|"]
    for o in outcomes:
        msg = " / ".join(o.err_lines) or "(nothing)"
        msg = msg.replace("|", "&#124;")  # a cell's text; double backticks keep the message's own ones
        lines.append(f"| `{o.case.command}` | {o.case.what} | {o.code} | `` {msg} `` |")
    tracebacks = sum(o.traceback for o in outcomes)
    silent = sum(o.code == 0 for o in outcomes)
    failing = [o for o in outcomes if not o.ok]
    lines += ["", f"- cases: {len(outcomes)} over {len({o.case.command for o in outcomes})} commands; "
                  f"in the error style (exit 2, one `reasonknee3d <command>: error:` line): "
                  f"{len(outcomes) - len(failing)}",
              f"- tracebacks: {tracebacks} (goal 0)",
              f"- silent wrong results (bad input accepted, exit 0): {silent} (goal 0)",
              f"- data lost (fixture files changed or deleted): {len(lost)} (goal 0)"]
    return "\n".join(lines) + "\n"


def run_all(tmp: Path) -> tuple[list[Outcome], list[str]]:
    make_fixtures(tmp)
    before = snapshot(tmp)
    outcomes = [run_case(c, tmp) for c in CASES]
    after = snapshot(tmp)
    lost = [name for name, digest in before.items() if after.get(name) != digest]
    for o in outcomes:  # paths in the table read {tmp} and ./ (the checkout), not this machine's folders
        for attr in ("out", "err"):
            setattr(o, attr, getattr(o, attr).replace(str(tmp), "{tmp}").replace(str(ROOT), "."))
    return outcomes, lost


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here (default: print)")
    a = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rk3d-bad-input-") as d:
        outcomes, lost = run_all(Path(d) / "fixtures")
    table = markdown(outcomes, lost)
    if a.out is None:
        print(table, end="")
    else:
        from reasonknee3d.io_utils import write_text
        write_text(a.out, table)
        print(f"table: {a.out}")
    return 0 if all(o.ok for o in outcomes) and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
