"""The demo chains every real code path: synth -> train both families -> predict -> score -> infer."""
import json

from reasonknee3d.demo import DemoSettings, run_demo


def test_demo_writes_the_comparison_reports_and_pictures(tmp_path):
    s = DemoSettings(volumes=6, max_steps=2, batch_size=2, max_new_tokens=120, test_limit=4, pictures=1)
    table = run_demo(tmp_path, settings=s)
    assert set(table) == {"3d", "slice", "majority"}
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
    assert (tmp_path / "comparison.md").read_text().count("| 3d |") == 1
    pictures = list((tmp_path / "pictures").glob("infer_3d_q*.png"))
    assert len(pictures) == 1 and pictures[0].read_bytes()[:4] == b"\x89PNG"
