"""Label issues from frozen features: K-fold linear probes on a given model's embeddings.

With a model that never trained on these labels (hub weights, or a checkpoint trained on other
images), the cheap, strong way to out-of-sample probabilities is cleanlab's own recommendation:
fit a linear classifier on the embeddings of K-1 folds and predict the held-out fold, K times.
Seconds on a CPU, where K fold proxies trained from scratch take K trainings.

`fit_parts` runs after the scoring pass, over the whole table (a fold's classifier needs every
other fold's rows), and rewrites each part's `probs`, `fold` and `oos_*` columns with the probes'
held-out predictions; `label_issues.annotate` then reads them like any other out-of-sample
probabilities. A pure function of the table and the seed: a resumed job simply runs it again.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import torch

from curate.score import metrics, table
from curate.score.folds import assign_folds

# Inverse L2 strength of the multinomial logistic regression on standardised features: a moderate
# penalty, so a probe on a few thousand rows of a wide embedding does not fit its folds' noise. Not
# tuned yet (docs/benchmarks.md, "Proxies for real photographs", says what was measured).
C = 0.1
MAX_ITER = 500


def fit_parts(parts: Sequence[Path], k: int, seed: int) -> dict[str, Any]:
    """Fit the K probes, rewrite the probability and fold columns of every part; returns the record."""
    t0 = time.perf_counter()
    frame = pl.concat([pl.read_parquet(p, columns=["key", "label", "embedding"]).with_columns(part=pl.lit(i))
                       for i, p in enumerate(parts)], how="vertical").with_row_index("row")
    ok = frame.filter(pl.col("embedding").is_not_null() & (pl.col("label") >= 0))
    if ok.height == 0:
        raise ValueError("--probe: no scored row has a label to fit a probe on")
    width = int(pl.read_parquet_schema(parts[0])["probs"].size)  # type: ignore[attr-defined]
    labels = ok["label"].to_numpy()
    if labels.max() >= width:
        raise ValueError(f"--probe: label {labels.max()} does not fit the table's {width} probability columns")
    folds = assign_folds(ok["key"].to_list(), labels.tolist(), k, seed)
    probs = held_out_probs(np.stack(ok["embedding"].to_numpy()), labels, folds, width)
    _write(parts, frame, ok["row"].to_numpy(), probs, labels, folds)
    agrees = probs.argmax(1) == labels
    return {"method": "K-fold multinomial logistic regression on the standardised embedding "
                      f"(sklearn, C={C}), folds stratified by label", "k": k, "seed": seed, "rows": int(ok.height),
            "held_out_accuracy": float(agrees.mean()), "seconds": round(time.perf_counter() - t0, 2)}


def held_out_probs(x: np.ndarray, labels: np.ndarray, folds: np.ndarray, width: int) -> np.ndarray:
    """(N, width) float32: row i's class probabilities from the probe fitted without its fold."""
    from sklearn.linear_model import LogisticRegression  # imported here: sklearn is slow to import
    from sklearn.exceptions import ConvergenceWarning

    out = np.zeros((len(x), width), np.float32)
    for f in np.unique(folds):
        train, test = folds != f, folds == f
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        clf = LogisticRegression(C=C, max_iter=MAX_ITER)
        with warnings.catch_warnings():  # an unconverged probe still ranks; its accuracy is reported
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit((x[train] - mean) / std, labels[train])
        out[np.ix_(test, clf.classes_)] = clf.predict_proba((x[test] - mean) / std)
    return out


def _write(parts: Sequence[Path], frame: pl.DataFrame, rows: np.ndarray, probs: np.ndarray, labels: np.ndarray,
           folds: np.ndarray) -> None:
    """Each part's probed rows get the probes' columns; the others (errors, unknown labels) keep theirs."""
    n = frame.height
    probed = np.full(n, -1, np.int64)  # table row -> position in `probs`, -1: not probed
    probed[rows] = np.arange(len(rows))
    scores = metrics.example_scores(torch.from_numpy(np.log(np.clip(probs, 1e-12, None))),
                                   torch.from_numpy(labels.astype(np.int64)))
    offsets = np.cumsum([0, *frame.group_by("part", maintain_order=True).len()["len"].to_list()])
    for i, part in enumerate(parts):
        at = probed[offsets[i]:offsets[i + 1]]
        old = pl.read_parquet(part, columns=["probs", "fold", *(table.OOS_PREFIX + s for s in table.OOS_SCORES)])
        columns = {"probs": _replace(old["probs"], probs, at, pa.float32()),
                   "fold": _replace(old["fold"], folds, at, pa.int16()),
                   **{table.OOS_PREFIX + name: _replace(old[table.OOS_PREFIX + name], scores[name].numpy(), at,
                                                        pa.float32()) for name in table.OOS_SCORES}}
        table.rewrite_columns(part, columns)


def _replace(old: pl.Series, new: np.ndarray, at: np.ndarray, kind: pa.DataType) -> pa.Array:
    """`old` with its rows where at >= 0 set to new[at] (numpy throughout: a table may hold millions)."""
    hit = at >= 0
    dense = old.to_numpy() if isinstance(old.dtype, pl.Array) else old.fill_null(0).to_numpy()
    values = np.nan_to_num(dense).astype(new.dtype, copy=True)  # null rows stay masked below
    values[hit] = new[at[hit]]
    mask = old.is_null().to_numpy() & ~hit
    if values.ndim == 1:
        return pa.array(np.where(mask, 0, values), kind, mask=mask)
    flat = pa.array(np.where(mask[:, None], 0, values).ravel(), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=pa.array(mask))
