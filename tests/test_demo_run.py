"""`curate demo` end to end at a small size: every stage runs and the report adds up."""
import json
from pathlib import Path

import pytest
from curate.demo_run import run_demo


@pytest.mark.slow
def test_small_demo_runs_every_stage_and_reports(tmp_path: Path):
    text = run_demo(tmp_path / "demo", workers=0, progress=False, per_class=12, epochs=1)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    m = report["metrics"]
    assert m["proxies"]["demo-cnn"]["images"] == 96 and m["proxies"]["demo-cnn"]["localisation"] is None
    assert m["proxies"]["demo-vit"]["localisation"]["images"] > 0
    sh = m["shard"]
    assert sh["verify_faults"] == 0 and sh["train_samples"] == sh["kept"]
    assert sum(sh["reasons"].values()) == sh["inputs"] == 96
    assert "label was flipped" in text and "near-duplicates" in text
    for png in ("score_histograms.png", "importance_overlay.png"):
        assert (tmp_path / "demo" / "plots" / png).stat().st_size > 1000

