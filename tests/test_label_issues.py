"""`curate score --folds K`: out-of-sample probabilities and cleanlab's label issues, and
`curate shard --drop-label-issues`."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

from cli import main
from curate.common.runtime import load_weights
from curate.ingest.sources import open_source
from curate.score.folds import assign_folds
from curate.score.job import ScoreConfig, fold_files, run_score
from curate.score.label_issues import find_issues
from curate.score.loader import DecodedItems
from curate.score.proxies import ProxyModel, create_model, resolve_recipe

from .conftest import ROOT
from .test_score_job import kill_when


def test_folds_are_stratified_seeded_and_independent_of_input_order():
    keys = [f"k{i:04d}" for i in range(103)]
    labels = [i % 3 if i < 90 else 3 for i in range(103)]  # a small class of 13
    folds = assign_folds(keys, labels, 5, seed=0)
    for label in set(labels):
        sizes = np.bincount(folds[np.array(labels) == label], minlength=5)
        assert sizes.max() - sizes.min() <= 1, (label, sizes)
    assert np.bincount(folds, minlength=5).max() - np.bincount(folds, minlength=5).min() <= 1
    order = np.random.default_rng(0).permutation(103)
    shuffled = assign_folds([keys[i] for i in order], [labels[i] for i in order], 5, seed=0)
    assert (shuffled == folds[order]).all(), "a fold is a function of the key, not of the input order"
    assert (assign_folds(keys, labels, 5, seed=1) != folds).any()
    with pytest.raises(ValueError, match=">= 2"):
        assign_folds(keys, labels, 1, seed=0)


def test_find_issues_flags_confidently_wrong_labels_and_ignores_empty_classes():
    rng = np.random.default_rng(0)
    true = np.repeat(np.arange(4), 50)
    probs = np.full((200, 4), 0.05) + rng.random((200, 4)) * 0.02
    probs[np.arange(200), true] = 0.85
    probs /= probs.sum(1, keepdims=True)
    given = true.copy()
    flipped = rng.choice(200, 20, replace=False)
    given[flipped] = (true[flipped] + 1 + rng.integers(0, 3, 20)) % 4
    found = find_issues(given, probs)
    assert set(np.flatnonzero(found.label_issue)) == set(flipped.tolist())
    assert (found.suggested_label == true).all()
    assert found.label_quality[flipped].max() < np.delete(found.label_quality, flipped).min()
    # a head with classes nobody is labelled with (a hub head on a smaller dataset): same answer
    wide = np.concatenate([probs * 0.5, np.full((200, 6), 0.5 / 6)], axis=1)
    again = find_issues(given, wide)
    assert (again.label_issue == found.label_issue).all()
    np.testing.assert_allclose(again.label_quality, found.label_quality, rtol=1e-5)


def _score(src: Path, out: Path, folds: int) -> pl.DataFrame:
    run_score(ScoreConfig(str(src), out, proxy="demo-cnn", train_epochs=1, folds=folds, workers=0,
                          chunk_size=32, progress=False))
    return pl.scan_parquet(out / "*.parquet").collect().sort("key")


@pytest.fixture(scope="module")
def k3(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """One 3-fold scoring of the small demo, and its table as first written (the folder itself
    is resumed with another label filter by the first test; the second needs only the table)."""
    out = tmp_path_factory.mktemp("k3") / "k3"
    return out, _score(small_demo / "train", out, folds=3)


@pytest.mark.slow
def test_folds_score_every_row_with_the_proxy_that_never_saw_it(small_demo: Path, k3: tuple[Path, pl.DataFrame],
                                                               tmp_path: Path):
    src, (out, df) = small_demo / "train", k3
    assert df.height == 96 and df["fold"].is_between(0, 2).all() and df["fold"].n_unique() == 3
    probs = np.stack(df["probs"].to_numpy())
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    for col in ("oos_loss", "oos_margin", "oos_el2n", "label_issue", "label_quality", "suggested_label"):
        assert df[col].null_count() == 0, col
    assert (df["suggested_label"].to_numpy() == probs.argmax(1)).all()
    np.testing.assert_allclose(df["oos_loss"].to_numpy(), -np.log(probs[np.arange(96), df["label"].to_numpy()]),
                               rtol=1e-4)

    items = open_source(str(src), None, (), 100_000)
    recipe = resolve_recipe("demo-cnn")
    images = DecodedItems(items, recipe.img_size)
    row_of = {k: i for i, k in enumerate(df["key"].to_list())}
    for f in range(3):
        # the fold's proxy trained on exactly the other folds' items...
        state = load_weights(out / fold_files(f)[1])
        assert state["correct"].shape[1] == int((df["fold"] != f).sum())
        # ...and its forward on a held-out image is that row's stored probabilities
        model = create_model(recipe, 4)
        model.load_state_dict(load_weights(out / fold_files(f)[0]))
        proxy = ProxyModel(model, "none")
        i = next(i for i, it in enumerate(items) if df["fold"][row_of[it.key]] == f)
        got = proxy.score_batch(images[i][1][None]).logits.float().softmax(-1)[0].numpy()
        np.testing.assert_allclose(got, probs[row_of[items[i].key]], atol=1e-5)

    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["held_out"] for p in manifest["proxy"]["folds"]["per_fold"]] == np.bincount(df["fold"]).tolist()
    assert manifest["proxy"]["label_issues"]["label_issues"] == int(df["label_issue"].sum())

    # another cleanlab filter on resume: only the label pass runs again
    again = run_score(ScoreConfig(str(src), out, proxy="demo-cnn", train_epochs=1, folds=3, workers=0, chunk_size=32,
                                  progress=False, resume=True, label_filter="prune_by_class"))
    assert again.parts_written == 0 and again.manifest["proxy"]["label_issues"]["filter_by"] == "prune_by_class"
    redone = pl.scan_parquet(out / "*.parquet").collect().sort("key")
    from cleanlab.filter import find_label_issues
    expected = find_label_issues(redone["label"].to_numpy(), probs, filter_by="prune_by_class")
    assert redone["label_issue"].to_list() == expected.tolist()
    assert redone.drop("label_issue").equals(df.drop("label_issue"))

    one = _score(src, tmp_path / "k1", folds=1)  # K = 1: the proxy's own probabilities, in sample
    assert one["fold"].null_count() == 96 and one["oos_loss"].null_count() == 96
    assert one["label_issue"].null_count() == 0
    np.testing.assert_allclose(np.stack(one["probs"].to_numpy()).max(1), one["confidence"].to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_a_run_killed_between_folds_resumes_to_the_clean_table(small_demo: Path, k3: tuple[Path, pl.DataFrame],
                                                               tmp_path: Path):
    src, clean = small_demo / "train", k3[1]  # the uninterrupted run's table
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "cli.py"), "score", str(src), "--out", str(killed), "--proxy", "demo-cnn",
           "--train-epochs", "1", "--folds", "3", "--workers", "0", "--chunk-size", "32", "--quiet"]
    kill_when(cmd, (killed / "proxy", "fold-1/train-state.pt"))  # fold 0 done, fold 1 trained, fold 2 not
    assert not (killed / fold_files(2)[1]).exists()
    subprocess.run([*cmd, "--resume"], cwd=ROOT, check=True, capture_output=True)
    again = pl.scan_parquet(killed / "*.parquet").collect().sort("key")
    assert again["key"].to_list() == clean["key"].to_list()
    for col in ("oos_loss", "label_quality", "loss"):
        np.testing.assert_allclose(again[col].to_numpy(), clean[col].to_numpy(), atol=1e-6, err_msg=col)
    assert again["label_issue"].to_list() == clean["label_issue"].to_list()


def test_the_cli_offers_every_filter_and_nothing_else():
    from cli import score
    from curate.score.label_issues import FILTERS

    option = next(o for o in score.params if o.name == "label_filter")
    assert tuple(option.type.choices) == FILTERS and option.default == FILTERS[0]


def test_folds_need_a_proxy_trained_here(small_demo: Path, tmp_path: Path):
    res = CliRunner().invoke(main, ["score", str(small_demo / "train"), "--out", str(tmp_path / "o"),
                                    "--pretrained", "--folds", "5"])
    assert res.exit_code != 0 and "--train-epochs" in res.output and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_shard_drops_label_issues_with_their_reason(small_demo: Path, tmp_path: Path):
    scores = tmp_path / "scores"
    df = _score(small_demo / "train", scores, folds=2)
    res = CliRunner().invoke(main, ["shard", str(small_demo / "train"), "--scores", str(scores), "--out",
                                    str(tmp_path / "shards"), "--keep", "1.0", "--drop-label-issues", "--no-dedup",
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    sel = pl.read_parquet(tmp_path / "shards" / "selection.parquet").sort("key")
    flagged = set(df.filter("label_issue")["key"])
    assert flagged and set(sel.filter(pl.col("reason") == "label_issue")["key"]) == flagged
    assert set(sel.filter("kept")["key"]) == set(df["key"]) - flagged
    assert sel["source"].to_list() == df["source"].to_list(), "selection.parquet names every image's file"
    assert f"label_issue {len(flagged)}" in res.output


@pytest.mark.slow
def test_relabel_ships_the_suggested_class_and_keeps_the_given_one_on_record(small_demo: Path, tmp_path: Path):
    import webdataset as wds

    scores = tmp_path / "scores"
    df = _score(small_demo / "train", scores, folds=2)
    flagged = df.filter("label_issue").with_columns(p=pl.col("probs").arr.max())
    threshold = float(flagged["p"].median())
    confident = set(flagged.filter(pl.col("p") >= threshold)["key"])
    assert 0 < len(confident) < flagged.height
    out = tmp_path / "shards"
    res = CliRunner().invoke(main, ["shard", str(small_demo / "train"), "--scores", str(scores), "--out", str(out),
                                    "--keep", "1.0", "--drop-label-issues", "--relabel", str(threshold), "--no-dedup",
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    sel = pl.read_parquet(out / "selection.parquet")
    moved = sel.filter(pl.col("relabelled_from").is_not_null())
    assert set(moved["key"]) == confident and moved["kept"].all()
    assert set(sel.filter(pl.col("reason") == "label_issue")["key"]) == set(flagged["key"]) - confident
    truth = df.select("key", "label", "suggested_label", "class_name")
    names = dict(truth.select("label", "class_name").unique().iter_rows())
    check = moved.join(truth, on="key", suffix="_given")
    assert (check["label"] == check["suggested_label"]).all()
    assert (check["relabelled_from"] == check["label_given"]).all()
    assert all(names[l] == n for l, n in zip(check["label"], check["class_name"]))
    shipped = {s["__key__"]: (int(s["cls"]), json.loads(s["json"]))
               for s in wds.WebDataset(sorted(str(p) for p in out.glob("train-*.tar")), shardshuffle=False)}
    for key, label, given in moved.select("key", "label", "relabelled_from").iter_rows():
        assert shipped[key][0] == label and shipped[key][1]["relabelled_from"] == given
    assert all("relabelled_from" not in meta for k, (_, meta) in shipped.items() if k not in confident)
