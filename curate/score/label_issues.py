"""Label issues from class probabilities, with cleanlab (confident learning).

`curate score` stores each ok row's class probabilities in `probs`: out-of-sample with `--folds K`
(each row scored by the proxy that never trained on it), the proxy's own otherwise. Confident
learning (Northcutt et al., JAIR 2021) needs the whole table at once (its thresholds are per-class
averages over every row), so it runs after the last part is written: `annotate` reads `label` and
`probs`, asks cleanlab, and rewrites each part with `label_issue`, `label_quality` and
`suggested_label` filled. It is a pure function of the table, so a resumed job simply runs it again.
Memory: every row's probabilities at once, N x C float32 a few times over (the table column, the
stacked array, cleanlab's float64 copy): ImageNet-1k's 1.28 M x 1,000 is ~5 GB per copy.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from curate.score import table

COLUMNS = ("label_issue", "label_quality", "suggested_label")
# cleanlab's `filter_by` choices. The default flags the n lowest self-confidences, n being confident
# learning's estimate of the number of issues: on the demo it gave the best F1 of every filter_by,
# cleanlab's own default (prune_by_noise_rate) included (docs/benchmarks.md, "Label issues").
FILTERS = ("low_self_confidence", "prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
           "predicted_neq_given", "low_normalized_margin")
DEFAULT_FILTER = FILTERS[0]


@dataclass(frozen=True)
class Issues:
    """Per ok row, in table order: is the label likely wrong, how likely it is right, and the
    class the probabilities favour."""

    label_issue: np.ndarray  # bool (N,)
    label_quality: np.ndarray  # float32 (N,), higher = more likely correct
    suggested_label: np.ndarray  # int32 (N,), argmax of probs


def find_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str = DEFAULT_FILTER) -> Issues:
    """cleanlab over the classes that occur in `labels`. Probabilities are restricted to those
    classes and renormalised: a hub head with 1,000 outputs scoring a 10-class dataset would
    otherwise give cleanlab 990 empty classes to reason about."""
    present = np.unique(labels)
    suggested = probs.argmax(1).astype(np.int32)
    if len(present) < 2:  # confident learning compares classes: nothing to compare
        quality = probs[np.arange(len(labels)), labels].astype(np.float32)
        return Issues(np.zeros(len(labels), bool), quality, suggested)
    sub = probs[:, present].astype(np.float64)
    sub /= np.clip(sub.sum(1, keepdims=True), 1e-12, None)
    y = np.searchsorted(present, labels)
    from cleanlab.filter import find_label_issues  # imported here: it pulls in sklearn and pandas
    from cleanlab.rank import get_label_quality_scores
    with warnings.catch_warnings():  # "too few examples in class k": small classes are the user's data
        warnings.simplefilter("ignore", UserWarning)
        issue = find_label_issues(y, sub, filter_by=filter_by)
    quality = get_label_quality_scores(y, sub, method="self_confidence")
    return Issues(np.asarray(issue, bool), quality.astype(np.float32), suggested)


def annotate(parts: list[Path], filter_by: str = DEFAULT_FILTER) -> dict[str, Any]:
    """Fill the label columns of every part (rewritten whole, temp-then-rename); returns counts.

    Rows without probabilities (errors, unknown labels) keep nulls."""
    frame = pl.concat([pl.read_parquet(p, columns=["label", "probs", "fold"]).with_columns(part=pl.lit(i))
                       for i, p in enumerate(parts)], how="vertical").with_row_index("row")
    scored = frame.filter(pl.col("probs").is_not_null() & (pl.col("label") >= 0))
    n = frame.height
    issue, quality, suggested = np.full(n, None, object), np.full(n, np.nan, np.float32), np.full(n, -1, np.int32)
    agrees = np.zeros(0, bool)
    if scored.height:
        probs = np.stack(scored["probs"].to_numpy())
        agrees = probs.argmax(1) == scored["label"].to_numpy()
        found = find_issues(scored["label"].to_numpy(), probs, filter_by)
        del probs  # one N x C copy at a time
        rows = scored["row"].to_numpy()
        issue[rows], quality[rows], suggested[rows] = found.label_issue, found.label_quality, found.suggested_label
    has = np.zeros(n, bool)
    has[scored["row"].to_numpy()] = True
    offsets = np.cumsum([0, *frame.group_by("part", maintain_order=True).len()["len"].to_list()])
    for i, part in enumerate(parts):
        a, b = offsets[i], offsets[i + 1]
        table.rewrite_columns(part, {"label_issue": pa.array(issue[a:b].tolist(), pa.bool_()),
                        "label_quality": pa.array(quality[a:b], pa.float32(), mask=~has[a:b]),
                        "suggested_label": pa.array(suggested[a:b], pa.int32(), mask=~has[a:b])})
    flagged = int(sum(bool(x) for x in issue if x is not None))
    folds = scored["fold"].to_numpy()
    per_fold = {int(f): float(agrees[folds == f].mean()) for f in np.unique(folds[~np.isnan(folds.astype(float))])}
    method = (f"cleanlab.filter.find_label_issues(filter_by={filter_by!r}); label_quality = "
              "cleanlab.rank.get_label_quality_scores(method='self_confidence')")
    return {"method": method, "filter_by": filter_by, "rows": int(scored.height), "label_issues": flagged,
            # share of rows whose argmax is the given label: the proxy's accuracy against the given
            # labels (with folds: the fold proxies' held-out accuracy)
            "agreement": float(agrees.mean()) if scored.height else None,
            "agreement_per_fold": dict(sorted(per_fold.items())) or None}
