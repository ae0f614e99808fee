"""The equal-budget comparison: epochs fitted to each budget, measured cells, resumable."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curate.common.runfolder import RunFolderError
from curate.demo.budget import BUDGET_VARIANTS, BudgetConfig, merge_results, run_budget, write_merged
from curate.demo.train import epoch_records, fit_epochs, low_res_size, slug

from .sparse_fixtures import write_shards

TINY_MODEL = {"model": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "model_kwargs": {"depth": 1}}
BY_NAME = {v.name: v for v in BUDGET_VARIANTS}


def test_fit_epochs_fills_the_budget_with_whole_epochs():
    assert fit_epochs(100.0, 10.0) == 10
    assert fit_epochs(35.0, 10.0) == 3
    assert fit_epochs(5.0, 10.0) == 1  # a run always exists; its wall-clock says it overran


def test_low_res_keeps_the_nearest_square_share_of_tokens():
    assert low_res_size(64, 8, 0.7) == 56  # 49 of 64 tokens
    assert low_res_size(224, 16, 0.7) == 192  # 144 of 196: DeiT-III's 192 px
    assert low_res_size(64, 8, 0.5) == 48  # 36 of 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("budget-data")
    for name, seed in (("shards-full", 0), ("shards-random", 1), ("shards", 2)):
        write_shards(root / name, per_class=8, seed=seed)
    return root


def _config(out: Path, root: Path, **kw: object) -> BudgetConfig:
    variants = tuple(BY_NAME[n] for n in ("full", "curated 70% + keep 0.7", "full at low res (~0.7 tokens)"))
    base = dict(out=out, datasets=((0, root), (1, root)), budgets=(0.5, 1.0), variants=variants,
                model=TINY_MODEL, ref_epochs=4, calibration_epochs=1, batch_size=8, lr=0.05, workers=0,
                extra={"num_classes": 4}, fresh_process=False, progress=False)
    return BudgetConfig(**(base | kw))


@pytest.mark.slow  # ~20 training runs
def test_every_cell_is_trained_for_the_epochs_its_budget_fits_and_resume_reuses_them(dataset: Path, tmp_path: Path):
    out = tmp_path / "budget"
    res = run_budget(_config(out, dataset))
    epoch_s = res["epoch_seconds"]
    assert res["reference"]["seconds"] == pytest.approx(4 * epoch_s["full"])
    assert len(res["cells"]) == 2 * 3 * 2  # budgets x variants x seeds
    for cell in res["cells"]:
        assert cell["epochs"] == fit_epochs(cell["budget_s"], epoch_s[cell["variant"]])
        run = out / "runs" / f"{cell['budget']:g}" / slug(cell["variant"]) / f"seed-{cell['seed']}"
        config = json.loads((run / "config.json").read_text())
        assert config["epochs"] == cell["epochs"] and config["seed"] == cell["seed"]
        assert config["warmup_epochs"] == pytest.approx(cell["epochs"] / 15)  # the schedule scales with the budget
        assert 0 <= cell["val_acc"] <= 1 and cell["wall_s"] > 0
    full_at_1 = [c for c in res["cells"] if c["variant"] == "full" and c["budget"] == 1.0]
    assert all(c["epochs"] == 4 for c in full_at_1)  # full's own complete schedule
    low = json.loads((out / "runs/0.5/full-at-low-res-0.7-tokens/seed-0/config.json").read_text())
    assert low["img_size"] == 56
    keep = [c for c in res["cells"] if c["variant"] == "curated 70% + keep 0.7"]
    assert all(c["val_acc_dropped"] is not None for c in keep)
    rows = {(r["budget"], r["variant"]): r for r in res["summary"]}
    assert len(rows) == 6 and all(r["seeds"] == 2 for r in rows.values())
    acc = {(c["budget"], c["variant"], c["seed"]): c["val_acc"] for c in res["cells"]}
    for (budget, variant), r in rows.items():  # paired with full data at the same budget and seed
        diffs = [acc[budget, variant, s] - acc[budget, "full", s] for s in (0, 1)]
        assert r["paired"] == 2 and r["paired_wins"] == sum(d > 0 for d in diffs)
        assert r["paired_diff_mean"] == pytest.approx(sum(diffs) / 2)
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + 3 and "budget 0.5x" in table and "±" in table
    assert table.count("vs full, wins ") == 4  # every row but full's, at both budgets
    with Image.open(out / "budget.png") as png:
        assert png.size[0] > 300 and np.unique(np.asarray(png.convert("L"))).size > 10  # drawn, not blank

    summaries = sorted(out.glob("runs/*/*/*/summary.json"))
    before = {p: p.stat().st_mtime_ns for p in summaries}
    again = run_budget(_config(out, dataset, budgets=(0.5, 1.0, 0.25), resume=True))
    assert {p: p.stat().st_mtime_ns for p in summaries} == before  # nothing trained twice
    assert len(again["cells"]) == 3 * 3 * 2
    report = run_budget(_config(out, dataset, budgets=(0.5, 0.1), report_only=True))
    assert {p: p.stat().st_mtime_ns for p in summaries} == before and not (out / "runs/0.1").exists()
    assert len(report["cells"]) == 3 * 2 and len(report["missing"]) == 3 * 2  # 0.1x: never trained
    assert "budget 0.1x" not in (out / "table.md").read_text()
    planned = run_budget(_config(out, dataset, budgets=(0.5,), report_only=True, ratio="planned"))
    row = next(r for r in planned["summary"] if r["variant"] == "full")  # full's own planned share: the budget
    assert row["planned_ratio_mean"] == pytest.approx(0.5)
    assert f"{row['planned_ratio_mean']:.2f}x" in (out / "table.md").read_text()
    with pytest.raises(RunFolderError, match="not empty|differ"):
        run_budget(_config(out, dataset, lr=0.01))  # a finished run is never silently replaced
    with pytest.raises(Exception, match="differ"):
        run_budget(_config(out, dataset, lr=0.01, resume=True))


def test_the_reference_must_be_full_data(dataset: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="first variant must be 'full'"):
        run_budget(_config(tmp_path / "b", dataset, variants=(BY_NAME["random 70%"],)))
    assert not (tmp_path / "b").exists()


def test_a_fresh_process_trains_each_run_and_its_failure_is_raised_here(dataset: Path, tmp_path: Path):
    one = dict(budgets=(1.0,), datasets=((0, dataset),), variants=(BY_NAME["full"],), fresh_process=True)
    res = run_budget(_config(tmp_path / "budget", dataset, **one))
    (cell,) = res["cells"]
    assert cell["epochs"] == 4 and 0.0 <= cell["val_acc"] <= 1.0
    missing = dataset.parent / "no-such-dataset"
    with pytest.raises(RuntimeError, match="failed in its process"):
        run_budget(_config(tmp_path / "broken", missing, **(one | {"datasets": ((0, missing),)})))


def test_given_epoch_seconds_plan_the_cells_without_calibrating(dataset: Path, tmp_path: Path):
    variants = (BY_NAME["full"], BY_NAME["random 70%"])
    given = {"full": 10.0, "random 70%": 7.0}  # as another run measured them
    cfg = _config(tmp_path / "b", dataset, variants=variants, budgets=(0.5,), datasets=((0, dataset),),
                  epoch_seconds=given)
    res = run_budget(cfg)
    assert res["epoch_seconds"] == given and not (tmp_path / "b" / "calibration").exists()
    epochs = {c["variant"]: c["epochs"] for c in res["cells"]}
    assert epochs == {"full": 2, "random 70%": 2}  # 0.5 x 4 epochs x 10 s = 20 s: 2 of 10 s, 2 of 7 s
    assert {c["variant"]: c["planned_s"] for c in res["cells"]} == {"full": 20.0, "random 70%": 14.0}
    rows = {r["variant"]: r for r in res["summary"]}
    assert rows["random 70%"]["planned_ratio_mean"] == pytest.approx(14.0 / 40.0)
    with pytest.raises(ValueError, match="no 'full', the reference"):
        run_budget(_config(tmp_path / "c", dataset, variants=variants, budgets=(0.5,), epoch_seconds={"x": 1.0}))


def test_a_variant_the_given_epoch_seconds_lack_is_planned_by_its_ratio_to_the_reference(dataset: Path,
                                                                                         tmp_path: Path):
    out = tmp_path / "b"  # a part that adds "random 70%" to a run calibrated without it; full's cells are there
    res = run_budget(_config(out, dataset, variants=(BY_NAME["random 70%"],), budgets=(0.5,),
                             datasets=((0, dataset),), epoch_seconds={"full": 10.0}))
    median = {name: statistics.median(r["seconds"] for r in epoch_records(out / "calibration" / slug(name)))
              for name in ("full", "random 70%")}  # both calibrated here, in this run
    assert res["epoch_seconds"]["full"] == 10.0
    assert res["epoch_seconds"]["random 70%"] == pytest.approx(10.0 * median["random 70%"] / median["full"])
    assert res["reference"] == {"variant": "full", "epochs": 4, "seconds": 40.0}  # as in the run it adds to
    assert [c["variant"] for c in res["cells"]] == ["random 70%"]  # no cell of full trained again
    with pytest.raises(ValueError, match="first variant must be 'full'"):
        run_budget(_config(tmp_path / "c", dataset, variants=(BY_NAME["random 70%"],)))


def test_parts_planned_with_one_calibration_merge_into_one_run(dataset: Path, tmp_path: Path):
    variants = (BY_NAME["full"], BY_NAME["random 70%"])
    given = {"full": 10.0, "random 70%": 7.0}
    parts = []
    for seed in (0, 1):  # two processes, one seed each, as bench/experiments/budget.py --epoch-seconds-from splits
        out = tmp_path / f"part-{seed}"
        run_budget(_config(out, dataset, variants=variants, budgets=(0.5,), datasets=((seed, dataset),),
                           epoch_seconds=given))
        parts.append(out / "results.json")
    merged = write_merged(tmp_path / "merged", parts, ratio="planned")
    cells = {(c["variant"], c["seed"]): c["val_acc"] for c in merged["cells"]}
    assert len(cells) == 4 and merged["epoch_seconds"] == given
    row = next(r for r in merged["summary"] if r["variant"] == "random 70%")
    diffs = [cells["random 70%", s] - cells["full", s] for s in (0, 1)]
    assert row["seeds"] == 2 and row["paired"] == 2 and row["paired_wins"] == sum(d > 0 for d in diffs)
    assert row["paired_diff_mean"] == pytest.approx(sum(diffs) / 2)
    assert json.loads((tmp_path / "merged" / "results.json").read_text())["summary"] == merged["summary"]
    assert "wins " in (tmp_path / "merged" / "table.md").read_text()
    assert (tmp_path / "merged" / "budget.png").stat().st_size > 0
    write_merged(tmp_path / "merged", parts)  # a merge again replaces its own files

    with pytest.raises(ValueError, match="trained in two parts"):
        merge_results([json.loads(p.read_text()) for p in (parts[0], parts[0])])
    other = json.loads(parts[1].read_text()) | {"epoch_seconds": {"full": 10.0, "random 70%": 6.0}}
    with pytest.raises(ValueError, match="same --epoch-seconds-from"):
        merge_results([json.loads(parts[0].read_text()), other])
    with pytest.raises(RunFolderError, match="not write"):  # a user's file in --out is never replaced
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("mine")
        write_merged(tmp_path / "mine", parts)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
