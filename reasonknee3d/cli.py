"""`reasonknee3d` command line: parses arguments and calls library functions (no logic here).

Each subcommand is one ``_add_<name>`` function registering its parser and a handler; handlers import
their library module lazily, so light commands (``score``, ``export-references``) never import torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

Handler = Callable[[argparse.Namespace], int]


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic release in the real 3DReasonKnee layout")
    p.add_argument("out", type=Path)
    p.add_argument("--volumes", type=int, default=16)
    p.add_argument("--shape", type=int, nargs=3, default=(160, 384, 384), metavar=("S", "H", "W"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it holds an earlier synth output")

    def run(a: argparse.Namespace) -> int:
        from .data.synth import write_synthetic_release
        try:
            summary = write_synthetic_release(a.out, n_volumes=a.volumes, shape=tuple(a.shape), seed=a.seed,
                                              overwrite=a.overwrite)
        except (ValueError, OSError) as e:
            print(f"reasonknee3d synth: {e}", file=sys.stderr)
            return 2
        print(summary)
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
    p.add_argument("--split", default="test", choices=("train", "val", "test", "train_balanced", "test_balanced"))
    p.add_argument("--out", type=Path, required=True, help="references .jsonl")
    p.add_argument("--images", type=Path, default=None,
                   help="folder where volumes and masks whose CSV paths do not exist here are found by file name")

    def run(a: argparse.Namespace) -> int:
        from .data.release import export_references
        return _report_batch(export_references(a.data, a.split, a.out, images=a.images))
    p.set_defaults(func=run)


def _add_check_release(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-release", help="what the loader can use of a release, and in which form each piece came")
    p.add_argument("data", type=Path, help="release root")
    p.add_argument("--images", type=Path, default=None,
                   help="folder where volumes and masks whose CSV paths do not exist here are found by file name")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--axis-check-volumes", type=int, default=8,
                   help="volumes per split whose masks are read to compare written boxes with mask boxes")

    def run(a: argparse.Namespace) -> int:
        from .data.check_release import run_check_release
        return run_check_release(a.data, a.images, a.json, a.axis_check_volumes)
    p.set_defaults(func=run)


def _add_convert_dicom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-dicom", help="one OAI sagittal DESS DICOM series -> NIfTI in release orientation")
    p.add_argument("dicom_dir", type=Path)
    p.add_argument("out", type=Path, help="output .nii.gz")

    def run(a: argparse.Namespace) -> int:
        from .data.dicom import convert_dicom
        try:
            print(convert_dicom(a.dicom_dir, a.out))
        except (ValueError, OSError) as e:  # DicomSeriesError names the file and tag
            print(f"reasonknee3d convert-dicom: {e}", file=sys.stderr)
            return 2
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
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=("train", "val", "test"))
    _add_location_options(p)

    def run(a: argparse.Namespace) -> int:
        from .config import ConfigError
        from .families import get_family, load_experiment_config
        try:
            exp = load_experiment_config(a.config, _location_overrides(a))
        except ConfigError as e:
            print(f"reasonknee3d preprocess: {e}", file=sys.stderr)
            return 2
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
        from .evaluation.score import ScoreInputError, score_files
        try:
            report = score_files(a.predictions, a.references, a.out, a.majority_source, plots=not a.no_plots)
        except (ScoreInputError, OSError) as e:
            print(f"reasonknee3d score: {e}", file=sys.stderr)
            return 2
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
        from .config import ConfigError
        from .families import get_family, load_experiment_config
        try:
            exp = load_experiment_config(a.config, a.overrides)
            out = get_family(exp.family).init(exp, a.out, overwrite=a.overwrite)
        except (ConfigError, ValueError, OSError) as e:
            print(f"reasonknee3d init: {e}", file=sys.stderr)
            return 2
        print(out)
        return 0
    p.set_defaults(func=run)


def _add_zeroshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot predictions: local Qwen2(.5)-VL (hf) or an OpenAI-compatible API")
    p.add_argument("--backend", required=True, choices=("hf", "openai"))
    p.add_argument("--model", required=True, help="hf: checkpoint folder; openai: model name at the endpoint")
    p.add_argument("--data", type=Path, required=True, help="release root")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "test_balanced"))
    p.add_argument("--out", type=Path, required=True, help="predictions .jsonl (appended; a rerun resumes)")
    p.add_argument("--setting", default="plain", choices=("plain", "guided", "gt-crop"))
    p.add_argument("--preset", default="package", choices=("package", "paper"),
                   help="package: the package's frames and prompts; paper: the published inputs (hf: every "
                        "slice at 4 fps, per-slice scaling, processor-default size; openai: slices 32-128; "
                        "the release's questions_nobbox_* text)")
    p.add_argument("--base-url", default=None, help="openai: endpoint root, e.g. https://api.openai.com/v1 "
                                                     "(key from OPENAI_API_KEY)")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples of the split")
    _add_location_options(p, cache=False)
    p.add_argument("--frames", type=int, default=None, help="slices sent (default: all for hf, 32 for openai)")
    p.add_argument("--frame-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="pixels per slice, multiples of 28 (default: 224 224 for hf, 392 392 for openai)")
    p.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="openai: seconds per request attempt, connect to the reply's last byte")
    p.add_argument("--max-retries", type=int, default=4, help="openai: retries on 429 / 5xx / timeouts")
    p.add_argument("--allow-no-key", action="store_true",
                   help="openai: run without OPENAI_API_KEY against a remote endpoint that needs no key "
                        "(a local server never needs this)")
    p.add_argument("--batch-size", type=int, default=1, help="hf: samples per generate call")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="hf: generation budget")

    def run(a: argparse.Namespace) -> int:
        from .evaluation.zeroshot import ZeroShotError, run_zeroshot
        try:
            res = run_zeroshot(a.backend, a.model, a.data, a.split, a.out, setting=a.setting, base_url=a.base_url,
                               limit=a.limit, frames=a.frames, frame_size=a.frame_size, concurrency=a.concurrency,
                               timeout=a.timeout, max_retries=a.max_retries, batch_size=a.batch_size,
                               max_new_tokens=a.max_new_tokens, allow_no_key=a.allow_no_key,
                               preset=a.preset, images=a.images)
        except (ValueError, OSError, ZeroShotError) as e:
            print(f"reasonknee3d zeroshot: {e}", file=sys.stderr)
            return 2
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
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (train.max_steps)")
    p.add_argument("--save-steps", type=int, default=None, help="steps between checkpoints (train.save_steps)")
    _add_location_options(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.learning_rate=1e-4 model.num_bins=64")

    def run(a: argparse.Namespace) -> int:
        import json
        import logging

        from .config import ConfigError
        from .families import load_experiment_config
        from .training.trainer import NonFiniteTrainingError, run_training
        flags = {"train.data_dir": a.data, "train.output_dir": a.output_dir, "train.max_steps": a.max_steps,
                 "train.save_steps": a.save_steps}
        # JSON-quoted: a path stays a string even when YAML would read it as a number or a mapping.
        overrides = ([f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None] + _location_overrides(a)
                     + list(a.overrides))
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            result = run_training(load_experiment_config(a.config, overrides))
        except (ConfigError, FileNotFoundError) as e:
            print(f"reasonknee3d train: {e}", file=sys.stderr)
            return 2
        except NonFiniteTrainingError as e:
            print(f"reasonknee3d train: {e}", file=sys.stderr)
            return 1
        resumed = f", resumed from {result.resumed_from}" if result.resumed_from else ""
        print(f"trained to step {result.global_step}{resumed}: {result.final_dir}"
              + (f", merged: {result.merged_dir}" if result.merged_dir else ""))
        return 0
    p.set_defaults(func=run)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="batched generation with a trained model -> predictions JSONL (resumable)")
    p.add_argument("--model", type=Path, required=True, help="model folder (checkpoint-N, final, merged or init), or a region_grades output folder")
    p.add_argument("--data", type=Path, required=True, help="release root")
    p.add_argument("--split", default="test", choices=("train", "val", "test", "test_balanced"))
    p.add_argument("--out", type=Path, required=True, help="predictions .jsonl (appended; a rerun resumes)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per generate call")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples of the split")
    p.add_argument("--max-new-tokens", type=int, default=512, help="generation budget per sample")
    _add_location_options(p)
    p.add_argument("--unconstrained", action="store_true",
                   help="plain greedy decoding (no box / severity logits processors)")
    p.add_argument("--boxes", default=None, metavar="reference|P.jsonl",
                   help="a region_grades --model (the direct 3D classifier) grades in these boxes: the release's "
                        "(reference, the default) or those of another model's predictions file")

    def run(a: argparse.Namespace) -> int:
        from .evaluation.classify import REFERENCE_BOXES, classify, is_region_grades_dir
        from .evaluation.predict import predict
        try:
            if is_region_grades_dir(a.model):
                res = classify(a.model, a.data, a.split, a.out, boxes=a.boxes or REFERENCE_BOXES,
                               batch_size=a.batch_size, limit=a.limit, images=a.images, cache_dir=a.cache_dir)
            elif a.boxes is not None:
                raise ValueError(f"--boxes is for a region_grades folder (the direct 3D classifier); {a.model} "
                                 f"is not one (no region_heads.json and encoder/)")
            else:
                res = predict(a.model, a.data, a.split, a.out, batch_size=a.batch_size, limit=a.limit,
                              constrained=not a.unconstrained, max_new_tokens=a.max_new_tokens, images=a.images,
                              cache_dir=a.cache_dir)
        except (ValueError, OSError) as e:
            print(f"reasonknee3d predict: {e}", file=sys.stderr)
            return 2
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


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="answer one question about one volume; optional box overlay picture")
    p.add_argument("--model", type=Path, required=True, help="model folder (3D-native or slice baseline)")
    p.add_argument("--volume", type=Path, required=True, help="NIfTI volume (.nii.gz)")
    p.add_argument("--question-id", type=int, required=True)
    p.add_argument("--box", type=int, nargs=6, default=None, metavar="V", help="reference box to draw (voxels)")
    p.add_argument("--png", type=Path, default=None, help="write the three-slice overlay picture here")
    p.add_argument("--prompt", default=None, help="prompt text (default: the project's question wording)")
    p.add_argument("--unconstrained", action="store_true", help="plain greedy decoding, no box/JSON constraints")
    p.add_argument("--knee-side", choices=("left", "right"), default=None,
                   help="knee side, for models trained with data.canonical_side when the file name does not end "
                        "in _left/_right")

    def run(a: argparse.Namespace) -> int:
        from .evaluation.infer import infer
        r = infer(a.model, a.volume, a.question_id, gt_box=a.box, png=a.png, prompt=a.prompt,
                  constrained=not a.unconstrained, knee_side=a.knee_side)
        print(r.text)
        print(f"\nbox: {r.box}\nseverity: {r.severity}" + (f"\npicture: {r.png}" if r.png else ""))
        return 0
    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole loop on the embedded default: synth, train both, predict, score")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="everything is written under this folder")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (about 2 minutes)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo in --out that used other settings (same settings resume)")

    def run(a: argparse.Namespace) -> int:
        from .demo import run_demo
        from .io_utils import OutputDirError
        try:
            run_demo(a.out, quick=a.quick, overwrite=a.overwrite)
        except OutputDirError as e:
            print(f"reasonknee3d demo: {e}", file=sys.stderr)
            return 2
        return 0
    p.set_defaults(func=run)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure the performance figures (token ratio, step speedup, cache, scoring, "
                                     "KV cache, MFU) on this machine")
    p.add_argument("--out", type=Path, default=None, help="write the full JSON here (default: print it)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per figure after a warm-up (default: 5, training steps 3; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="smoke test on the tiny configs (under a minute)")

    def run(a: argparse.Namespace) -> int:
        import json
        import logging

        from .bench import print_table, run_bench
        if a.repeats is not None and a.repeats < 1:
            print(f"reasonknee3d bench: --repeats must be >= 1, got {a.repeats}", file=sys.stderr)
            return 2
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        result = run_bench(a.out, repeats=a.repeats, quick=a.quick)
        print_table(result)
        if a.out is None:
            print(json.dumps(result, indent=1))
        else:
            print(f"JSON: {a.out}")
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
    _add_infer,
    _add_demo,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reasonknee3d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
