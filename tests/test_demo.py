"""The demo chains every real code path: synth -> train both families -> predict -> score -> infer."""
import dataclasses
import json

from reasonknee3d.demo import DemoSettings, run_demo


def test_demo_writes_the_comparison_reports_and_pictures(tmp_path, capsys):
    s = DemoSettings(volumes=6, max_steps=2, batch_size=2, max_new_tokens=120, test_limit=4, pictures=1,
                     pretrain_steps=2, grade_prior_taus=(0.0, 1.0))
    table = run_demo(tmp_path, settings=s)
    assert list(table) == ["3d", "slice", "3d_classifier", "majority", "3d_classifier_reference_boxes"]
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved == json.loads(json.dumps(table))
    for name in ("3d", "slice"):
        row = saved[name]
        assert 0.0 <= row["miou"] <= 1.0 and row["parse_fail_severity"] == 0.0  # constrained decoding
        assert row["visual_tokens"] == 128 and row["train_seconds"] > 0
        report = json.loads((tmp_path / "reports" / name / "report.json").read_text())
        assert report["n"] == 4
        assert len((tmp_path / f"predictions_{name}.jsonl").read_text().splitlines()) == 4
    assert saved["majority"]["train_seconds"] is None
    # Each family's tau was chosen on val (4 samples per tau, as test_limit says) and the test split used it.
    for name in ("3d", "slice"):
        tuning = json.loads((tmp_path / "tuning" / name / "grade_prior.json").read_text())
        assert set(tuning["by_tau"]) == {"0", "1"} and saved[name]["grade_prior_tau"] == tuning["chosen_tau"]
        assert len((tmp_path / "tuning" / name / "predictions_val_tau1.jsonl").read_text().splitlines()) == 4
    # The classifier rows: the region_grades model graded the same 4 samples, in the 3D model's boxes and in
    # the reference boxes; the 3D model's encoder started from that pretraining.
    for name in ("3d_classifier", "3d_classifier_reference_boxes"):
        assert len((tmp_path / f"predictions_{name}.jsonl").read_text().splitlines()) == 4
        assert saved[name]["parse_fail_severity"] == 0.0
    assert saved["3d_classifier_reference_boxes"]["miou"] == 1.0
    assert sum(saved["3d_classifier"]["box_sources"].values()) == 4
    assert saved["3d_classifier"]["box_sources"]["reference"] == 0
    config = (tmp_path / "runs" / "3d" / "config.yaml").read_text()
    assert str(tmp_path / "runs" / "region_grades" / "encoder") in config
    timings = json.loads((tmp_path / "demo_timings.json").read_text())
    assert {"pretrain", "train_3d", "train_slice", "predict_3d", "total"} <= set(timings)
    md = (tmp_path / "comparison.md").read_text()
    assert md.count("| 3d |") == 1 and md.count("| 3d_classifier |") == 1 and "Time split" in md
    assert "tau chosen per model on the val split by balanced accuracy among [0.0, 1.0]" in md
    pictures = list((tmp_path / "pictures").glob("infer_3d_*_q*.png"))  # volume and question: no two collide
    assert len(pictures) == 1 and pictures[0].read_bytes()[:4] == b"\x89PNG"
    out, err = capsys.readouterr()
    tail = out.splitlines()[-3:]  # ends with where its table, reports and pictures are
    assert tail[0] == f"table:    {tmp_path / 'comparison.md'} (and comparison.json)"
    assert str(tmp_path / "reports" / "3d" / "report.md") in tail[1]
    assert tail[2] == f"pictures: {tmp_path / 'comparison.png'}, {pictures[0]}"
    assert "SMOKE TEST" in out and "smoke test" in (tmp_path / "comparison.md").read_text()  # 2 steps
    assert "Writing model shards" not in err and "Loading weights" not in err and "Warning" not in err


def _table(qwk_slice: float) -> dict:
    from reasonknee3d.demo import TABLE_METRICS
    row = {m: 0.5 for m in TABLE_METRICS}
    return {"3d": {**row, "train_seconds": 142.3, "visual_tokens": 128},
            "slice": {**row, "qwk": qwk_slice, "train_seconds": 96.0, "visual_tokens": 5120},
            "majority": {**row, "qwk": 0.005, "train_seconds": None, "visual_tokens": None}}


def test_plot_y_limits_come_from_the_data(tmp_path):
    from reasonknee3d.demo import _plot, plot_limits
    lo, hi = plot_limits(_table(-0.62))
    assert lo < -0.62 and hi >= 1.0
    assert plot_limits(_table(0.3))[0] == 0.0  # nothing negative: the axis starts at 0
    fig = _plot(_table(-0.62), tmp_path / "c.png")
    ymin, ymax = fig.axes[0].get_ylim()
    assert ymin <= -0.62 and ymax >= 1.0 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    bars = [p.get_height() for p in fig.axes[0].patches]
    assert min(bars) == -0.62 and len(bars) == 3 * 5


def test_printed_table_fits_100_columns_and_marks_a_smoke_test(monkeypatch):
    import io

    from reasonknee3d.demo import TABLE_WIDTH, _markdown, _print_table, QUICK
    monkeypatch.setenv("COLUMNS", "300")
    for quick in (False, True):
        buf = io.StringIO()
        _print_table(_table(-0.62), quick, file=buf)
        lines = buf.getvalue().splitlines()
        assert max(map(len, lines)) <= TABLE_WIDTH < 100
        assert any("vis_tok" in line and "diag_exact" in line for line in lines)  # no header cut short
        assert any(line.split()[:1] == ["slice"] and "-0.620" in line and "5120" in line for line in lines)
        assert ("SMOKE TEST" in buf.getvalue()) == quick
        assert ("smoke test" in _markdown(_table(0.1), QUICK, quick)) == quick
    # the side-aware majority box is said when the 3D report has it, and only then
    side = _markdown(_table(0.1), QUICK, False, side_box={"miou": 0.303, "acc_iou50": 0.176})
    assert "per question *and knee side*" in side and "miou 0.303, acc_iou50 0.176" in side
    assert "knee side" not in _markdown(_table(0.1), QUICK, False)
    # the classifier's box sources are said when this run counted them (a resumed demo wrote no new prediction)
    for sources in ({"model": 4, "reference": 0}, None):
        table = {**_table(0.1), "3d_classifier": {**_table(0.1)["3d"], "box_sources": sources}}
        md = _markdown(table, QUICK, False)
        assert "`3d_classifier`" in md and ('boxes: {"model": 4' in md) == (sources is not None)
        assert "null" not in md


def test_demo_seed_reaches_the_settings(monkeypatch, tmp_path):
    import reasonknee3d.demo as demo
    from reasonknee3d.cli import main

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda out, quick, overwrite, settings: seen.append((quick, settings)))
    assert main(["demo", "--out", str(tmp_path / "d"), "--seed", "3"]) == 0
    assert main(["demo", "--out", str(tmp_path / "q"), "--quick", "--seed", "2"]) == 0
    assert seen[0] == (False, dataclasses.replace(demo.DemoSettings(), seed=3))
    assert seen[1] == (True, dataclasses.replace(demo.QUICK, seed=2))
    assert main(["demo", "--out", str(tmp_path / "n"), "--seed", "-1"]) == 2 and len(seen) == 2
    assert main(["demo", "--out", str(tmp_path / "f"), "--full", "--seed", "1"]) == 0
    assert seen[2] == (False, dataclasses.replace(demo.FULL, seed=1))
    assert seen[2][1].max_steps == 10 * demo.DemoSettings().max_steps and seen[2][1].volumes == 100
    assert main(["demo", "--out", str(tmp_path / "b"), "--full", "--quick"]) == 2 and len(seen) == 3
