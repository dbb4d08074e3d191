"""Does a 3D-native checkpoint read lesions from the volume? A teacher-forced probe of its grade decision.

    python scripts/grade_probe.py --model CKPT --data RELEASE [--split test] [--limit N] [--shuffle-volumes]

For each sample the reference answer is fed up to its first field's grade (e.g. ``Size of BML (including
cyst):``) and the score is 1 - P(first token of that field's grade-0 wording). The script prints, per
question category, the ROC AUC of this score for "grade > 0". Within one category the question prior cannot
separate the samples, so an AUC near 0.5 means the grade does not depend on the image. ``--shuffle-volumes``
pairs every sample with another sample's volume: a model that reads the image loses its AUC.

Beside the AUC (a ranking), two counts over the abnormal references say what greedy decoding makes of it:
``abn>norm``, how many have the first tokens of the abnormal grades' wordings together more probable than the
grade-0 wording, and ``greedy``, how many have one abnormal wording ahead of all others (what greedy
decoding writes). Questions whose grade wordings share a first token are left out of both counts.

The last three columns are the balanced accuracy of the first field's grade over the same questions (the
recall of each grade present, averaged within each (category, field) group as the scorer does, then over the
category's groups): ``bal``, the grade whose wording's first token is the most probable; ``bal/prior``, the
most probable after dividing by the grade's frequency in the train split (the decision that maximizes balanced
accuracy if the probabilities are calibrated); ``majority``, always the train split's most frequent grade. The
``all`` row averages over every group. Since the probe feeds the reference box and the reference text up to
the grade, these numbers are an optimistic estimate of what generated answers get from the same scores.
"""
from __future__ import annotations

import argparse
import collections
import sys
from typing import Any, Optional, Sequence

import numpy as np
import torch
from scipy.stats import rankdata

from reasonknee3d.data.release import ReleaseLoader
from reasonknee3d.evaluation.metrics import balanced_acc
from reasonknee3d.parsing import parse_output
from reasonknee3d.prompts import grade_description
from reasonknee3d.schema import get_question
from reasonknee3d.families import family_of_model_dir
from reasonknee3d.families.threed import ReasonKnee3DFamily

ALL = "all"
"""Key of the summary over every category (n, abnormal and the three balanced accuracies only)."""


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> Optional[float]:
    """Mann-Whitney ROC AUC (ties count half); None unless both classes are present."""
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=float))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def grade_decision(by_grade: dict[int, float]) -> tuple[bool, bool]:
    """From the probability of each grade's first wording token: (the abnormal grades together outweigh grade
    0, one abnormal grade is the most probable of all, i.e. what greedy decoding would write)."""
    return (sum(v for g, v in by_grade.items() if g) > by_grade[0], max(by_grade, key=by_grade.get) != 0)


def first_field_priors(data_dir: str, split: str = "train") -> dict[tuple[str, str], collections.Counter]:
    """Grade counts of each question's first field in ``split``, keyed (category, field key)."""
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for s in ReleaseLoader(data_dir).iter_samples(split):
        spec = get_question(s.question_id)
        counts[spec.category, spec.fields[0].key][s.severity[spec.fields[0].key]] += 1
    return counts


def prior_corrected(by_grade: dict[int, float], counts: collections.Counter) -> int:
    """argmax of p(grade) / frequency(grade); a grade never seen in training counts once (add-one)."""
    total = sum(counts.values()) + len(by_grade)
    return max(by_grade, key=lambda g: by_grade[g] * total / (counts.get(g, 0) + 1))


def grade_probe(model_dir: str, data_dir: str, split: str = "test", limit: Optional[int] = None,
                shuffle_volumes: bool = False, batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """``{category: {"n", "abnormal", "auc", "abnormal_decided", "abnormal_more_probable", "abnormal_greedy",
    "balanced", "balanced_prior", "balanced_majority"}}`` of the first-field grade decision (see the module
    text; the balanced accuracies are None for a category without a decided question), and under ``ALL`` the
    same balanced accuracies over every category's (category, field) groups."""
    family = family_of_model_dir(model_dir)
    if not isinstance(family, ReasonKnee3DFamily):
        raise SystemExit(f"{model_dir}: grade_probe reads 3D-native checkpoints; this one is {type(family).__name__}")
    model, processor = family.load(model_dir, "sdpa")
    model.eval()
    dataset, _ = family.predict_data(model, processor, data_dir, split)
    tokenizer = processor.tokenizer
    # targets: (category, first field key, reference grade, {grade: first token of its wording})
    items, targets, skipped = [], [], []
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        item = dict(dataset[i])
        spec = get_question(int(item["question_id"]))
        field = spec.fields[0].key
        grade = parse_output(item["answer"], spec).severity[field]
        cut = item["answer"].find(field + ":")
        if grade is None or cut < 0:
            # Not in the package's answer format: no "<field>:" reasoning line or no final diagnosis.
            skipped.append(item["sample_id"])
            continue
        cut += len(field) + 1
        n_prefix = len(tokenizer(item["answer"][:cut], add_special_tokens=False).input_ids)
        first = {g: tokenizer(item["answer"][:cut] + " " + grade_description(spec, field, g),
                              add_special_tokens=False).input_ids[n_prefix] for g in spec.fields[0].grades}
        item["answer"] = item["answer"][:cut]
        items.append(item)
        targets.append((spec.category, field, int(grade), first))
    if skipped:
        print(f"grade_probe: skipped {len(skipped)} of {len(skipped) + len(items)} samples whose answer has no "
              f"'<first field>:' line or no readable final diagnosis, e.g. {skipped[:3]}", file=sys.stderr)
    if shuffle_volumes and len(items) > 1:
        volumes = [it["volume"] for it in items]
        for k, it in enumerate(items):
            it["volume"] = volumes[(k + len(items) // 2) % len(items)]
    priors = first_field_priors(data_dir)
    # decisions: (abnormal wordings more probable, greedy abnormal, argmax grade, prior-corrected, majority,
    # first field key), or None
    scores, decisions = [], []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            batch = processor([it["volume"] for it in chunk], [it["prompt"] for it in chunk],
                              [it["answer"] for it in chunk], orig_shapes=[it["orig_shape"] for it in chunk])
            logits = model(**batch).logits
            for row, (category, field, _, first) in enumerate(targets[start:start + batch_size]):
                # The last label is <|im_end|>: the logits one column before it predict the token after the prefix.
                last = int((batch["labels"][row] != -100).nonzero()[-1, 0]) - 1
                p = torch.softmax(logits[row, last].float(), -1)
                scores.append(1.0 - p[first[0]].item())
                if len(set(first.values())) < len(first):
                    decisions.append(None)
                    continue
                by_grade = {g: p[t].item() for g, t in first.items()}
                counts = priors[category, field]
                majority = max(by_grade, key=lambda g: counts.get(g, 0))
                decisions.append((*grade_decision(by_grade), max(by_grade, key=by_grade.get),
                                  prior_corrected(by_grade, counts), majority, field))
    by_category: dict[str, list[tuple[int, float, Any]]] = collections.defaultdict(list)
    for (category, _, grade, _), score, decision in zip(targets, scores, decisions):
        by_category[category].append((grade, score, decision))
    out = {}
    for c, rows in sorted(by_category.items()):
        y = [int(g != 0) for g, _, _ in rows]
        decided = [d for g, _, d in rows if g and d is not None]
        out[c] = {"n": len(y), "abnormal": sum(y), "auc": roc_auc(y, [s for _, s, _ in rows]),
                  "abnormal_decided": len(decided), "abnormal_more_probable": sum(d[0] for d in decided),
                  "abnormal_greedy": sum(d[1] for d in decided), **_balanced([(c, g, d) for g, _, d in rows])}
    every = [(c, g, d) for c, rows in by_category.items() for g, _, d in rows]
    out[ALL] = {"n": len(every), "abnormal": sum(int(g != 0) for _, g, _ in every), **_balanced(every)}
    return out


def _balanced(rows: Sequence[tuple[str, int, Any]]) -> dict[str, Optional[float]]:
    """Balanced accuracy of the argmax, prior-corrected and majority first-field grades over the decided rows
    ``(category, reference grade, decision)``, in the scorer's (category, field) groups."""
    graded = [(c, g, d) for c, g, d in rows if d is not None]
    if not graded:
        return {"balanced": None, "balanced_prior": None, "balanced_majority": None}
    groups = {key: k for k, key in enumerate(sorted({(c, d[5]) for c, _, d in graded}))}
    true = np.array([g for _, g, _ in graded], dtype=int)
    group = np.array([groups[c, d[5]] for c, _, d in graded], dtype=int)
    return {name: balanced_acc(true, np.array([d[k] for _, _, d in graded], dtype=int), group)
            for name, k in (("balanced", 2), ("balanced_prior", 3), ("balanced_majority", 4))}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--shuffle-volumes", action="store_true")
    args = parser.parse_args(argv)
    result = grade_probe(args.model, args.data, args.split, args.limit, args.shuffle_volumes)
    print(f"{'category':28s} {'n':>5s} {'grade>0':>8s} {'AUC':>6s} {'abn>norm':>9s} {'greedy':>7s} "
          f"{'bal':>6s} {'bal/prior':>9s} {'majority':>8s}")

    def num(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.3f}"
    for category, r in result.items():
        if category == ALL:
            auc, counts = "", " " * 17
        else:
            decided = r["abnormal_decided"]
            auc = num(r["auc"])
            counts = f"{r['abnormal_more_probable']:>5d}/{decided:<3d} {r['abnormal_greedy']:>3d}/{decided:<3d}"
        print(f"{category:28s} {r['n']:5d} {r['abnormal']:8d} {auc:>6s} {counts} {num(r['balanced']):>6s} "
              f"{num(r['balanced_prior']):>9s} {num(r['balanced_majority']):>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
