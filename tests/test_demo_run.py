"""`curate demo` end to end at a small size: every stage runs and the report adds up."""
import json
from pathlib import Path

import pytest
from curate.demo.run import run_demo
from curate.demo.train import DemoTrain, acc_at, compare, fit_epochs


@pytest.mark.slow
def test_small_demo_runs_every_stage_and_reports(tmp_path: Path):
    """320 images, proxies trained 4 epochs, a 2-block ViT for 4: small, but past chance on every
    figure the demo reports (the floors hold for seeds 0, 1 and 2 with margin)."""
    small = DemoTrain(epochs=4, batch_size=32, workers=0, extra={"model_kwargs": {"depth": 2, "embed_dim": 64,
                                                                                  "num_heads": 2}})
    text = run_demo(tmp_path / "demo", workers=0, progress=False, per_class=40, epochs=4, train=small)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    m = report["metrics"]
    cnn, vit = m["proxies"]["demo-cnn"], m["proxies"]["demo-vit"]
    assert cnn["images"] == 320 and cnn["localisation"] is None
    chance = 1 / 8
    assert cnn["accuracy_vs_true_label"] > 2.4 * chance and cnn["label_noise_auc"]["el2n"] > 0.7
    assert vit["localisation"]["images"] > 0 and vit["localisation"]["ratio"] > 1.2  # maps find the object
    sh = m["shard"]
    assert sh["verify_faults"] == 0 and sh["train_samples"] == sh["kept"]
    assert sum(sh["reasons"].values()) == sh["inputs"] == 320
    assert sh["flipped_removed"] > sh["clean_removed"] + 0.1 and sh["duplicates"]["found"] >= 0.75
    assert "label was flipped" in text and "near-duplicates" in text and "to full-1pt" in text
    for png in ("score_histograms.png", "importance_overlay.png", "time_to_accuracy.png"):
        assert (tmp_path / "demo" / "plots" / png).stat().st_size > 1000
    train = m["train"]["variants"]
    assert set(train) == {"full", "clean (default)", "random 70%", "curated 70%", "curated 70% + keep 0.7"}
    clean = train["clean (default)"]  # full data's budget in samples: more epochs over fewer images
    assert clean["samples"] == sh["kept"] < train["full"]["samples"] == 320
    assert clean["epochs"] * sh["kept"] <= train["full"]["epochs"] * 320 < (clean["epochs"] + 1) * sh["kept"]
    assert "clean (default): full data's budget in samples seen" in text
    assert all(v["val_acc"] > 1.5 * chance and v["wall_s"] > 0 for v in train.values()), train
    eq = m["train"]["equal_budget"]  # full data, a complete schedule in the cheapest run's time
    cheapest = m["train"]["budget"]
    assert eq["variant"] == cheapest["variant"] and eq["budget_s"] == cheapest["wall_s"]
    full = train["full"]
    assert eq["epochs"] == fit_epochs(cheapest["wall_s"], full["wall_s"] / full["epochs"])
    run = json.loads((tmp_path / "demo" / "train" / "full-equal-budget" / "config.json").read_text())
    assert run["epochs"] == eq["epochs"] and run["warmup_epochs"] == pytest.approx(eq["epochs"] / 4)
    assert eq["rival_val_acc"] == train[eq["variant"]]["val_acc"] and "equal budget: full data" in text
    assert (tmp_path / "demo" / "shards" / "report.html").stat().st_size > 10_000 and "shards/report.html" in text
    shards = json.loads((tmp_path / "demo" / "shards" / "manifest.json").read_text())
    assert shards["splits"]["validation"]["importance"] is True  # --val-scores: maps for dropped-token eval
    again = run_demo(tmp_path / "demo", workers=0, progress=False, per_class=12, epochs=1, train=small)
    assert "curate demo report" in again  # a demo replaces its own previous run


def test_compare_reads_ratios_time_to_target_and_equal_budget_off_the_curves():
    results = {
        "full": {"val_acc": 0.80, "wall_s": 100.0, "curve": [(50.0, 0.70), (100.0, 0.80)]},
        "cheap": {"val_acc": 0.79, "wall_s": 50.0, "curve": [(25.0, 0.60), (50.0, 0.79)]},
        "slow": {"val_acc": 0.75, "wall_s": 70.0, "curve": [(20.0, 0.74), (40.0, 0.72), (70.0, 0.75)]},
    }
    out = compare(results)
    assert out["budget"] == {"variant": "cheap", "wall_s": 50.0}
    assert out["target"] == pytest.approx(0.79)
    full, cheap, slow = (out["variants"][k] for k in ("full", "cheap", "slow"))
    assert full["wall_ratio"] == 1.0 and cheap["wall_ratio"] == 0.5
    assert cheap["acc_minus_full"] == pytest.approx(-0.01)
    assert cheap["time_to_target_ratio"] == 0.5 and slow["time_to_target_ratio"] is None
    # within 50 s: full had measured 0.70 at 50 s; slow's last point inside is 0.72, not its best 0.74
    assert (full["acc_at_budget"], cheap["acc_at_budget"], slow["acc_at_budget"]) == (0.70, 0.79, 0.72)
    assert acc_at([(60.0, 0.5)], 50.0) is None
