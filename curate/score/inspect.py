"""`curate inspect`: what a scores table holds, from polars; optional PNG plots."""
from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import polars as pl

from curate.common.atomic import save_figure
from curate.ingest.decode import decode_image
from curate.ingest.sources import Item, read_bytes, split_source
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


def plot_importance(scores_dir: Path, out: Path, n: int = 24, size: int = 128) -> tuple[Path | None, str]:
    """The hardest-by-EL2N ok images with their importance map over them (yellow = important): the
    plot's path, or None and why it was skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (table.scan(scores_dir).filter((pl.col("status") == "ok") & pl.col("importance").is_not_null())
            .sort("el2n", descending=True, nulls_last=True).head(n).collect())
    if rows.is_empty():
        return None, "importance_overlay.png: the table has no importance maps (they need a ViT proxy)"
    pixels = [thumbnail(src, size) for src in rows["source"]]
    readable = [i for i, px in enumerate(pixels) if px is not None]
    if not readable:
        return None, (f"importance_overlay.png: none of the {rows.height} images could be read from their "
                      f"source (moved or deleted?), e.g. {rows['source'][0]}")
    n_before = rows.height
    rows, pixels = rows[readable], [pixels[i] for i in readable]
    cols = 8
    fig, axes = plt.subplots(-(-len(rows) // cols), cols, figsize=(2 * cols, 2.2 * -(-len(rows) // cols)),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, r, px in zip(axes.ravel(), rows.iter_rows(named=True), pixels):
        ax.imshow(overlay(px, table.importance_from_bytes(r["importance"], r["importance_h"], r["importance_w"])))
        ax.set_title(f"{r['class_name'][:10]} el2n {r['el2n']:.2f}", fontsize=7)
    fig.tight_layout()
    path = out / "importance_overlay.png"
    save_figure(fig, path)
    plt.close(fig)
    skipped = n_before - rows.height
    return path, (f"importance_overlay.png: {skipped} images left out, not readable from their source"
                  if skipped else "")


def overlay(pixels: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The map, upsampled to the image (uint8 HWC), as a viridis tint over it. Viridis (blue ->
    yellow) has no red, so the map stays visible on red objects, and the image shows through."""
    from matplotlib import colormaps
    from PIL import Image

    g = grid.astype(np.float32)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-12)
    heat = Image.fromarray((g * 255).astype(np.uint8)).resize(pixels.shape[1::-1], Image.BILINEAR)
    colour = colormaps["viridis"](np.asarray(heat) / 255.0)[..., :3] * 255
    return (0.45 * pixels + 0.55 * colour).clip(0, 255).astype(np.uint8)


def thumbnail(source: str, size: int) -> np.ndarray | None:
    """The image squashed to size x size (uint8 HWC), as the proxy saw it; tar members are located
    by name. None when it cannot be read or decoded any more (moved, deleted, changed)."""
    path, member = split_source(source)
    try:
        data = _tar_member(path, member) if member is not None else read_bytes(Item("", source, -1, "", path))
    except (OSError, KeyError, EOFError, tarfile.TarError):  # tarfile: KeyError = no such member
        return None
    dec = decode_image(data, size)
    return None if dec.image is None else dec.image.permute(1, 2, 0).numpy()


def _tar_member(path: str, member: str) -> bytes:
    with tarfile.open(path, "r:") as tf:
        f = tf.extractfile(member)
        return f.read() if f is not None else b""
