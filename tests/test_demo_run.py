"""`curate demo` end to end at a small size: every stage runs and the report adds up."""
import json
from pathlib import Path

import pytest
from curate.demo_run import run_demo
from curate.demo_train import DemoTrain


@pytest.mark.slow
def test_small_demo_runs_every_stage_and_reports(tmp_path: Path):
    small = DemoTrain(epochs=1, batch_size=8, workers=0, extra={"model_kwargs": {"depth": 1, "embed_dim": 32,
                                                                                  "num_heads": 2}})
    text = run_demo(tmp_path / "demo", workers=0, progress=False, per_class=12, epochs=1, train=small)
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
    train = m["train"]["variants"]
    assert set(train) == {"full", "random 70%", "curated 70%", "curated 70% + keep 0.7"}
    assert all(0 <= v["val_acc"] <= 1 and v["wall_s"] > 0 for v in train.values())
    assert train["full"]["wall_ratio"] == 1.0 and "to full-1pt" in text
    shards = json.loads((tmp_path / "demo" / "shards" / "manifest.json").read_text())
    assert shards["splits"]["validation"]["importance"] is True  # --val-scores: maps for dropped-token eval
