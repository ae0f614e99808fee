"""`curate inspect`: what a scores table holds, from polars; optional PNG plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from curate.common.atomic import save_figure
from curate.ingest.decode import decode_image
from curate.ingest.sources import Item, read_bytes
from curate.score import table

SCORE_COLUMNS = ("loss", "margin", "el2n", "entropy", "confidence", "forgetting", "el2n_mean", "margin_mean")


def counts(lf: pl.LazyFrame) -> dict[str, int]:
    c = lf.select(inputs=pl.len(), ok=(pl.col("status") == "ok").sum(),
                  error=(pl.col("status") == "error").sum(), keys=pl.col("key").n_unique()).collect()
    return {k: int(v) for k, v in c.row(0, named=True).items()}


def error_kinds(lf: pl.LazyFrame, examples: int = 3) -> pl.DataFrame:
    """Errors grouped by their category (the text before the first colon), with example keys."""
    return (lf.filter(pl.col("status") == "error")
            .with_columns(kind=pl.col("error").str.split(":").list.first())
            .group_by("kind").agg(n=pl.len(), examples=pl.col("key").sort().head(examples))
            .sort("n", descending=True).collect())


def per_class(lf: pl.LazyFrame) -> pl.DataFrame:
    ok = pl.col("status") == "ok"
    return (lf.group_by("label", "class_name")
            .agg(n=pl.len(), errors=(~ok).sum(), accuracy=(pl.col("pred") == pl.col("label")).filter(ok).mean(),
                 el2n=pl.col("el2n").mean(), loss=pl.col("loss").mean(),
                 forgetting=pl.col("forgetting").cast(pl.Float64).mean())
            .sort("label").collect())


def distributions(lf: pl.LazyFrame) -> pl.DataFrame:
    """Quantiles of every score column present (ok rows only)."""
    names = [c for c in SCORE_COLUMNS if c in lf.collect_schema().names()]
    ok = lf.filter(pl.col("status") == "ok").select([pl.col(c).cast(pl.Float64) for c in names]).collect()
    stats = {"stat": ["mean", "p05", "p25", "p50", "p75", "p95", "nulls"]}
    for c in names:
        s = ok[c]
        stats[c] = [s.mean(), *[s.quantile(q) for q in (0.05, 0.25, 0.5, 0.75, 0.95)], float(s.null_count())]
    return pl.DataFrame(stats)


def summary_text(scores_dir: Path) -> str:
    """What `curate inspect` prints: counts, errors by kind, per-class and score statistics."""
    lf = table.scan(scores_dir)
    c = counts(lf)
    lines = [f"{scores_dir}: {c['inputs']} inputs, {c['ok']} ok, {c['error']} errors, {c['keys']} unique keys"]
    if (scores_dir / table.MANIFEST).exists():
        p = table.read_manifest(scores_dir)["proxy"]
        lines.append(f"proxy {p['name']} ({p['model']}, {p['weights']}), importance {p['importance']}")
    with pl.Config(tbl_rows=50, tbl_cols=12, float_precision=3, tbl_width_chars=120, fmt_str_lengths=60):
        if c["error"]:
            lines += ["", "errors by kind:", str(error_kinds(lf))]
        lines += ["", "per class:", str(per_class(lf)), "", "score distributions (ok rows):", str(distributions(lf))]
    return "\n".join(lines)


def plot_histograms(scores_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lf = table.scan(scores_dir)
    names = [c for c in SCORE_COLUMNS if c in lf.collect_schema().names()]
    df = lf.filter(pl.col("status") == "ok").select(names).collect()
    names = [c for c in names if df[c].null_count() < len(df)]
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(3.2 * ((len(names) + 1) // 2), 5.5))
    for ax, name in zip(np.ravel(axes), names):
        ax.hist(df[name].drop_nulls().cast(pl.Float64).to_numpy(), bins=40, color="#3b6ea8")
        ax.set_title(name)
    fig.tight_layout()
    path = out / "score_histograms.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_importance(scores_dir: Path, out: Path, n: int = 24, size: int = 128) -> Path | None:
    """The hardest-by-EL2N ok images with their importance map overlaid (red = important)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (table.scan(scores_dir).filter((pl.col("status") == "ok") & pl.col("importance").is_not_null())
            .sort("el2n", descending=True, nulls_last=True).head(n).collect())
    if rows.is_empty():
        return None
    cols = 8
    fig, axes = plt.subplots(-(-len(rows) // cols), cols, figsize=(2 * cols, 2.2 * -(-len(rows) // cols)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, r in zip(axes.ravel(), rows.iter_rows(named=True)):
        ax.imshow(_thumbnail(r["source"], size))
        ax.imshow(_heat(table.importance_from_bytes(r["importance"], r["importance_h"], r["importance_w"])),
                  extent=(0, size, size, 0), interpolation="nearest")
        ax.set_title(f"{r['class_name'][:10]} el2n {r['el2n']:.2f}", fontsize=7)
    fig.tight_layout()
    path = out / "importance_overlay.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def _heat(grid: np.ndarray) -> np.ndarray:
    """RGBA overlay: red where important, transparent where not (the image stays readable)."""
    g = grid.astype(np.float32)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-12)
    rgba = np.zeros((*g.shape, 4), np.float32)
    rgba[..., 0], rgba[..., 3] = 1.0, 0.7 * g
    return rgba


def _thumbnail(source: str, size: int) -> np.ndarray:
    """The image squashed to size x size, as the proxy saw it; tar members are located by name."""
    path, _, member = source.partition("#")
    data = _tar_member(path, member) if member else read_bytes(Item("", source, -1, "", path))
    dec = decode_image(data, size)
    if dec.image is None:
        return np.zeros((size, size, 3), np.uint8)
    return dec.image.permute(1, 2, 0).numpy()


def _tar_member(path: str, member: str) -> bytes:
    import tarfile

    with tarfile.open(path, "r:") as tf:
        f = tf.extractfile(member)
        return f.read() if f is not None else b""
