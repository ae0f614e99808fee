"""Proxies weighed by what they learned (curate/select/weighing.py) and what `curate shard` does
with the weights: a near-chance proxy is left out, the rest vote by skill, label issues and maps
come from the most accurate proxy, and the output and manifest.json say so."""
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from cli import main
from curate.score.job import ScoreConfig, run_score
from curate.select.weighing import MIN_SKILL, held_out_accuracy, lead, maps_order, weigh


def manifest(accuracy: float | None, classes: int = 10, folds: int = 5, name: str = "p") -> dict:
    """The parts of a `curate score` manifest that weighing reads."""
    return {"config": {"folds": folds}, "counts": {"classes": classes},
            "proxy": {"name": name, "label_issues": {"agreement": accuracy} if accuracy is not None else None}}


def test_held_out_accuracy_only_out_of_sample():
    assert held_out_accuracy(manifest(0.7)) == 0.7
    assert held_out_accuracy(manifest(0.99, folds=1)) is None, "in sample: how well it memorised, not skill"
    probe = manifest(0.6, folds=1)
    probe["proxy"]["probe"] = {"held_out_accuracy": 0.6}
    assert held_out_accuracy(probe) == 0.6


def test_skill_weights_and_leaving_out():
    dirs = [Path("a"), Path("b"), Path("c")]
    w = weigh(dirs, [manifest(0.82), manifest(0.55), manifest(0.12)])
    assert [round(x.skill, 4) for x in w] == [0.8, 0.5, round(0.02 / 0.9, 4)]
    assert w[2].weight == 0 and "left out" in w[2].why
    assert w[0].weight == pytest.approx(0.8 / 1.3) and w[1].weight == pytest.approx(0.5 / 1.3)
    assert lead(w) == 0 and maps_order(w) == [0, 1, 2]


def test_no_record_means_equal_votes_and_mixed_means_only_the_recorded_vote():
    equal = weigh([Path("a"), Path("b")], [manifest(None, folds=1), manifest(None, folds=1)])
    assert [x.weight for x in equal] == [0.5, 0.5] and lead(equal) == 0
    mixed = weigh([Path("a"), Path("b")], [manifest(None, folds=1), manifest(0.5)])
    assert [x.weight for x in mixed] == [0.0, 1.0] and lead(mixed) == 1
    assert "no held-out accuracy" in mixed[0].why


def test_near_chance_everywhere_is_an_error_but_a_lone_table_decides():
    with pytest.raises(ValueError, match="near chance"):
        weigh([Path("a"), Path("b")], [manifest(0.11), manifest(0.13)])
    (alone,) = weigh([Path("a")], [manifest(0.11)])
    assert alone.weight == 1.0 and alone.skill < MIN_SKILL and "near chance" in alone.why


@pytest.fixture(scope="module")
def tables(small_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real 2-fold tables over the small demo (a CNN with CAM maps, a ViT with CLS maps), a
    copy of the ViT's recording the held-out accuracy of a near-chance proxy, and one recording a
    better one than the CNN's (the copies' scores are the ViT's: only the record differs)."""
    root = tmp_path_factory.mktemp("weighing")
    out = {"cnn": root / "cnn", "vit": root / "vit"}
    for name, proxy in (("cnn", "demo-cnn"), ("vit", "demo-vit")):
        run_score(ScoreConfig(str(small_demo / "train"), out[name], proxy=proxy, train_epochs=1, folds=2, workers=0,
                              progress=False))
    for name, agreement in (("weak", 0.26), ("best", 0.99)):  # 4 classes: chance is 0.25
        out[name] = root / name
        shutil.copytree(out["vit"], out[name])
        m = json.loads((out[name] / "manifest.json").read_text())
        m["proxy"]["label_issues"]["agreement"] = agreement
        (out[name] / "manifest.json").write_text(json.dumps(m))
    return out


def shard(small_demo: Path, out: Path, *scores: Path, extra: tuple[str, ...] = ()) -> tuple[pl.DataFrame, dict, str]:
    args = ["shard", str(small_demo / "train"), *[a for s in scores for a in ("--scores", str(s))], "--out", str(out),
            "--keep", "0.5", "--by", "el2n", "--by", "margin", "--quiet", *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return pl.read_parquet(out / "selection.parquet"), json.loads((out / "manifest.json").read_text()), res.output


@pytest.mark.slow
def test_a_near_chance_proxy_is_left_out_and_changes_nothing(small_demo: Path, tables: dict[str, Path],
                                                              tmp_path: Path):
    alone, _, _ = shard(small_demo, tmp_path / "alone", tables["cnn"])
    both, m, output = shard(small_demo, tmp_path / "both", tables["cnn"], tables["weak"])
    assert both["kept"].to_list() == alone["kept"].to_list()
    assert both["score"].to_list() == alone["score"].to_list(), "one voting table: its own score, not ranks"
    assert f"proxy 1 ({tables['weak']}, demo-vit): held-out accuracy 26.0% (chance 25.0%)" in output
    assert "near chance, left out" in output
    proxies = m["weighing"]["proxies"]
    assert [p["weight"] for p in proxies] == [1.0, 0.0]
    assert m["weighing"]["label_issues_from"] == str(tables["cnn"])
    assert m["weighing"]["maps_from"] == str(tables["cnn"]), "the CNN's CAM maps: the near-chance ViT's are noise"


def rank01(x: np.ndarray) -> np.ndarray:
    return (pl.Series(x).rank("average").to_numpy() - 1) / (len(x) - 1)


@pytest.mark.slow
def test_two_proxies_vote_by_skill(small_demo: Path, tables: dict[str, Path], tmp_path: Path):
    sel, m, output = shard(small_demo, tmp_path / "s", tables["cnn"], tables["best"])
    w = [p["weight"] for p in m["weighing"]["proxies"]]
    assert w[1] > w[0] > 0 and sum(w) == pytest.approx(1.0)
    assert m["weighing"]["label_issues_from"] == m["weighing"]["maps_from"] == str(tables["best"])
    assert any(line.startswith(f"proxy 1 ({tables['best']}") and line.endswith("label issues and embeddings and "
                                                                                 "maps from here")
               for line in output.splitlines())
    # the combined hardness, recomputed from the two tables: per column the skill-weighted mean of ranks
    t = [pl.read_parquet(d / "part-*.parquet").sort("key") for d in (tables["cnn"], tables["best"])]
    el2n = sum(wi * rank01(ti["el2n"].to_numpy()) for wi, ti in zip(w, t))
    margin = sum(wi * rank01(ti["margin"].to_numpy()) for wi, ti in zip(w, t))
    expected = (rank01(el2n) + rank01(-margin)) / 2  # then as for one table: margin's hardness is reversed
    got = sel.sort("key")["score"].to_numpy()
    assert np.allclose(got, expected, atol=1e-9)


@pytest.mark.slow
def test_maps_from_overrides_the_choice(small_demo: Path, tables: dict[str, Path], tmp_path: Path):
    _, m, _ = shard(small_demo, tmp_path / "s", tables["cnn"], tables["best"], extra=("--maps-from", "0"))
    assert m["weighing"]["maps_from"] == str(tables["cnn"])
    res = CliRunner().invoke(main, ["shard", str(small_demo / "train"), "--scores", str(tables["cnn"]),
                                    "--out", str(tmp_path / "bad"), "--maps-from", "3", "--quiet"])
    assert res.exit_code != 0 and "--maps-from is an index" in res.output
