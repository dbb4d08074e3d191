"""``reasonknee3d tune-grade-prior``: choose the grade-prior strength tau on the val split, never on test.

For each tau the model predicts val with the correction (``models.grade_prior``; tau 0 is plain decoding),
the predictions are scored against val's references with the train split as the majority source, and the
tau with the highest balanced accuracy wins (the metric the correction is for; a tie goes to the smaller tau,
the smaller change). Each tau's predictions and report stay in the output folder, so a killed run resumes
(``predict`` appends) and the trade-off in qwk and exact agreement can be read beside the choice. The choice
is written last, atomically, to ``grade_prior.json``; then ``predict --grade-prior-tau <chosen>`` on test.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from ..io_utils import write_json

DEFAULT_TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)
CRITERION = "balanced_acc"
REPORTED = ("balanced_acc", "qwk", "diag_exact", "miou")
RESULT_FILE = "grade_prior.json"


def _tau_name(tau: float) -> str:
    return f"{tau:g}".replace(".", "p")


def tune_grade_prior(model_dir: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     taus: Sequence[float] = DEFAULT_TAUS, split: str = "val", prior_split: str = "train",
                     **predict_kwargs: Any) -> dict[str, Any]:
    """Predict ``split`` once per tau, score each, and write and return ``{"chosen_tau", "by_tau", ...}``.

    ``predict_kwargs`` go to ``evaluation.predict.predict`` (batch_size, max_new_tokens, box_decoding, limit,
    images, cache_dir). Raises ``RuntimeError`` when a prediction run skipped samples (the taus would not be
    compared on the same samples), naming the list of skipped samples.
    """
    from ..data.release import export_references
    from ..families import family_of_model_dir
    from .predict import predict
    from .score import score_files

    taus = sorted({float(t) for t in taus})
    if not taus or any(t < 0 for t in taus):
        raise ValueError(f"taus must be one or more numbers >= 0, got {list(taus)}")
    if split == prior_split:
        raise ValueError(f"tune on another split than the one the prior counts ({prior_split!r}); got {split!r}")
    family_of_model_dir(model_dir)  # a wrong model folder fails here, before any work
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = predict_kwargs.get("images")
    refs = {}
    for s in (split, prior_split):
        refs[s] = out / f"references_{s}.jsonl"
        exported = export_references(data_dir, s, refs[s], images=images)
        if not exported.ok:
            raise RuntimeError(f"export-references skipped {len(exported.skipped)} items of {s}: see "
                               f"{exported.skipped_path}")
    limit: Optional[int] = predict_kwargs.get("limit")
    if limit is not None:  # score the same samples that were predicted
        lines = refs[split].read_text().splitlines()[:limit]
        refs[split].write_text("".join(line + "\n" for line in lines))
    by_tau: dict[str, dict[str, Any]] = {}
    majority: dict[str, Any] = {}
    for tau in taus:
        preds = out / f"predictions_{split}_tau{_tau_name(tau)}.jsonl"
        res = predict(model_dir, data_dir, split, preds, grade_prior_tau=tau, grade_prior_split=prior_split,
                      **predict_kwargs)
        if res.skipped:
            raise RuntimeError(f"predict skipped {len(res.skipped)} {split} samples at tau {tau:g}: see "
                               f"{res.skipped_path}")
        report = score_files(preds, refs[split], out / f"report_{split}_tau{_tau_name(tau)}",
                             majority_source=refs[prior_split], plots=False)
        by_tau[f"{tau:g}"] = {m: report["overall"].get(m) for m in REPORTED}
        majority = {m: report["majority_baseline"].get(m) for m in REPORTED}
    best = max(taus, key=lambda t: (by_tau[f"{t:g}"][CRITERION] or 0.0, -t))
    result = {"chosen_tau": best, "criterion": CRITERION, "split": split, "prior_split": prior_split,
              "model": str(model_dir), "data": str(data_dir), "by_tau": by_tau, "majority": majority}
    write_json(out / RESULT_FILE, result)
    return result


def format_tuning(result: dict[str, Any]) -> str:
    """The table ``tune-grade-prior`` prints: one row per tau, the majority row, and the choice."""
    cols = REPORTED
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"{'tau':>8} " + " ".join(f"{c:>12}" for c in cols)]
    for tau, row in result["by_tau"].items():
        mark = " <- chosen" if float(tau) == result["chosen_tau"] else ""
        lines.append(f"{tau:>8} " + " ".join(f"{fmt(row[c]):>12}" for c in cols) + mark)
    lines.append(f"{'majority':>8} " + " ".join(f"{fmt(result['majority'].get(c)):>12}" for c in cols))
    lines.append(f"chosen tau {result['chosen_tau']:g} (highest {result['criterion']} on {result['split']}; ties go "
                 "to the smaller tau)")
    return "\n".join(lines)
