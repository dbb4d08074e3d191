"""``reasonknee3d check-release``: what the loader can use of a release, and in which form each piece came.

``check_release(root, images=None)`` returns a JSON-ready report; ``print_report`` shows it as tables;
``run_check_release`` (the CLI) does both, writes the JSON atomically and returns the exit status: 0 when every
split present (a ``data/generate_data/<split>.json`` exists) has usable items, 1 otherwise (the report's
``blocking`` says what blocks), 2 when the folder is not a release root.

Per split it reports: CSV rows and unusable rows, items, usable and skipped items with counts per reason kind
(``release_forms.KIND_*``) and the first three examples of each, volumes found / missing, the form of every
piece (question files, CSV ``path`` column, path resolution, knee side, question id, diagnosis, box source),
volume shape / spacing / slice-axis statistics and mask-vs-image shape and affine agreement (NIfTI headers
only), question-id coverage, and, where written boxes and masks are both present, how well the written boxes
match the masks' boxes as written and with x/y swapped (the check ``boxes.RELEASE_BOX_AXES`` asks for).
"""
from __future__ import annotations

import csv
import shutil
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..boxes import RELEASE_BOX_AXES, iou_3d, package_box_to_release, release_box_to_package
from ..io_utils import write_json
from ..schema import load_schema
from . import release_forms as rf
from .io import VolumeError, inspect_volume, load_mask
from .release import SPLITS, ReleaseError, ReleaseLoader, Sample, Skipped, _label_boxes, _union_box, csv_path

EXAMPLES = 3
"""Examples kept per skip reason and per disagreement."""
AXIS_CHECK_VOLUMES = 8
"""Volumes whose masks are read (voxel data) to compare written boxes with mask boxes, per split."""
AFFINE_TOLERANCE_MM = 1e-3
"""Largest difference between a mask's and its image's affine entries that still counts as the same grid."""


def _counted(pairs: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """(kind, example) pairs -> {kind: {"count": n, "examples": first EXAMPLES}}, most frequent kind first."""
    out: dict[str, dict[str, Any]] = {}
    for kind, example in pairs:
        entry = out.setdefault(kind, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES:
            entry["examples"].append(example)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["count"]))


def _spread(values: list[float]) -> Optional[list[float]]:
    return [round(min(values), 4), round(statistics.median(values), 4), round(max(values), 4)] if values else None


def _question_files(loader: ReleaseLoader) -> dict[str, Any]:
    schema_ids = set(load_schema())
    out: dict[str, Any] = {"present": {}, "errors": []}
    for form, path in loader.question_files().items():
        try:
            ids = set(rf.read_question_file(path))
        except rf.FormError as e:
            out["errors"].append(str(e))
            continue
        out["present"][form] = {"file": path.name, "ids": len(ids), "missing_ids": sorted(schema_ids - ids),
                                "unknown_ids": sorted(ids - schema_ids)}
    out["styles"] = {style: next((rf.QUESTION_FILES[f] for f in forms if f in out["present"]), None)
                     for style, forms in rf.QUESTION_TEXT_STYLES.items()}
    return out


def _volumes(records: list) -> dict[str, Any]:
    """Found / missing volumes, header statistics and mask agreement over the split's usable CSV rows."""
    found, missing, unreadable = 0, [], []
    shapes, orders = Counter(), Counter()
    spacing: list[list[float]] = [[], [], []]
    masks: dict[str, Any] = {"rows_with_mask": 0, "found": 0, "missing": [], "unreadable": [], "shape_agrees": 0,
                             "shape_differs": [], "affine_agrees": 0, "affine_differs": []}
    n_missing_masks = n_bad_masks = n_shape_diff = n_affine_diff = 0
    for v in records:
        if v.image_form == rf.FORM_PATH_MISSING:
            missing.append(str(v.image_path))
            continue
        try:
            meta = inspect_volume(v.image_path)
        except VolumeError as e:
            unreadable.append(str(e))
            continue
        found += 1
        shapes["x".join(map(str, meta.shape))] += 1
        orders["slices first" if meta.axis_order == (0, 1, 2) else "slices last (transposed)"] += 1
        for axis in range(3):
            spacing[axis].append(meta.spacing[axis])
        if v.mask_path is None and v.mask_problem is None:
            continue
        masks["rows_with_mask"] += 1
        if v.mask_problem is not None or v.mask_form == rf.FORM_PATH_MISSING:
            n_missing_masks += 1
            if len(masks["missing"]) < EXAMPLES:
                masks["missing"].append(v.mask_problem or str(v.mask_path))
            continue
        try:
            mmeta = inspect_volume(v.mask_path)
        except VolumeError as e:
            n_bad_masks += 1
            if len(masks["unreadable"]) < EXAMPLES:
                masks["unreadable"].append(str(e))
            continue
        masks["found"] += 1
        if mmeta.stored_shape == meta.stored_shape:
            masks["shape_agrees"] += 1
        else:
            n_shape_diff += 1
            if len(masks["shape_differs"]) < EXAMPLES:
                masks["shape_differs"].append(f"{v.mask_path} {mmeta.stored_shape} vs {v.image_path} {meta.stored_shape}")
        if mmeta.axis_order == meta.axis_order and np.allclose(mmeta.affine, meta.affine, atol=AFFINE_TOLERANCE_MM):
            masks["affine_agrees"] += 1
        else:
            n_affine_diff += 1
            if len(masks["affine_differs"]) < EXAMPLES:
                worst = float(np.max(np.abs(mmeta.affine - meta.affine)))
                masks["affine_differs"].append(f"{v.mask_path} vs {v.image_path}: largest affine difference "
                                               f"{worst:.4g}")
    masks.update(missing_count=n_missing_masks, unreadable_count=n_bad_masks, shape_differs_count=n_shape_diff,
                 affine_differs_count=n_affine_diff)
    return {"rows": len(records), "found": found, "missing": len(missing), "missing_examples": missing[:EXAMPLES],
            "unreadable": len(unreadable), "unreadable_examples": unreadable[:EXAMPLES],
            "shapes": dict(shapes.most_common(5)), "distinct_shapes": len(shapes), "slice_axis": dict(orders),
            "spacing_mm_min_median_max": {name: _spread(vals) for name, vals in zip(("S", "H", "W"), spacing)},
            "masks": masks}


def _box_axes(loader: ReleaseLoader, by_volume: dict[str, list[Sample]], records: dict) -> Optional[dict[str, Any]]:
    """Written boxes vs the boxes of their masks, as written and with x/y swapped, over a few volumes."""
    if not by_volume or not loader.has_subregion_mapping:
        return None
    mapping = loader.subregion_mapping
    swapped_axes = (0, 2, 1) if tuple(RELEASE_BOX_AXES) == (0, 1, 2) else (0, 1, 2)
    iou_written, iou_swapped, exact_written, exact_swapped, volumes = [], [], 0, 0, 0
    for vid, samples in by_volume.items():
        v = records[vid]
        if v.mask_path is None or v.mask_problem is not None or v.mask_form == rf.FORM_PATH_MISSING:
            continue
        try:
            meta = inspect_volume(v.image_path)
            boxes = _label_boxes(load_mask(v.mask_path, meta))
        except VolumeError:
            continue  # reported by the mask agreement check
        volumes += 1
        for s in samples:
            ref = _union_box([boxes[k] for k in mapping.get(s.question_id, []) if k in boxes])
            if ref is None or s.box is None:
                continue
            swapped = release_box_to_package(package_box_to_release(s.box), swapped_axes)
            iou_written.append(float(iou_3d(s.box, ref)))
            iou_swapped.append(float(iou_3d(swapped, ref)))
            exact_written += s.box == ref
            exact_swapped += swapped == ref
    if not iou_written:
        return None
    return {"volumes": volumes, "boxes": len(iou_written), "release_box_axes": list(RELEASE_BOX_AXES),
            "as_written": {"mean_iou": round(float(np.mean(iou_written)), 4), "exact": exact_written},
            "x_y_swapped": {"mean_iou": round(float(np.mean(iou_swapped)), 4), "exact": exact_swapped}}


def _check_split(loader: ReleaseLoader, split: str, axis_check_volumes: int) -> dict[str, Any]:
    out: dict[str, Any] = {"items_file": str(loader.root / "data" / "generate_data" / f"{split}.json"),
                           "csv": str(csv_path(loader.root, split))}
    try:
        records, problems = loader.volume_rows(split)
    except ReleaseError as e:
        out["error"] = str(e)
        return out
    with open(csv_path(loader.root, split), newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader(fh), [])
    out["csv_rows"] = len(records) + len(problems)
    out["csv_path_column"] = "path" in [c.strip() for c in header]
    out["csv_row_problems"] = _counted([(p.kind, p.reason) for p in problems])
    out["volumes"] = _volumes(records)

    skipped: list[Skipped] = []
    n_usable, qids = 0, Counter()
    by_volume: dict[str, list[Sample]] = {}
    try:
        for s in loader.iter_samples(split, skipped):
            n_usable += 1
            qids[s.question_id] += 1
            written = s.box_source.startswith("item key") or s.box_source == rf.FORM_BOX_ANSWER
            if written and (s.volume_id in by_volume or len(by_volume) < axis_check_volumes):
                by_volume.setdefault(s.volume_id, []).append(s)
    except ReleaseError as e:
        out["error"] = str(e)
        return out
    # CSV rows no item can name are in ``skipped`` too; they are counted once, under csv_row_problems.
    item_skips = [s for s in skipped if s.item.startswith(out["items_file"])]
    out["items"] = n_usable + len(item_skips)
    out["usable"] = n_usable
    out["skipped"] = _counted([(s.kind or "other", f"{s.item}: {s.reason}") for s in item_skips])
    forms = {"image path": Counter(v.image_form for v in records),
             "mask path": Counter(v.mask_form or ("refused" if v.mask_problem else "none in the CSV") for v in records),
             "knee side": Counter(v.side_form for v in records),
             **loader.forms.get(split, {})}
    out["forms"] = {piece: dict(c.most_common()) for piece, c in forms.items()}
    schema_ids = set(load_schema())
    out["question_ids"] = {"covered": len(qids), "of": len(schema_ids), "missing": sorted(schema_ids - set(qids)),
                           "samples_per_question_min_max": [min(qids.values()), max(qids.values())] if qids else None}
    out["box_axes"] = _box_axes(loader, by_volume, {v.volume_id: v for v in records})
    return out


def check_release(root: str | Path, images: str | Path | None = None,
                  axis_check_volumes: int = AXIS_CHECK_VOLUMES) -> dict[str, Any]:
    """The report of one release root (see the module docstring); raises ``ReleaseError`` when ``root`` is not
    a release root or ``images`` is not a folder."""
    loader = ReleaseLoader(root, images=images)
    report: dict[str, Any] = {
        "root": str(loader.root), "images": str(loader.images.root) if loader.images else None,
        "images_indexed": len(loader.images) if loader.images else None,
        "question_files": _question_files(loader),
        "subregion_mapping": loader.has_subregion_mapping, "splits": {}}
    present = [s for s in SPLITS if (loader.root / "data" / "generate_data" / f"{s}.json").is_file()]
    blocking: list[str] = []
    for split in present:
        r = report["splits"][split] = _check_split(loader, split, axis_check_volumes)
        if "error" in r:
            blocking.append(f"{split}: {r['error']}")
        elif not r["usable"]:
            reasons = "; ".join(f"{kind} ({e['count']}): {e['examples'][0]}" for kind, e in r["skipped"].items())
            blocking.append(f"{split}: no usable item of {r['items']}" + (f" - {reasons}" if reasons else ""))
    if not present:
        blocking.append(f"no split present: none of data/generate_data/{{{','.join(SPLITS)}}}.json exists")
    report["ok"] = not blocking
    report["blocking"] = blocking
    return report


def _ids(ids: list[int], limit: int = 8) -> str:
    return ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _form_rows(r: dict[str, Any]) -> dict[str, str]:
    """Piece -> one cell of the forms table for one split."""
    vol, m = r["volumes"], r["volumes"]["masks"]
    rows = {"CSV": "with 'path' column" if r["csv_path_column"] else "without 'path' column"}
    rows.update({piece: "\n".join(f"{form}: {n}" for form, n in counts.items()) or "-"
                 for piece, counts in r["forms"].items()})
    rows["volume shapes (S, H, W)"] = "\n".join(f"{k}: {n}" for k, n in vol["shapes"].items()) or "-"
    sp = vol["spacing_mm_min_median_max"]
    rows["spacing mm (min/median/max)"] = "\n".join(f"{a}: {v[0]:g} / {v[1]:g} / {v[2]:g}" for a, v in sp.items()
                                                    if v) or "-"
    rows["slice axis"] = "\n".join(f"{k}: {n}" for k, n in vol["slice_axis"].items()) or "-"
    rows["mask vs image"] = (f"shape agrees {m['shape_agrees']}/{m['found']}\naffine agrees {m['affine_agrees']}/"
                             f"{m['found']}") if m["found"] else "no mask read"
    b = r["box_axes"]
    rows["written box vs mask"] = (f"{b['boxes']} boxes, {b['volumes']} volumes\nas written: IoU "
                                   f"{b['as_written']['mean_iou']:.3f}, {b['as_written']['exact']} exact\nx/y swapped: "
                                   f"IoU {b['x_y_swapped']['mean_iou']:.3f}, {b['x_y_swapped']['exact']} exact"
                                   ) if b else "not compared"
    missing = r["question_ids"]["missing"]
    rows["question ids missing"] = _ids(missing) if missing else "none"
    return rows


def print_report(report: dict[str, Any], console: Any = None) -> None:
    """The report as rich tables: splits, the forms each piece came in (one column per split), what was not
    usable and why, and the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(120, shutil.get_terminal_size((140, 40)).columns))
    console.print(f"[bold]release[/bold] {report['root']}"
                  + (f"   images {report['images']} ({report['images_indexed']} NIfTI files)" if report["images"] else ""))
    qf = report["question_files"]
    files = "; ".join(f"{d['file']} ({d['ids']} ids" + (f", missing {_ids(d['missing_ids'])}" if d["missing_ids"] else "")
                      + ")" for d in qf["present"].values()) or "none"
    console.print(f"question files: {files}")
    console.print(f"question_subregion_mapping.json: {'present' if report['subregion_mapping'] else 'absent'}")
    for err in qf["errors"]:
        console.print(f"[red]{err}[/red]")

    good = {split: r for split, r in report["splits"].items() if "error" not in r}
    table = Table(title="splits")
    for col in ("split", "CSV rows", "bad rows", "volumes found", "volumes missing", "masks found", "items", "usable",
                "skipped", "questions"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, r in report["splits"].items():
        if split not in good:
            table.add_row(split, f"[red]{r['error']}[/red]", *[""] * 8)
            continue
        vol = r["volumes"]
        table.add_row(split, str(r["csv_rows"]), str(sum(e["count"] for e in r["csv_row_problems"].values())),
                      str(vol["found"]), str(vol["missing"]), f"{vol['masks']['found']}/{vol['masks']['rows_with_mask']}",
                      str(r["items"]), str(r["usable"]), str(sum(e["count"] for e in r["skipped"].values())),
                      f"{r['question_ids']['covered']}/{r['question_ids']['of']}")
    console.print(table)

    if good:
        forms = Table(title="forms (counts over CSV rows / usable items)", show_lines=True)
        forms.add_column("piece")
        cells = {split: _form_rows(r) for split, r in good.items()}
        for split in good:
            forms.add_column(split)
        for piece in next(iter(cells.values())):
            forms.add_row(piece, *[cells[split].get(piece, "-") for split in good])
        console.print(forms)

    problems = [(split, f"CSV: {kind}", e) for split, r in good.items() for kind, e in r["csv_row_problems"].items()]
    problems += [(split, kind, e) for split, r in good.items() for kind, e in r["skipped"].items()]
    if problems:
        skips = Table(title="not usable", show_lines=True)
        for col in ("split", "reason", "count", "first example"):
            skips.add_column(col, justify="right" if col == "count" else "left")
        for split, kind, e in problems:
            skips.add_row(split, kind, str(e["count"]), e["examples"][0])
        console.print(skips)
    if report["ok"]:
        console.print("[green]ok[/green]: every split present has usable items")
    else:
        for line in report["blocking"]:
            console.print(f"[red]blocking[/red]: {line}")


def run_check_release(root: str | Path, images: str | Path | None = None, json_out: str | Path | None = None,
                      axis_check_volumes: int = AXIS_CHECK_VOLUMES) -> int:
    """Check, print, write the JSON (atomically) and return the exit status (0 ok, 1 blocked).

    A folder that is no release raises ``ReleaseError`` (the command line prints it as a one-line error, exit 2).
    """
    report = check_release(root, images, axis_check_volumes)
    print_report(report)
    if json_out is not None:
        write_json(json_out, report)
        print(f"JSON: {json_out}")
    return 0 if report["ok"] else 1
