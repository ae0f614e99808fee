"""Selection: which keys of a scores table to keep, and why every other key was dropped.

A policy only orders the candidate rows: it returns a priority per row (lower = kept first).
The budget, class quotas and class minimum are then applied the same way for every policy,
so adding a policy is one decorated function. Ties are broken by key everywhere, so a
selection is a pure function of (table, config): same inputs, same `selection_hash`.

`score` is always a hardness (larger = harder): columns where larger means easier
(margin, confidence) are negated, so "hard" keeps hard examples whatever `by` names and
rank-averaging el2n with margin does not cancel out.
"""
from __future__ import annotations

import difflib

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl

from curate.common.hashing import unit_hash
from curate.common.registry import Registry
from curate.score.table import scan as scan_scores

# Columns describing the input itself: the same in every proxy's table over the same keys.
IDENTITY_COLUMNS = frozenset(
    {"key", "source", "label", "class_name", "status", "error", "width", "height",
     "num_bytes", "content_hash"}
)
# Score columns where a larger value means an EASIER example: the one table of score directions
# (negated into a hardness here; the demo negates them before its "label was flipped" AUC).
HIGHER_IS_EASIER = frozenset({"margin", "margin_mean", "confidence"})
# cleanlab's columns; with several tables they come from the lead one (curate/select/weighing.py).
LABEL_COLUMNS = ("label_issue", "label_quality", "suggested_label", "probs")
OUTPUT_COLUMNS = ["key", "source", "label", "class_name", "kept", "reason", "score", "relabelled_from",
                  "dup_label_conflict"]


@dataclass(frozen=True)
class SelectConfig:
    """Which keys to keep. The defaults are `curate shard`'s (tests/test_cli.py checks the CLI's against
    them): "clean", every candidate that is not a label issue (with ShardConfig's default dedup, nor a
    near-duplicate), the recipe the equal-budget benchmark found ahead of full data at every budget at
    20% label noise and level or ahead at 0% (docs/benchmarks.md, "The value where users prune"). With
    keep < 1 the policy ranks what is left by `by`."""

    keep: float | int = 1.0  # float in (0, 1]: fraction of the candidates; int >= 1: absolute count
    by: tuple[str, ...] = ("el2n",)  # score column(s); several are rank-averaged
    policy: str = "ccs"  # name in POLICIES: hard | easy | ccs | random
    beta: float = 0.1  # ccs: fraction of the hardest candidates dropped before stratifying
    strata: int = 50  # ccs: number of equal-width score bins
    class_balanced: bool = False  # apply the budget per class (label) instead of globally
    min_per_class: int = 0  # every class keeps at least this many candidates (if it has them)
    dedup: bool = False  # drop near-duplicates (needs dup_keep from embedding_columns)
    # drop rows cleanlab flagged (`label_issue`) before the policy. None (the default): decided by run_shard from
    # the lead table (curate/select/advice.py: dropped unless its proxy is near chance); select() alone keeps them
    drop_label_issues: bool | None = None
    # Flagged rows whose suggested class has at least this probability get that class as their
    # label (and stay candidates) instead of being dropped; None: no relabelling.
    relabel_min_prob: float | None = None
    seed: int = 0  # random policy, and the within-stratum order of ccs

    def __post_init__(self) -> None:
        _check_keep(self.keep)
        object.__setattr__(self, "by", tuple(self.by))  # accept a list (click's `multiple`)
        if not self.by or not all(isinstance(c, str) and c for c in self.by):
            raise ValueError(f"by must name at least one score column, got {self.by!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {sorted(POLICIES)}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if self.relabel_min_prob is not None and not 0.0 < self.relabel_min_prob <= 1.0:
            raise ValueError(f"relabel_min_prob is a probability in (0, 1], got {self.relabel_min_prob}")
        if self.strata < 1 or self.min_per_class < 0:
            raise ValueError(f"need strata >= 1 and min_per_class >= 0, got {self.strata}, "
                             f"{self.min_per_class}")


def _check_keep(keep: float | int) -> None:
    # bool is an int: keep=True would silently mean "one row"
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be a float fraction or an int count, got {keep!r}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"keep as a fraction must be in (0, 1], got {keep} "
                         "(use an int for a count)")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"keep as a count must be >= 1, got {keep}")


# ---------------------------------------------------------------------------------------------
# Policies: (candidates with key, label, score; config) -> priority per row, lower = kept first.

Policy = Callable[[pl.DataFrame, SelectConfig], pl.Series]
POLICIES: Registry[Policy] = Registry("selection policy")
register_policy = POLICIES.register


@register_policy("hard")
def hard(cands: pl.DataFrame, cfg: SelectConfig) -> pl.Series:
    """Keep the highest scores (hardest): EL2N (Paul 2021); Sorscher 2022 when data is ample."""
    return -cands["score"]


@register_policy("easy")
def easy(cands: pl.DataFrame, cfg: SelectConfig) -> pl.Series:
    """Keep the lowest scores (easiest): better when the kept set is small (Sorscher 2022)."""
    return cands["score"]


@register_policy("random")
def random_baseline(cands: pl.DataFrame, cfg: SelectConfig) -> pl.Series:
    """Seeded uniform baseline; a hash of (seed, key), so row order does not matter."""
    return pl.Series(unit_hash(cands["key"].to_list(), cfg.seed))


@register_policy("ccs")
def ccs(cands: pl.DataFrame, cfg: SelectConfig) -> pl.Series:
    """Coverage-centric selection (Zheng et al. ICLR 2023), per class when class_balanced."""
    score = cands["score"].to_numpy()
    key_rank = cands["key"].rank("ordinal").to_numpy()
    u = unit_hash(cands["key"].to_list(), cfg.seed)
    groups = cands["label"].to_numpy() if cfg.class_balanced else np.zeros(len(cands), np.int64)
    priority = np.empty(len(cands), dtype=np.float64)
    for rows in _group_rows(groups):
        priority[rows] = _ccs_priority(score[rows], key_rank[rows], u[rows], cfg.beta, cfg.strata)
    return pl.Series(priority)


def _group_rows(groups: np.ndarray) -> list[np.ndarray]:
    """Row indices of each distinct group (one sort, not a scan per group)."""
    order = np.argsort(groups, kind="stable")
    cuts = np.flatnonzero(np.diff(groups[order])) + 1
    return np.split(order, cuts)


def _ccs_priority(
    score: np.ndarray, key_rank: np.ndarray, u: np.ndarray, beta: float, strata: int
) -> np.ndarray:
    """CCS as a priority, so that taking the first B rows IS the CCS subset of size B.

    The hardest round(beta*n) rows go last. The rest fall in `strata` equal-width bins; a
    row's priority is its position in its bin (random order) + u. Taking the first B then
    takes min(bin size, level) from every bin: the even split in which small bins are filled
    first and their unused share spread over the others; rows at the last level go to bins
    in random order. If B exceeds the non-dropped rows, the least hard dropped rows follow.
    """
    n = len(score)
    by_hardness = np.lexsort((key_rank, score))  # easiest first, ties by key
    n_drop = _round(beta * n)
    rest, dropped = by_hardness[: n - n_drop], by_hardness[n - n_drop :]
    priority = np.empty(n, dtype=np.float64)
    priority[rest] = _stratum_position(score[rest], u[rest], strata) + u[rest]
    priority[dropped] = n + np.arange(n_drop)  # positions + u are < n, so these come after
    return priority


def _stratum_position(score: np.ndarray, u: np.ndarray, strata: int) -> np.ndarray:
    """0-based position of each row inside its equal-width score bin, rows ordered by u."""
    if len(score) == 0:
        return np.empty(0, dtype=np.float64)
    lo, hi = float(score.min()), float(score.max())
    width = (hi - lo) / strata
    bins = np.zeros(len(score), np.int64) if width == 0 else np.minimum(
        ((score - lo) / width).astype(np.int64), strata - 1)  # the max lands in the last bin
    order = np.lexsort((u, bins))
    first = np.searchsorted(bins[order], bins[order], side="left")  # start of each row's bin
    position = np.empty(len(score), dtype=np.float64)
    position[order] = np.arange(len(score)) - first
    return position


# ---------------------------------------------------------------------------------------------
# Budgets


def _round(x: float) -> int:
    """Round half up (Python's round() is half-to-even, surprising for counts)."""
    return math.floor(x + 0.5)


def _budget(keep: float | int, n: int) -> int:
    """Rows to keep out of n candidates; a count larger than n keeps all."""
    return min(n, _round(keep * n) if isinstance(keep, float) else keep)


def _largest_remainder(sizes: np.ndarray, frac: float) -> np.ndarray:
    """Per-class quotas, each floor or ceil of frac*size, summing exactly to round(frac*total)."""
    exact = frac * sizes
    quota = np.floor(exact + 1e-9).astype(np.int64)  # 1e-9: 0.3*10 must floor to 3, not 2
    short = _round(frac * sizes.sum()) - quota.sum()
    order = np.argsort(-(exact - quota), kind="stable")  # largest remainder first, then label
    quota[order[:short]] += 1
    return quota


def _water_fill(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Split budget evenly over classes; small classes take all they have, the rest share the
    leftover (the largest class gets the last few rows of integer rounding)."""
    quota = np.zeros(len(sizes), dtype=np.int64)
    left = min(budget, int(sizes.sum()))
    for i, c in enumerate(np.argsort(sizes, kind="stable")):
        quota[c] = min(int(sizes[c]), left // (len(sizes) - i))
        left -= quota[c]
    return quota


def _in_budget(ordered: pl.DataFrame, cfg: SelectConfig) -> pl.Expr:
    """Kept-by-policy flag for rows sorted by priority (with `pos` and per-class `class_pos`)."""
    if not cfg.class_balanced:
        return pl.col("pos") < _budget(cfg.keep, ordered.height)
    sizes = ordered.group_by("label").len().sort("label")
    counts = sizes["len"].to_numpy().astype(np.int64)
    if isinstance(cfg.keep, float):
        quota = _largest_remainder(counts, cfg.keep)
    else:
        quota = _water_fill(counts, cfg.keep)
    limit = pl.col("label").replace_strict(sizes["label"], pl.Series(quota), return_dtype=pl.Int64)
    return pl.col("class_pos") < limit


def _choose(cands: pl.DataFrame, cfg: SelectConfig) -> pl.DataFrame:
    """key and reason ("kept" | "min_per_class" | "pruned") for every candidate."""
    ordered = (
        cands.with_columns(priority=POLICIES[cfg.policy](cands, cfg))
        .sort("priority", "key")
        .with_columns(pos=pl.int_range(pl.len()), class_pos=pl.int_range(pl.len()).over("label"))
    )
    # Within a class the policy keeps a prefix of the priority order (globally or per class),
    # so the class minimum is "the first min_per_class of the class", extras marked as such.
    reason = (
        pl.when(_in_budget(ordered, cfg)).then(pl.lit("kept"))
        .when(pl.col("class_pos") < cfg.min_per_class).then(pl.lit("min_per_class"))
        .otherwise(pl.lit("pruned"))
    )
    return ordered.select("key", reason.alias("chosen"))


# ---------------------------------------------------------------------------------------------
# Scores


def _base_name(column: str) -> str:
    return re.sub(r"_\d+$", "", column)  # "margin_1" (proxy 1's margin) -> "margin"


def _hardness(column: str) -> pl.Expr:
    sign = -1.0 if _base_name(column) in HIGHER_IS_EASIER else 1.0
    return pl.col(column).cast(pl.Float64) * sign


def _rank01(values: pl.Expr) -> pl.Expr:
    """Rank normalised to [0, 1]; ties share their average rank; nulls stay null, uncounted."""
    ranks = values.rank("average")
    return (ranks - 1.0) / (values.count().cast(pl.Float64) - 1.0).clip(lower_bound=1.0)


def score_expr(by: Sequence[str], ok: pl.Expr) -> pl.Expr:
    """The combined hardness of ok rows (null for errors): one column as is, several
    rank-averaged so that columns on different scales weigh the same."""
    hardness = [pl.when(ok).then(_hardness(c)) for c in by]
    if len(hardness) == 1:
        return hardness[0]  # raw values: ccs strata are equal-width in the score itself
    return pl.mean_horizontal([_rank01(h) for h in hardness])


# ---------------------------------------------------------------------------------------------
# Reading tables


def _check_same_keys(tables: list[pl.LazyFrame], dirs: Sequence[Path]) -> None:
    """Every table has unique keys and the same key set as the first (else joins mislead)."""
    first = tables[0].select("key")
    for directory, table in zip(dirs, tables):
        n, unique = table.select(pl.len(), pl.col("key").n_unique()).collect().row(0)
        if n != unique:
            raise ValueError(f"{directory}: {n - unique} duplicated keys")
        missing = first.join(table.select("key"), on="key", how="anti").collect()["key"]
        extra = table.select("key").join(first, on="key", how="anti").collect()["key"]
        if len(missing) or len(extra):
            raise ValueError(
                f"{directory} and {dirs[0]} score different key sets: {len(missing)} keys "
                f"missing (e.g. {missing.head(3).to_list()}), {len(extra)} extra "
                f"(e.g. {extra.head(3).to_list()}); score the same inputs with every proxy"
            )


def _proxy_columns(table: pl.LazyFrame, i: int) -> pl.LazyFrame:
    """key plus the proxy's own columns (and its status/error), suffixed _i."""
    own = [c for c in table.collect_schema().names() if c not in IDENTITY_COLUMNS]
    return table.select(
        "key", *[pl.col(c).alias(f"{c}_{i}") for c in ["status", "error", *own]]
    )


def _weighted_rank(column: str, ok: list[pl.Expr], weights: Sequence[float]) -> pl.Expr:
    """The column's per-table normalised ranks, averaged with the tables' weights (0: no vote);
    one voting table: its raw values (a single table's score, so ccs strata stay equal-width)."""
    voting = [i for i, w in enumerate(weights) if w > 0]
    if len(voting) == 1:
        return pl.when(ok[voting[0]]).then(pl.col(f"{column}_{voting[0]}"))
    ranks = {i: _rank01(pl.when(ok[i]).then(pl.col(f"{column}_{i}"))) for i in voting}
    if len({weights[i] for i in voting}) == 1:
        return pl.mean_horizontal(list(ranks.values()))  # equal votes: exactly the plain mean
    total = pl.sum_horizontal([ranks[i] * weights[i] for i in voting])
    present = pl.sum_horizontal([pl.when(ranks[i].is_not_null()).then(pl.lit(weights[i])) for i in voting])
    return pl.when(present > 0).then(total / present)


def _combine(joined: pl.LazyFrame, n: int, by: Sequence[str], weights: Sequence[float], lead: int) -> pl.LazyFrame:
    """status/error over all tables; each `by` column rank-averaged across the voting tables;
    the label columns from the `lead` table."""
    ok = [pl.col(f"status_{i}") == "ok" for i in range(n)]
    names = set(joined.collect_schema().names())
    averaged = [  # ranks, not values: proxies' scales differ; direction (e.g. margin) is preserved
        _weighted_rank(c, ok, weights).alias(c) for c in by
        if all(f"{c}_{i}" in names for i in range(n) if weights[i] > 0)
    ]
    status = pl.when(pl.all_horizontal(ok)).then(pl.lit("ok")).otherwise(pl.lit("error"))
    error = pl.coalesce([pl.col(f"error_{i}") for i in range(n)])
    labels = [pl.col(f"{c}_{lead}").alias(c) for c in LABEL_COLUMNS if f"{c}_{lead}" in names]
    return joined.with_columns(status.alias("status"), error.alias("error"), *averaged, *labels)


def load_scores(dirs: Sequence[Path], by: Sequence[str] = ("el2n",), weights: Sequence[float] | None = None,
                lead: int = 0) -> pl.LazyFrame:
    """All part files of one scores table, or several proxies' tables over the SAME keys.

    Several tables are joined on key: identity columns (IDENTITY_COLUMNS) come from the
    first; every other column is suffixed with the table's index (el2n_0, el2n_1, ...); each
    `by` column is also present unsuffixed as the average of its per-table normalised ranks,
    weighted by `weights` (curate/select/weighing.py; default: equal; 0 leaves a table out, and a
    single voting table gives its raw values); the label columns (label_issue, probs, ...) come
    from table `lead`. A key that is an error in any table is an error (first error text kept).
    Raises when the tables' key sets differ or a table repeats a key.
    """
    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ValueError("load_scores needs at least one scores directory")
    tables = [scan_scores(d) for d in dirs]
    if len(tables) == 1:
        return tables[0]
    _check_same_keys(tables, dirs)
    weights = list(weights) if weights is not None else [1.0] * len(dirs)
    if len(weights) != len(dirs) or not any(w > 0 for w in weights) or not 0 <= lead < len(dirs):
        raise ValueError(f"{len(dirs)} tables need as many weights, one of them > 0, and a lead table among them; "
                         f"got weights {weights}, lead {lead}")
    names = tables[0].collect_schema().names()
    joined = tables[0].select([c for c in names if c in IDENTITY_COLUMNS - {"status", "error"}])
    for i, table in enumerate(tables):
        joined = joined.join(_proxy_columns(table, i), on="key", how="left")
    return _combine(joined, len(tables), by, weights, lead)


# ---------------------------------------------------------------------------------------------
# Selection


def _check_columns(frame: pl.LazyFrame, cfg: SelectConfig) -> None:
    names = set(frame.collect_schema().names())
    need = {"key", "source", "label", "class_name", "status", *cfg.by}
    if cfg.dedup:
        need.add("dup_keep")
    if cfg.drop_label_issues or cfg.relabel_min_prob is not None:
        need.add("label_issue")
    if cfg.relabel_min_prob is not None:
        need |= {"suggested_label", "probs"}
    if missing := sorted(need - names):
        from_extra = {"dup_keep", "proto_dist", "proto_cluster"} & set(missing)
        hint = " (pass extra=embedding_columns(...))" if from_extra else ""
        if "label_issue" in missing and cfg.drop_label_issues:  # a table `curate score` did not write
            hint += " (drop_label_issues=False / --keep-label-issues selects without them)"
        close = {m: difflib.get_close_matches(m, sorted(names), n=1) for m in missing}
        hint += "".join(f"; did you mean {c[0]!r} for {m!r}?" for m, c in close.items() if c)
        raise ValueError(f"scores lack column(s) {missing}{hint}; have {sorted(names)}")
    schema = frame.collect_schema()
    if not_scores := [f"{c} ({schema[c]})" for c in cfg.by if not schema[c].is_numeric()]:
        numeric = sorted(c for c, t in schema.items()
                         if t.is_numeric() and c not in ("label", "suggested_label", "fold"))
        raise ValueError(f"--by {', '.join(not_scores)}: not a numeric score to rank by; numeric columns: {numeric}")


def _check_scored(table: pl.DataFrame, cfg: SelectConfig) -> None:
    if table["key"].n_unique() != table.height:
        raise ValueError(f"{table.height - table['key'].n_unique()} duplicated keys in the scores")
    if n := table.filter(pl.col("ok") & pl.col("score").is_null()).height:
        raise ValueError(f"{n} ok rows have a null in {list(cfg.by)}: pick columns this proxy "
                         "filled (el2n_mean/margin_mean/forgetting need a proxy trained here)")
    if cfg.dedup and (n := table.filter(pl.col("ok") & pl.col("dup_keep").is_null()).height):
        raise ValueError(f"dedup=True but {n} ok rows have no dup_keep: compute duplicate "
                         "groups (embedding_columns with a dedup threshold) first")


def _scored(scores: pl.LazyFrame, cfg: SelectConfig, extra: pl.DataFrame | None) -> pl.DataFrame:
    """key, label, class_name, ok, score, dup_keep and the pre-policy reason, collected."""
    frame = scores if extra is None else scores.join(extra.lazy(), on="key", how="left")
    _check_columns(frame, cfg)
    ok = pl.col("status") == "ok"
    dup_keep = pl.col("dup_keep") if cfg.dedup else pl.lit(True)
    # copies with different labels: at least one label is wrong, and nothing says which
    conflict = pl.lit(False)
    if cfg.dedup and "dup_group" in frame.collect_schema().names():
        conflict = ((pl.col("dup_group") >= 0) & (pl.col("label").n_unique().over("dup_group") > 1)).fill_null(False)
    flagged = pl.col("label_issue").fill_null(False)
    relabel = (flagged & (pl.col("probs").arr.max() >= cfg.relabel_min_prob)
               if cfg.relabel_min_prob is not None else pl.lit(False))
    issue = flagged & ~relabel if cfg.drop_label_issues else pl.lit(False)
    table = frame.select(
        "key", "source", pl.when(relabel).then(pl.col("suggested_label")).otherwise(pl.col("label"))
        .cast(pl.Int32).alias("label"), "class_name", ok.alias("ok"),
        score_expr(cfg.by, ok).cast(pl.Float64).alias("score"), dup_keep.alias("dup_keep"),
        issue.alias("label_issue"), pl.when(relabel).then(pl.col("label")).cast(pl.Int32).alias("relabelled_from"),
        conflict.alias("dup_label_conflict"),
    ).collect()
    table = _renamed(table)
    _check_scored(table, cfg)
    reason = (
        pl.when(~pl.col("ok")).then(pl.lit("error"))
        .when(pl.col("label_issue") | (pl.col("dup_label_conflict") & cfg.drop_label_issues))
        .then(pl.lit("label_issue"))
        .when(~pl.col("dup_keep")).then(pl.lit("duplicate"))
        .otherwise(pl.lit(None, pl.String))
    )
    return table.with_columns(reason.alias("reason"))


def _renamed(table: pl.DataFrame) -> pl.DataFrame:
    """Relabelled rows take their new class's name (from the rows labelled with it)."""
    moved = pl.col("relabelled_from").is_not_null()
    if not table.select(moved.any()).item():
        return table
    names = table.filter(~moved).select("label", "class_name").unique("label")
    new_name = pl.col("label").replace_strict(names["label"], names["class_name"],
                                              default=pl.col("label").cast(pl.String))
    return table.with_columns(class_name=pl.when(moved).then(new_name).otherwise(pl.col("class_name")))


def select(
    scores: pl.LazyFrame, cfg: SelectConfig, extra: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Apply `cfg` to a scores table: every input key exactly once, sorted by key.

    Columns: key, source, label (as shipped: the suggested one for relabelled rows), class_name,
    kept (bool), reason, score (float64 hardness, null for errors), relabelled_from (the given
    label of a relabelled row, else null). Reasons: "error" (status != ok; never kept),
    "label_issue" (drop_label_issues and cleanlab flagged the label), "duplicate" (dedup and not
    its group's representative), "kept", "pruned" (beyond the policy's budget), "min_per_class"
    (kept only to honour the class minimum, on top of the budget).

    The keep fraction applies to the CANDIDATES: ok rows, minus duplicates when dedup and label
    issues when drop_label_issues. A corrupt file is not a pruned example, so errors do not eat
    into the budget.
    `extra` (embedding_columns output) is left-joined by key, giving dup_keep and proto_dist.
    """
    table = _scored(scores, cfg, extra)
    cands = table.filter(pl.col("reason").is_null()).select("key", "label", "score")
    chosen = _choose(cands, cfg)
    reason = pl.coalesce("reason", "chosen")
    return (
        table.join(chosen, on="key", how="left")
        .with_columns(reason.alias("reason"))
        .with_columns(kept=pl.col("reason").is_in(["kept", "min_per_class"]))
        .select(OUTPUT_COLUMNS)
        .sort("key")
    )


def selection_hash(sel: pl.DataFrame) -> str:
    """sha256 over the sorted (key, kept) lines: a stable identifier of a selection."""
    lines = sel.sort("key").select(pl.format("{}\t{}", "key", pl.col("kept").cast(pl.Int8)))
    return hashlib.sha256("\n".join(lines.to_series().to_list()).encode()).hexdigest()
