"""The demo chains every real code path: synth -> train both families -> predict -> score -> infer."""
import json

from reasonknee3d.demo import DemoSettings, run_demo


def test_demo_writes_the_comparison_reports_and_pictures(tmp_path):
    s = DemoSettings(volumes=6, max_steps=2, batch_size=2, max_new_tokens=120, test_limit=4, pictures=1,
                     pretrain_steps=2)
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
    pictures = list((tmp_path / "pictures").glob("infer_3d_q*.png"))
    assert len(pictures) == 1 and pictures[0].read_bytes()[:4] == b"\x89PNG"
