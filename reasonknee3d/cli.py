"""`reasonknee3d` command line: parses arguments and calls library functions (no logic here).

Each subcommand is one ``_add_<name>`` function registering its parser and a handler; handlers import
their library module lazily, so light commands (``score``, ``export-references``) never import torch.
"""
from __future__ import annotations

import argparse
import os
import sys
import typing
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import constants

Handler = Callable[[argparse.Namespace], int]


# --- argument validators: bad values are refused by argparse, before any work starts -------------------------

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (sizes, counts, budgets)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (limits, retries)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _finite_float(text: str, minimum: float, strict: bool) -> float:
    """A finite number above ``minimum`` (``strict``) or at least ``minimum``."""
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
        raise argparse.ArgumentTypeError(f"expected a finite number {'>' if strict else '>='} {minimum:g}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds)."""
    return _finite_float(text, 0.0, strict=True)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (strengths such as --grade-prior-tau)."""
    return _finite_float(text, 0.0, strict=False)


def question_id(text: str) -> int:
    """A question id of the schema (1..69), with the valid range in the message."""
    from .schema import load_schema
    ids = load_schema()
    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in ids:
        raise argparse.ArgumentTypeError(f"expected a question id in {min(ids)}..{max(ids)} "
                                         f"(reasonknee3d questions lists them), got {text!r}")
    return value


def png_path(text: str) -> Path:
    """An output path ending in .png (the picture is always PNG), not an existing folder."""
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"expected a file name ending in .png (the picture is written as PNG), "
                                         f"got {text!r}")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; expected a .png file name")
    return path


def output_file(text: str) -> Path:
    """An output file path that is not an existing folder (checked before the work that fills it)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file name")
    return path


class BoxAction(argparse.Action):
    """``--box S0 S1 H0 H1 W0 W1``: six voxel indices >= 0 with min <= max on each axis (inclusive)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        box = [int(v) for v in values]
        for axis, name in enumerate(("S", "H", "W")):
            lo, hi = box[2 * axis], box[2 * axis + 1]
            if lo < 0 or lo > hi:
                raise argparse.ArgumentError(self, f"expected six voxel indices S0 S1 H0 H1 W0 W1 with "
                                                   f"0 <= min <= max on each axis; {name} is {lo}..{hi}")
        setattr(namespace, self.dest, box)


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic release in the real 3DReasonKnee layout")
    p.add_argument("out", type=Path, help="release folder to write: new or empty, or an earlier synth output "
                                           "with --overwrite")
    p.add_argument("--volumes", type=positive_int, default=16,
                   help="knee volumes (about 70/10/20 %% train/val/test by patient)")
    p.add_argument("--shape", type=positive_int, nargs=3, default=(160, 384, 384), metavar=("S", "H", "W"),
                   help="voxels per volume: sagittal slices, rows, columns (at least 16 32 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same release")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it holds an earlier synth output")

    def run(a: argparse.Namespace) -> int:
        from .data.synth import write_synthetic_release
        print(write_synthetic_release(a.out, n_volumes=a.volumes, shape=tuple(a.shape), seed=a.seed,
                                      overwrite=a.overwrite))
        return 0
    p.set_defaults(func=run)


def _report_batch(result) -> int:
    """Print a batch command's outcome; non-zero exit when anything was skipped."""
    print(f"{result.n_done} done -> {result.out}")
    if result.skipped:
        print(f"{len(result.skipped)} skipped, reasons in {result.skipped_path}", file=sys.stderr)
        return 1
    return 0


def _add_export_references(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-references", help="write a split's references in the scorer's JSONL format")
    p.add_argument("--data", type=Path, required=True, help="release root")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "train_balanced", "test_balanced"),
                   help="split to export")
    p.add_argument("--out", type=output_file, required=True, help="references .jsonl")
    _add_location_options(p, cache=False)

    def run(a: argparse.Namespace) -> int:
        from .data.release import export_references
        return _report_batch(export_references(a.data, a.split, a.out, images=a.images))
    p.set_defaults(func=run)


def _add_check_release(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-release", help="what the loader can use of a release, and in which form each piece came")
    p.add_argument("data", type=Path, help="release root")
    _add_location_options(p, cache=False)
    p.add_argument("--json", type=output_file, default=None, help="also write the report as JSON here")
    p.add_argument("--axis-check-volumes", type=non_negative_int, default=8,
                   help="volumes per split whose masks are read to compare written boxes with mask boxes")

    def run(a: argparse.Namespace) -> int:
        from .data.check_release import run_check_release
        return run_check_release(a.data, a.images, a.json, a.axis_check_volumes)
    p.set_defaults(func=run)


def _add_convert_dicom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-dicom", help="one OAI sagittal DESS DICOM series -> NIfTI in release orientation")
    p.add_argument("dicom_dir", type=Path, help="folder holding the DICOM files of one series")
    p.add_argument("out", type=output_file, help="output .nii.gz")

    def run(a: argparse.Namespace) -> int:
        from .data.dicom import convert_dicom
        print(convert_dicom(a.dicom_dir, a.out))  # DicomSeriesError names the file and tag
        return 0
    p.set_defaults(func=run)


def _add_location_options(p: argparse.ArgumentParser, cache: bool = True) -> None:
    """``--images`` (and ``--cache-dir``): where a release's volumes and caches are, for every command that
    reads a release."""
    p.add_argument("--images", type=Path, default=None,
                   help="folder searched by file name for volumes and masks whose written paths do not exist "
                        "(paths from another machine); indexed once")
    if cache:
        p.add_argument("--cache-dir", type=Path, default=None,
                       help="root of the caches (volumes/, slice_features/); default <data>/cache. Use it for a "
                            "read-only release")


def _location_overrides(a: argparse.Namespace) -> list[str]:
    """``data.images`` / ``data.cache_dir`` overrides from ``--images`` / ``--cache-dir`` (JSON-quoted paths)."""
    import json
    out = []
    for flag, key in (("images", "data.images"), ("cache_dir", "data.cache_dir")):
        value = getattr(a, flag, None)
        if value is not None:
            out.append(f"{key}={json.dumps(str(value))}")
    return out


def _add_preprocess(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("preprocess", help="fill the model family's cache (volumes for 3d, vision features for slice)")
    p.add_argument("--data", type=Path, required=True, help="release root")
    p.add_argument("--config", required=True, help="experiment YAML or preset name (e.g. tiny_3d)")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=("train", "val", "test"),
                   help="splits whose volumes are cached")
    _add_location_options(p)

    def run(a: argparse.Namespace) -> int:
        from .families import get_family, load_experiment_config
        exp = load_experiment_config(a.config, _location_overrides(a))
        return _report_batch(get_family(exp.family).preprocess(exp, a.data, a.splits))
    p.set_defaults(func=run)


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score predictions against references (ReasonKnee-Bench report)")
    p.add_argument("--predictions", type=Path, required=True, help='JSONL of {"sample_id", "output"}')
    p.add_argument("--references", type=Path, required=True, help="references JSONL (export-references)")
    p.add_argument("--majority-source", type=Path, default=None,
                   help="train-split references for the majority baseline (default: the scored references)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    def run(a: argparse.Namespace) -> int:
        from .evaluation.report import render_summary
        from .evaluation.score import score_files
        report = score_files(a.predictions, a.references, a.out, a.majority_source, plots=not a.no_plots)
        for msg in report["input_issues"]:
            print(f"warning: {msg}", file=sys.stderr)
        print(render_summary(report))
        print(f"report: {a.out / 'report.md'}")
        return 0
    p.set_defaults(func=run)


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write an untrained model directory from an experiment config")
    p.add_argument("--config", required=True, help="experiment YAML or preset name (e.g. tiny_3d)")
    p.add_argument("--out", type=Path, required=True,
                   help="model directory to write: new or empty, or an earlier init output with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier init output")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.num_bins=32")

    def run(a: argparse.Namespace) -> int:
        from .families import get_family, load_experiment_config
        exp = load_experiment_config(a.config, a.overrides)
        print(get_family(exp.family).init(exp, a.out, overwrite=a.overwrite))
        return 0
    p.set_defaults(func=run)


def _add_zeroshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot predictions: local Qwen2(.5)-VL (hf) or an OpenAI-compatible API")
    p.add_argument("--backend", required=True, choices=("hf", "openai"),
                   help="hf: a local Qwen2(.5)-VL checkpoint; openai: an OpenAI-compatible chat endpoint")
    p.add_argument("--model", required=True, help="hf: checkpoint folder; openai: model name at the endpoint")
    p.add_argument("--data", type=Path, required=True, help="release root")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "test_balanced"),
                   help="split to answer")
    p.add_argument("--out", type=output_file, required=True, help="predictions .jsonl (appended; a rerun resumes)")
    p.add_argument("--setting", default="plain", choices=("plain", "guided", "gt-crop"),
                   help="plain: the question and the answer's JSON shape; guided: adds grade definitions, "
                        "step-by-step reasoning and the answer format; gt-crop: guided, on the volume cropped to "
                        "the reference box")
    p.add_argument("--preset", default="package", choices=("package", "paper"),
                   help="package: the package's frames and prompts; paper: the published inputs (hf: every "
                        "slice at 4 fps, per-slice scaling, processor-default size; openai: slices 32-128; "
                        "the release's questions_nobbox_* text)")
    p.add_argument("--base-url", default=None, help="openai: endpoint root, e.g. https://api.openai.com/v1 "
                                                     "(key from OPENAI_API_KEY)")
    p.add_argument("--limit", type=non_negative_int, default=None, help="only the first N samples of the split")
    _add_location_options(p, cache=False)
    p.add_argument("--frames", type=positive_int, default=None, help="slices sent (default: all for hf, 32 for openai)")
    p.add_argument("--frame-size", type=positive_int, nargs=2, default=None, metavar=("H", "W"),
                   help="pixels per slice, multiples of 28 (default: 224 224 for hf, 392 392 for openai)")
    p.add_argument("--concurrency", type=positive_int, default=4, help="openai: requests in flight")
    p.add_argument("--timeout", type=positive_float, default=120.0,
                   help="openai: seconds per request attempt, connect to the reply's last byte")
    p.add_argument("--max-retries", type=non_negative_int, default=4, help="openai: retries on 429 / 5xx / timeouts")
    p.add_argument("--allow-no-key", action="store_true",
                   help="openai: run without OPENAI_API_KEY against a remote endpoint that needs no key "
                        "(a local server never needs this)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="hf: samples per generate call")
    p.add_argument("--max-new-tokens", type=positive_int, default=1024, help="hf: generation budget")

    def run(a: argparse.Namespace) -> int:
        from .evaluation.zeroshot import run_zeroshot
        res = run_zeroshot(a.backend, a.model, a.data, a.split, a.out, setting=a.setting, base_url=a.base_url,
                           limit=a.limit, frames=a.frames, frame_size=a.frame_size, concurrency=a.concurrency,
                           timeout=a.timeout, max_retries=a.max_retries, batch_size=a.batch_size,
                           max_new_tokens=a.max_new_tokens, allow_no_key=a.allow_no_key,
                           preset=a.preset, images=a.images)
        print(f"{res.n_written} written, {res.n_skipped_done} already done, {len(res.failed)} failed "
              f"of {res.n_samples} -> {res.out}")
        for sid, err in res.failed.items():
            print(f"failed {sid}: {err}", file=sys.stderr)
        return 1 if res.failed else 0
    p.set_defaults(func=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train either model family from an experiment YAML (resumable, torchrun-ready)")
    p.add_argument("--config", required=True, help="experiment YAML (family, data, model, train) or preset name")
    p.add_argument("--data", default=None, help="release root (train.data_dir)")
    p.add_argument("--output-dir", default=None, help="run folder (train.output_dir; default runs/<config stem>)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (train.max_steps)")
    p.add_argument("--save-steps", type=positive_int, default=None, help="steps between checkpoints (train.save_steps)")
    _add_location_options(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.learning_rate=1e-4 model.num_bins=64")

    def run(a: argparse.Namespace) -> int:
        import json
        import logging

        from .data.distributed import end_process_group
        from .families import load_experiment_config
        from .training.trainer import NonFiniteTrainingError, run_training
        flags = {"train.data_dir": a.data, "train.output_dir": a.output_dir, "train.max_steps": a.max_steps,
                 "train.save_steps": a.save_steps}
        # JSON-quoted: a path stays a string even when YAML would read it as a number or a mapping.
        overrides = ([f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None] + _location_overrides(a)
                     + list(a.overrides))
        exp = load_experiment_config(a.config, overrides)  # config errors before any log output
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            result = run_training(exp)
        except NonFiniteTrainingError as e:  # the run's data or settings diverged: not a usage error
            _print_error("train", e)
            return 1
        end_process_group()
        resumed = f", resumed from {result.resumed_from}" if result.resumed_from else ""
        print(f"trained to step {result.global_step}{resumed}: {result.final_dir}"
              + (f", merged: {result.merged_dir}" if result.merged_dir else ""))
        return 0
    p.set_defaults(func=run)


def _add_box_decoding(p: argparse.ArgumentParser) -> None:
    p.add_argument("--box-decoding", default=constants.DEFAULT_BOX_DECODING, choices=constants.BOX_DECODINGS,
                   help="constrained decoding: each box coordinate is the median bin of the model's distribution "
                        "(median) or its most probable bin (argmax)")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="batched generation with a trained model -> predictions JSONL (resumable)")
    p.add_argument("--model", type=Path, required=True, help="model folder (checkpoint-N, final, merged or init), or a region_grades output folder")
    p.add_argument("--data", type=Path, required=True, help="release root")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "test_balanced"),
                   help="split to answer")
    p.add_argument("--out", type=output_file, required=True, help="predictions .jsonl (appended; a rerun resumes)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="samples per generate call")
    p.add_argument("--limit", type=non_negative_int, default=None, help="only the first N samples of the split")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="generation budget per sample")
    _add_location_options(p)
    p.add_argument("--unconstrained", action="store_true",
                   help="plain greedy decoding (no box / severity logits processors)")
    _add_box_decoding(p)
    p.add_argument("--grade-prior-tau", type=non_negative_float, default=0.0, metavar="TAU",
                   help="divide each grade's probability by its train-split frequency to the power TAU when the "
                        "answer words the grade (0: plain decoding; choose TAU with tune-grade-prior)")
    p.add_argument("--boxes", default=None, metavar="reference|P.jsonl",
                   help="a region_grades --model (the direct 3D classifier) grades in these boxes: the release's "
                        "(reference, the default) or those of another model's predictions file")

    def run(a: argparse.Namespace) -> int:
        from .evaluation.classify import REFERENCE_BOXES, classify, is_region_grades_dir
        from .evaluation.predict import predict
        if is_region_grades_dir(a.model) and a.grade_prior_tau:
            raise ValueError(f"--grade-prior-tau is for a language model's decoding; {a.model} is a region_grades "
                             "folder (the direct 3D classifier), which writes no wording to correct")
        if is_region_grades_dir(a.model):
            res = classify(a.model, a.data, a.split, a.out, boxes=a.boxes or REFERENCE_BOXES,
                           batch_size=a.batch_size, limit=a.limit, images=a.images, cache_dir=a.cache_dir)
        elif a.grade_prior_tau and a.unconstrained:
            raise ValueError("--grade-prior-tau needs constrained decoding; leave out --unconstrained")
        elif a.boxes is not None:
            raise ValueError(f"--boxes is for a region_grades folder (the direct 3D classifier); {a.model} "
                             f"is not one (no region_heads.json and encoder/)")
        else:
            res = predict(a.model, a.data, a.split, a.out, batch_size=a.batch_size, limit=a.limit,
                          constrained=not a.unconstrained, max_new_tokens=a.max_new_tokens, images=a.images,
                          cache_dir=a.cache_dir, box_decoding=a.box_decoding, grade_prior_tau=a.grade_prior_tau)
        if getattr(res, "grade_prior", None):
            print(res.grade_prior)
        print(f"{res.n_written} written, {res.n_skipped} already done, of {res.n_split} in {res.seconds:.1f} s "
              f"-> {res.out}")
        if getattr(res, "box_sources", None):
            print("boxes: " + ", ".join(f"{n} {k}" for k, n in res.box_sources.items() if n))
        if res.skipped:
            from .evaluation.predict import skipped_summary
            print(f"{len(res.skipped)} skipped (a rerun tries them again), listed in {res.skipped_path}:",
                  file=sys.stderr)
            print("\n".join(skipped_summary(res.skipped)), file=sys.stderr)
            return 1
        return 0
    p.set_defaults(func=run)


def _add_tune_grade_prior(sub: argparse._SubParsersAction) -> None:
    from .evaluation.tune_prior import DEFAULT_TAUS, RESULT_FILE
    p = sub.add_parser("tune-grade-prior", help="choose predict's --grade-prior-tau on the val split (one val "
                                                "prediction and score per tau)")
    p.add_argument("--model", type=Path, required=True, help="trained model folder (either family)")
    p.add_argument("--data", type=Path, required=True, help="release root")
    p.add_argument("--out", type=Path, required=True,
                   help=f"folder for each tau's val predictions and report, and {RESULT_FILE} (a rerun resumes)")
    p.add_argument("--taus", type=non_negative_float, nargs="+", default=list(DEFAULT_TAUS), metavar="TAU",
                   help="strengths to try (0: plain decoding)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="samples per generate call")
    p.add_argument("--limit", type=non_negative_int, default=None, help="only the first N samples of the split")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="generation budget per sample")
    _add_location_options(p)
    _add_box_decoding(p)

    def run(a: argparse.Namespace) -> int:
        from .evaluation.tune_prior import format_tuning, tune_grade_prior
        result = tune_grade_prior(a.model, a.data, a.out, a.taus, batch_size=a.batch_size,
                                  limit=a.limit, max_new_tokens=a.max_new_tokens, images=a.images,
                                  cache_dir=a.cache_dir, box_decoding=a.box_decoding)
        print(format_tuning(result))
        print(f"-> {a.out / RESULT_FILE}; then: reasonknee3d predict ... --grade-prior-tau {result['chosen_tau']:g}")
        return 0
    p.set_defaults(func=run)


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="answer one question about one volume; optional box overlay picture")
    p.add_argument("--model", type=Path, required=True, help="model folder (3D-native or slice baseline)")
    p.add_argument("--volume", type=Path, required=True, help="NIfTI volume (.nii.gz)")
    p.add_argument("--question-id", type=question_id, required=True,
                   help="question type, 1..69 (reasonknee3d questions lists them)")
    p.add_argument("--box", type=_int, nargs=6, action=BoxAction, default=None, metavar="V",
                   help="reference box to draw (voxels)")
    p.add_argument("--png", type=png_path, default=None, help="write the three-slice overlay picture here")
    p.add_argument("--prompt", default=None, help="prompt text (default: the project's question wording)")
    p.add_argument("--unconstrained", action="store_true", help="plain greedy decoding, no box/JSON constraints")
    _add_box_decoding(p)
    p.add_argument("--knee-side", choices=("left", "right"), default=None,
                   help="knee side, for models trained with data.canonical_side when the file name does not end "
                        "in _left/_right")

    def run(a: argparse.Namespace) -> int:
        from .evaluation.infer import infer
        r = infer(a.model, a.volume, a.question_id, gt_box=a.box, png=a.png, prompt=a.prompt,
                  constrained=not a.unconstrained, knee_side=a.knee_side, box_decoding=a.box_decoding)
        print(r.text)
        print(f"\nbox: {r.box}\nseverity: {r.severity}" + (f"\npicture: {r.png}" if r.png else ""))
        return 0
    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole loop on the embedded default: synth, train both, predict, score")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="everything is written under this folder")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smoke test of every step: 6 volumes, 10 training steps per family, 16 test questions; its "
                           "numbers only show that the loop runs (README.md gives dated run times)")
    size.add_argument("--full", action="store_true",
                      help="the longer setting: 100 volumes, 9000 training steps per family, 600 pretraining steps "
                           "(over an hour on a 2-core CPU); the 3D-native model's boxes then follow the anatomy")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo in --out that used other settings (same settings resume)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic release and of every training run (default 0); runs with other "
                        "seeds give the spread of the table")

    def run(a: argparse.Namespace) -> int:
        import dataclasses

        from .demo import FULL, QUICK, DemoSettings, run_demo
        if a.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {a.seed}")
        base = QUICK if a.quick else FULL if a.full else DemoSettings()
        run_demo(a.out, quick=a.quick, overwrite=a.overwrite, settings=dataclasses.replace(base, seed=a.seed))
        return 0
    p.set_defaults(func=run)


def _run_real_size_bench(a: argparse.Namespace) -> int:
    """``bench --real-size [--layers N] [--scale D] [--steps N] [--volume-grouping G]``."""
    import json

    from .bench.real_size import RealSizeSettings, print_real_size_table, run_real_size_bench
    problems = [f"{flag} needs --real-size" for flag, used in (("--layers", a.layers is not None),
                                                               ("--scale", a.scale != 1), ("--steps", a.steps != 1),
                                                               ("--volume-grouping", a.volume_grouping != 1))
                if used and not a.real_size]
    problems += [f"--{name} must be >= 1, got {v}" for name, v in (("layers", a.layers), ("steps", a.steps),
                                                                   ("volume-grouping", a.volume_grouping))
                 if v is not None and v < 1]
    if a.scale not in (1, 2, 4):
        problems.append(f"--scale must be 1, 2 or 4 (a divisor of every head count), got {a.scale}")
    if a.quick or a.repeats is not None:
        problems.append("--real-size runs once: --quick and --repeats do not apply")
    if problems:
        print(f"reasonknee3d bench: {'; '.join(problems)}", file=sys.stderr)
        return 2
    result = run_real_size_bench(a.out, RealSizeSettings(layers=a.layers, width_divisor=a.scale, steps=a.steps,
                                                         volume_grouping=a.volume_grouping))
    print_real_size_table(result)
    print(json.dumps(result, indent=1) if a.out is None else f"JSON: {a.out}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure the performance figures (token ratio, step speedup, cache, scoring, "
                                     "KV cache, MFU) on this machine")
    p.add_argument("--out", type=output_file, default=None, help="write the full JSON here (default: print it)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed runs per figure after a warm-up (default: 5, training steps 3; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="smoke test on the tiny configs (under a minute)")
    p.add_argument("--real-size", action="store_true",
                   help="instead: preprocess, train and predict with both real presets on a random-weight checkpoint "
                        "of Qwen2.5-VL-3B's shapes (built once into the user cache), on the GPU when there is one")
    p.add_argument("--layers", type=int, default=None,
                   help="--real-size: language-model layers, 3D encoder and vision-tower blocks (default: the real 36 "
                        "/ 12 / 32)")
    p.add_argument("--scale", type=int, default=1, metavar="DIVISOR",
                   help="--real-size: divide hidden sizes and head counts by this (1, 2 or 4; default 1: true shapes)")
    p.add_argument("--steps", type=int, default=1, help="--real-size: training steps per family (default 1)")
    p.add_argument("--volume-grouping", type=int, default=1, metavar="G",
                   help="--real-size: also train the 3D preset at batch G with train.volume_grouping G (the G "
                        "questions of one volume, encoded once) and report the step time per sample at batch 1 and "
                        "at G beside the slice preset's (default 1: batch 1 only)")

    def run(a: argparse.Namespace) -> int:
        import json
        import logging

        from .bench import print_table, run_bench
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if a.real_size or a.layers is not None or a.scale != 1 or a.steps != 1 or a.volume_grouping != 1:
            return _run_real_size_bench(a)
        result = run_bench(a.out, repeats=a.repeats, quick=a.quick)
        print_table(result)
        if a.out is None:
            print(json.dumps(result, indent=1))
        else:
            print(f"JSON: {a.out}")
        return 0
    p.set_defaults(func=run)


TABLE_WIDTH = 99
"""Widest table a command prints (columns); narrower terminals get narrower tables."""


def _add_questions(sub: argparse._SubParsersAction) -> None:
    from .schema import load_schema
    categories = sorted({q.category for q in load_schema().values()})
    p = sub.add_parser("questions", help="list the 69 question types: id, category, region, fields and grades")
    p.add_argument("--category", choices=categories, default=None, help="only the questions of this category")
    p.add_argument("--json", action="store_true", help="print JSON (one object per question) instead of a table")

    def run(a: argparse.Namespace) -> int:
        import json

        from .schema import question_rows
        rows = question_rows(a.category)
        if a.json:
            print(json.dumps(rows, indent=1, ensure_ascii=False))
            return 0
        from rich.console import Console
        from rich.table import Table
        t = Table(title=f"{len(rows)} ReasonKnee questions (grades allowed per field)", show_lines=False)
        t.add_column("id", justify="right", no_wrap=True)
        t.add_column("category", no_wrap=True)
        t.add_column("region (finding key)", max_width=26)
        t.add_column("fields: grades", ratio=1)
        for r in rows:
            t.add_row(str(r["question_id"]), r["category"], r["finding_key"],
                      "\n".join(f"{f['key']}: {f['range']}" for f in r["fields"]))
        import shutil
        Console(width=min(shutil.get_terminal_size((TABLE_WIDTH, 24)).columns, TABLE_WIDTH)).print(t)
        return 0
    p.set_defaults(func=run)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_score,
    _add_synth,
    _add_export_references,
    _add_check_release,
    _add_convert_dicom,
    _add_preprocess,
    _add_init,
    _add_zeroshot,
    _add_train,
    _add_predict,
    _add_tune_grade_prior,
    _add_infer,
    _add_demo,
    _add_bench,
    _add_questions,
]


DEBUG_ENV = "REASONKNEE3D_DEBUG"
"""``REASONKNEE3D_DEBUG=1`` does what ``--debug`` does: errors raise with their traceback."""
DEBUG_HELP = (f"show the full traceback of an error instead of the one-line message (also: {DEBUG_ENV}=1)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where there is none to show (unset, or a plain switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or isinstance(action, argparse._StoreTrueAction):
            return action.help or ""
        return super()._get_help_string(action) or ""


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error style: one line ``<prog>: error: <message>`` (no usage block), exit 2,
    and ``--help`` listing the defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _one_line(text: str) -> str:
    """A message on one line: its lines joined with ' | ', surrounding blanks dropped."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _describe(exc: BaseException) -> str:
    """The message of a user-input error; OSError without a package message reads 'what: path'."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None and str(exc).startswith("[Errno"):
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        hint = {FileNotFoundError: "; check the path", PermissionError: "; check the permissions",
                IsADirectoryError: "; a file was expected", NotADirectoryError: "; a folder was expected"}
        return f"{exc.strerror}: {where}" + next((h for t, h in hint.items() if isinstance(exc, t)), "")
    return _one_line(str(exc)) or type(exc).__name__


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports bad input (a file, a path, a config key, a value) rather than a bug.

    User errors: every OSError (missing or unreadable user paths, full disks, ``OutputDirError``, ``CacheMiss``);
    ``ValueError`` subclasses defined by the package (``ConfigError``, ``ReleaseError``, ``VolumeError``,
    ``DicomSeriesError``, ``ScoreInputError``, ``FormError`` ...); ``ZeroShotError``; and a plain ``ValueError``
    raised by the package's own code (its argument checks). A ``ValueError`` raised inside a library
    (numpy, torch) is a bug: the package checks its inputs before handing them over.
    """
    if isinstance(exc, OSError):
        return True
    package = __name__.split(".")[0]
    if isinstance(exc, ValueError) and type(exc).__module__.split(".")[0] == package:
        return True
    from .evaluation.zeroshot import ZeroShotError
    if isinstance(exc, ZeroShotError):
        return True
    if type(exc) is ValueError and exc.__traceback__ is not None:
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(Path(__file__).resolve().parent)
    return False


def _print_error(command: str, exc: BaseException) -> None:
    print(f"reasonknee3d {command}: error: {_describe(exc)}", file=sys.stderr)


def _debug_from_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reasonknee3d", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for add in COMMANDS:
        add(sub)
    summaries = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.description = p.description or summaries.get(name)  # the command's line of the main --help, on top
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,  # also after the command name
                       help=DEBUG_HELP)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns its exit status.

    0 done; 1 done with skipped items (listed), or an unexpected error (a bug: one line naming the exception);
    2 bad input (bad file, path, config or value: one line ``reasonknee3d <command>: error: ...``); 130
    interrupted. With ``--debug`` or ``REASONKNEE3D_DEBUG=1`` errors raise with their traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a usage error already printed (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.debug or _debug_from_env():
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly, as shell tools do
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except KeyboardInterrupt:
        print(f"reasonknee3d {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error ends as one line; --debug shows the traceback
        if is_user_error(e):
            _print_error(args.command, e)
            return 2
        print(f"reasonknee3d {args.command}: error: unexpected {type(e).__module__}.{type(e).__qualname__}: "
              f"{_describe(e)} (a bug; rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
