"""Selection policies on small synthetic scores tables written with the real table writer."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from curate.select.policies import (
    POLICIES,
    SelectConfig,
    load_scores,
    select,
    selection_hash,
)
from curate.score.table import BASE_FIELDS, part_path, schema, write_part

DIM = 4


def make_row(key: str, label: int = 0, status: str = "ok", **scores: Any) -> dict[str, Any]:
    """One scores-table row: every BASE_FIELD filled (None where null), scores as given."""
    ok = status == "ok"
    row: dict[str, Any] = {f.name: None for f in BASE_FIELDS}
    row.update(
        key=key, source=f"/data/c{label}/{key}.jpg", label=label, class_name=f"class{label}",
        status=status, error=None if ok else "cannot identify image file",
        width=32 if ok else None, height=32 if ok else None, num_bytes=1000,
        content_hash="0" * 32, embedding=[1.0] + [0.0] * (DIM - 1) if ok else None,
        thumbnail=[0] * 192 if ok else None,
    )
    row.update(scores if ok else {})  # proxy outputs are null on error rows
    return row


def write_table(directory: Path, rows: list[dict[str, Any]], parts: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    table_schema = schema(DIM, 2)
    for i, chunk in enumerate(np.array_split(np.arange(len(rows)), parts)):
        cols = {name: [rows[j].get(name) for j in chunk] for name in table_schema.names}
        write_part(part_path(directory, i), cols, table_schema)
    return directory


def random_rows(n: int, classes: int, seed: int = 0, errors: int = 3) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = [
        make_row(f"k{i:05d}", int(rng.integers(classes)), el2n=float(rng.random()),
                 loss=float(rng.random() * 5), margin=float(rng.random() * 2 - 1))
        for i in range(n)
    ]
    rows += [make_row(f"e{i:03d}", i % classes, status="error") for i in range(errors)]
    return rows


def kept_keys(sel: pl.DataFrame) -> set[str]:
    return set(sel.filter("kept")["key"])


@pytest.fixture()
def small(tmp_path: Path) -> pl.LazyFrame:
    """6 ok rows with distinct el2n plus 2 error rows."""
    el2n = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.7, "e": 0.3, "f": 0.2}
    rows = [make_row(k, el2n=v) for k, v in el2n.items()]
    rows += [make_row("x", status="error"), make_row("y", status="error")]
    return load_scores([write_table(tmp_path / "s", rows, parts=2)])


def test_config_validation() -> None:
    for bad in (0.0, 1.5, -1, 0, True, "half"):
        with pytest.raises((ValueError, TypeError)):
            SelectConfig(keep=bad)
    with pytest.raises(ValueError, match="unknown policy"):
        SelectConfig(keep=0.5, policy="nope")
    with pytest.raises(ValueError, match="beta"):
        SelectConfig(keep=0.5, beta=1.0)
    with pytest.raises(ValueError, match="by"):
        SelectConfig(keep=0.5, by=())
    listed = SelectConfig(keep=0.5, by=["el2n", "loss"])  # type: ignore[arg-type]
    assert listed.by == ("el2n", "loss")
    assert set(POLICIES) >= {"hard", "easy", "ccs", "random"}


def test_hard_and_easy_exact_sets(small: pl.LazyFrame) -> None:
    hard = select(small, SelectConfig(keep=0.5, policy="hard"))
    easy = select(small, SelectConfig(keep=3, policy="easy"))
    assert kept_keys(hard) == {"a", "d", "c"}
    assert kept_keys(easy) == {"b", "f", "e"}
    assert hard.columns == ["key", "source", "label", "class_name", "kept", "reason", "score", "relabelled_from",
                            "dup_label_conflict"]
    assert hard.schema["score"] == pl.Float64 and hard.schema["kept"] == pl.Boolean
    errors = hard.filter(pl.col("key").is_in(["x", "y"]))
    assert errors["reason"].to_list() == ["error", "error"] and not errors["kept"].any()
    assert errors["score"].null_count() == 2
    assert hard["key"].to_list() == sorted("abcdefxy")


@pytest.mark.parametrize("policy", ["hard", "easy", "ccs", "random"])
@pytest.mark.parametrize("balanced", [False, True])
def test_counts_add_up(tmp_path: Path, policy: str, balanced: bool) -> None:
    rows = random_rows(300, classes=4)
    scores = load_scores([write_table(tmp_path / "s", rows, parts=3)])
    sel = select(scores, SelectConfig(keep=0.3, policy=policy, class_balanced=balanced))
    assert sel.height == len(rows) and sel["key"].n_unique() == len(rows)
    assert set(sel["key"]) == {r["key"] for r in rows}
    reasons = Counter(sel["reason"].to_list())
    assert reasons["error"] == 3
    assert reasons["kept"] == 90  # 30% of the 300 ok rows: errors are not in the denominator
    assert reasons["kept"] + reasons["pruned"] + reasons["error"] == len(rows)


def test_random_is_seeded_and_order_free(tmp_path: Path) -> None:
    rows = random_rows(200, classes=3)
    scores = load_scores([write_table(tmp_path / "s", rows)])
    shuffled = load_scores([write_table(tmp_path / "t", rows[::-1], parts=4)])
    pick = lambda s, seed: kept_keys(select(s, SelectConfig(keep=50, policy="random", seed=seed)))
    assert pick(scores, 1) == pick(scores, 1) == pick(shuffled, 1)
    assert pick(scores, 1) != pick(scores, 2)
    assert len(pick(scores, 1)) == 50


def test_class_balanced_fraction(tmp_path: Path) -> None:
    sizes = {0: 10, 1: 25, 2: 40, 3: 7}
    rows = [make_row(f"c{c}_{i:02d}", c, el2n=float(i)) for c, n in sizes.items() for i in range(n)]
    scores = load_scores([write_table(tmp_path / "s", rows)])
    sel = select(scores, SelectConfig(policy="hard", keep=0.3, class_balanced=True))
    per_class = Counter(sel.filter("kept")["label"].to_list())
    for c, n in sizes.items():
        assert abs(per_class[c] - round(0.3 * n)) <= 1
    assert sum(per_class.values()) == round(0.3 * sum(sizes.values()))


def test_class_balanced_count_caps_and_redistributes(tmp_path: Path) -> None:
    sizes = {0: 2, 1: 30, 2: 30}
    rows = [make_row(f"c{c}_{i:02d}", c, el2n=float(i)) for c, n in sizes.items() for i in range(n)]
    scores = load_scores([write_table(tmp_path / "s", rows)])
    sel = select(scores, SelectConfig(policy="hard", keep=21, class_balanced=True))
    per_class = Counter(sel.filter("kept")["label"].to_list())
    assert per_class[0] == 2 and sorted([per_class[1], per_class[2]]) == [9, 10]


def test_min_per_class(tmp_path: Path) -> None:
    # class 1 is all easy: plain "hard" keeps none of it
    rows = [make_row(f"a{i}", 0, el2n=1.0 + i) for i in range(10)]
    rows += [make_row(f"b{i}", 1, el2n=0.1 * i) for i in range(5)]
    rows += [make_row("c0", 2, el2n=0.0)]
    scores = load_scores([write_table(tmp_path / "s", rows)])
    plain = select(scores, SelectConfig(policy="hard", keep=4))
    assert kept_keys(plain) == {"a9", "a8", "a7", "a6"}
    sel = select(scores, SelectConfig(policy="hard", keep=4, min_per_class=2))
    extra = sel.filter(pl.col("reason") == "min_per_class")
    assert set(extra["key"]) == {"b4", "b3", "c0"}  # the hardest of class 1; class 2 has one
    assert kept_keys(sel) == kept_keys(plain) | set(extra["key"])


def test_ccs_drops_hardest_and_covers_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    el2n = rng.exponential(1.0, 2000).astype(np.float32)  # skewed: most rows are easy
    rows = [make_row(f"k{i:05d}", 0, el2n=float(v)) for i, v in enumerate(el2n)]
    scores = load_scores([write_table(tmp_path / "s", rows)])
    sel = select(scores, SelectConfig(keep=0.3, policy="ccs", beta=0.1, strata=10))
    kept = sel.filter("kept")["score"].to_numpy()
    cut = np.sort(el2n)[-200]  # the 200 = 10% hardest are dropped
    rest = np.sort(el2n)[:-200]
    assert len(kept) == 600 and kept.max() < cut
    assert kept.min() <= np.quantile(rest, 0.1) and kept.max() == rest.max()
    # every stratum of the remaining range is represented: sparse ones in full, others evenly
    edges = np.linspace(rest.min(), rest.max(), 11)
    have = np.histogram(rest, edges)[0]
    took = np.histogram(kept, edges)[0]
    level = took[took < have].min()
    assert np.all((took == have) | (took >= level)) and np.all(took[have > level] <= level + 1)
    assert took[have > 0].min() > 0


def test_rank_average_hand_computed(tmp_path: Path) -> None:
    # el2n ranks / 3: a 0, b 1, c 2/3, d 1/3;  loss: a 0, b 2/3, c 1, d 1/3
    rows = [
        make_row("a", el2n=0.1, loss=1.0, margin=-0.9),
        make_row("b", el2n=0.4, loss=3.0, margin=0.0),
        make_row("c", el2n=0.3, loss=4.0, margin=0.9),
        make_row("d", el2n=0.2, loss=2.0, margin=0.5),
        make_row("z", status="error"),
    ]
    scores = load_scores([write_table(tmp_path / "s", rows)])
    sel = select(scores, SelectConfig(policy="hard", keep=2, by=("el2n", "loss")))
    got = dict(zip(sel["key"], sel["score"]))
    assert got["z"] is None
    assert got["a"] == pytest.approx(0.0) and got["d"] == pytest.approx(1 / 3)
    assert got["b"] == pytest.approx(5 / 6) and got["c"] == pytest.approx(5 / 6)
    assert kept_keys(sel) == {"b", "c"}
    # margin: higher = easier, so its hardness ranks are a 1, b 2/3, c 0, d 1/3
    # (unoriented ranks would average to a 0, b 2/3, c 5/6, d 1/2 and keep c)
    mixed = select(scores, SelectConfig(policy="hard", keep=1, by=("el2n", "margin")))
    got = dict(zip(mixed["key"], mixed["score"]))
    assert [got[k] for k in "abcd"] == pytest.approx([1 / 2, 5 / 6, 1 / 3, 1 / 3])
    assert kept_keys(mixed) == {"b"}
    tied = select(scores, SelectConfig(policy="hard", keep=1, by=("el2n", "loss")))
    assert kept_keys(tied) == {"b"}  # b and c tie at 5/6: broken by key


def test_two_tables_joined(tmp_path: Path) -> None:
    keys = ["a", "b", "c", "d"]
    t0 = [make_row(k, el2n=v, loss=1.0) for k, v in zip(keys, [0.1, 0.2, 0.3, 0.4])]
    t1 = [make_row(k, el2n=v, loss=2.0) for k, v in zip(keys[:3], [0.9, 0.8, 0.7])]
    t1.append(make_row("d", status="error"))
    d0, d1 = write_table(tmp_path / "p0", t0), write_table(tmp_path / "p1", t1, parts=2)
    scores = load_scores([d0, d1], by=("el2n",)).collect()
    assert {"el2n_0", "el2n_1", "loss_0", "loss_1", "el2n"} <= set(scores.columns)
    scores = scores.sort("key")
    assert scores["status"].to_list() == ["ok", "ok", "ok", "error"]
    assert scores["error"][3] == "cannot identify image file"
    # per-table ranks over that table's ok rows: t0 a0 b1/3 c2/3 (d1), t1 a1 b1/2 c0
    assert scores["el2n"].to_list()[:3] == pytest.approx([0.5, 5 / 12, 1 / 3])
    sel = select(load_scores([d0, d1]), SelectConfig(policy="hard", keep=1))
    assert kept_keys(sel) == {"a"} and sel.filter(pl.col("key") == "d")["reason"][0] == "error"


def test_tables_with_different_keys_refused(tmp_path: Path) -> None:
    d0 = write_table(tmp_path / "p0", [make_row(k, el2n=0.1) for k in "abc"])
    d1 = write_table(tmp_path / "p1", [make_row(k, el2n=0.1) for k in "abd"])
    with pytest.raises(ValueError, match="different key sets"):
        load_scores([d0, d1])


def test_dedup_with_extra(small: pl.LazyFrame) -> None:
    extra = pl.DataFrame({
        "key": list("abcdef"),
        "dup_group": [0, 0, -1, -1, -1, -1],
        "dup_keep": [True, False, True, True, True, True],
    })
    sel = select(small, SelectConfig(keep=0.6, policy="easy", dedup=True), extra=extra)
    assert sel.filter(pl.col("key") == "b")["reason"][0] == "duplicate"
    assert kept_keys(sel) == {"f", "e", "c"}  # 60% of the 5 non-duplicates
    with pytest.raises(ValueError, match="dup_keep"):
        select(small, SelectConfig(policy="hard", keep=0.5, dedup=True))
    nulls = extra.with_columns(dup_keep=pl.lit(None, pl.Boolean))
    with pytest.raises(ValueError, match="dup_keep"):
        select(small, SelectConfig(policy="hard", keep=0.5, dedup=True), extra=nulls)


def test_null_score_refused(tmp_path: Path) -> None:
    scores = load_scores([write_table(tmp_path / "s", [make_row("a", el2n=0.1), make_row("b")])])
    with pytest.raises(ValueError, match="null"):
        select(scores, SelectConfig(policy="hard", keep=1))
    with pytest.raises(ValueError, match="lack column"):
        select(scores, SelectConfig(policy="hard", keep=1, by=("nope",)))


def test_selection_hash(small: pl.LazyFrame) -> None:
    sel = select(small, SelectConfig(policy="hard", keep=0.5))
    assert selection_hash(sel) == selection_hash(sel.reverse())
    other = select(small, SelectConfig(keep=0.5, policy="easy"))
    assert selection_hash(sel) != selection_hash(other)
    assert len(selection_hash(sel)) == 64
