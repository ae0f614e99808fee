"""One self-contained HTML page that shows a person what the scores say and what was pruned.

`curate inspect SCORES --html report.html` (scores only) and `curate shard ... --report` (scores plus
the selection, written as OUT/report.html). Everything is inline, thumbnails as JPEG data URIs and
plots as PNG data URIs, so the file opens anywhere, offline, and can be mailed. A few lines of script
count the images the browser managed to show (`data-images-loaded="N/M"` on <body>) and put a banner
on top when one is missing; the page reads fine without script.

Images are read from each row's `source`. When they have moved, their tiles say so and the page
says how many; the counts, bars and histograms need only the table.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import polars as pl

from curate.common.atomic import atomic_path
from curate.score import inspect as score_inspect
from curate.score import table
from curate.select.embeddings import DEFAULT_THRESHOLDS, default_descriptor, embedding_columns

REASON_COLOURS = {"kept": "#2e7d32", "min_per_class": "#66bb6a", "pruned": "#9e9e9e", "duplicate": "#ef6c00",
                  "label_issue": "#c62828", "error": "#212121", "ok": "#2e7d32"}
THUMB = 96  # px, the side of a gallery tile


@dataclass
class ReportInfo:
    path: Path
    images: int = 0  # image tiles embedded
    unreadable: list[str] = field(default_factory=list)  # sources that could not be read (moved?)
    skipped: list[str] = field(default_factory=list)  # sections left out, each with why


def write_report(scores: Sequence[Path], path: Path, selection: pl.DataFrame | None = None,
                 per_gallery: int = 24, maps: Path | None = None) -> ReportInfo:
    """Write the report for the scores tables (the first gives the labels and scores; `maps`, by
    default the first with importance maps, gives the overlays) and, when given, `curate shard`'s
    selection."""
    page = _Page(ReportInfo(path))
    rows = _rows(scores, selection)
    manifest = table.read_manifest(scores[0])
    page.header(scores, manifest, rows, selection is not None)
    page.reasons(rows)
    page.per_class(rows)
    page.histograms(rows, manifest["proxy"]["name"], selection is not None)
    page.label_errors(rows, per_gallery)
    page.duplicates(rows, scores[0], per_gallery // 3)
    page.extremes(rows, per_gallery, selection is not None)
    page.overlays(rows, maps if maps is not None else _maps_table(scores), per_gallery)
    with atomic_path(path) as tmp:
        tmp.write_text(page.render(), encoding="utf-8")
    return page.info


def _rows(scores: Sequence[Path], selection: pl.DataFrame | None) -> pl.DataFrame:
    """One row per input: identity, scores, label columns, and the selection's reason/score (or,
    without one, status as the reason, el2n as score). Maps are read later, for the few shown."""
    cols = ["key", "source", "label", "class_name", "status", "error", "el2n", "margin", "label_issue",
            "label_quality", "suggested_label"]
    rows = table.scan(scores[0]).select(cols).collect()
    if selection is None:
        return rows.with_columns(reason=pl.when(pl.col("status") == "ok").then(pl.lit("ok")).otherwise(pl.lit("error")),
                                 score=pl.col("el2n").cast(pl.Float64), kept=pl.col("status") == "ok")
    extra = [c for c in ("dup_group",) if c in selection.columns]
    return rows.join(selection.select("key", "reason", "score", "kept", *extra), on="key", how="left")


def _maps_table(scores: Sequence[Path]) -> Path | None:
    """The first table whose rows carry importance maps (a ViT proxy's)."""
    has_maps = (pl.col("importance_h").is_not_null().any(),)
    return next((d for d in scores if table.scan(d).select(*has_maps).collect().item()), None)


class _Page:
    def __init__(self, info: ReportInfo) -> None:
        self.info = info
        self.parts: list[str] = []
        self._images: dict[tuple[str, bytes | None], str | None] = {}

    # -- sections -------------------------------------------------------------------------------

    def header(self, scores: Sequence[Path], manifest: dict[str, Any], rows: pl.DataFrame, selected: bool) -> None:
        p = manifest["proxy"]
        ok = int((rows["status"] == "ok").sum())
        facts = [("scores", ", ".join(str(s) for s in scores)),
                 ("proxy", f"{p['name']} ({p['model']}, weights: {p['weights']})"),
                 ("inputs", f"{rows.height} ({ok} ok, {rows.height - ok} errors)")]
        if folds := p.get("folds"):
            facts.append(("folds", f"{folds['k']} (label probabilities out of sample)"))
        if (found := p.get("label_issues")) and found["rows"]:
            facts.append(("label issues (cleanlab)", f"{found['label_issues']} of {found['rows']}"))
        if selected:
            facts.append(("kept", f"{int(rows['kept'].sum())} of {rows.height}"))
        body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
        self.parts.append(f"<h1>curate report</h1><table class=facts>{body}</table>")

    def reasons(self, rows: pl.DataFrame) -> None:
        counts = rows.group_by("reason").len().sort("len", descending=True)
        bars = "".join(_bar_row(r, {r: n}, rows.height) for r, n in counts.iter_rows())
        self.parts.append(f"<h2>Rows by reason</h2><table class=bars>{bars}</table>")

    def per_class(self, rows: pl.DataFrame) -> None:
        wide = rows.group_by("label", "class_name", "reason").len().sort("label")
        largest = int(rows.group_by("label").len()["len"].max())
        lines = []
        for (label, name), grp in wide.group_by("label", "class_name", maintain_order=True):
            counts = dict(zip(grp["reason"].to_list(), grp["len"].to_list()))
            lines.append(_bar_row(f"{label} {name}", counts, largest))
        legend = " ".join(f"<span class=key style='background:{c}'></span>{_e(r)}" for r, c in REASON_COLOURS.items()
                          if r in set(rows["reason"].to_list()))
        self.parts.append(f"<h2>Per class</h2><p>{legend}</p><table class=bars>{''.join(lines)}</table>")

    def histograms(self, rows: pl.DataFrame, proxy: str, selected: bool) -> None:
        png = _histograms_png(rows, proxy, selected)
        self.parts.append(f"<h2>Score distributions</h2><img class=plot alt='score histograms' src='{png}'>")
        self.info.images += 1

    def label_errors(self, rows: pl.DataFrame, n: int) -> None:
        if rows["label_issue"].null_count() == rows.height:
            self.info.skipped.append("likely label errors: no row has class probabilities (no ok row?)")
            return
        flagged = rows.filter(pl.col("label_issue").fill_null(False)).sort("label_quality").head(n)
        names = dict(rows.select("label", "class_name").unique().iter_rows())
        tiles = [self._tile(r, f"given <b>{_e(r['class_name'])}</b> &rarr; suggested "
                              f"<b>{_e(names.get(r['suggested_label'], str(r['suggested_label'])))}</b><br>"
                              f"quality {r['label_quality']:.3f} &middot; el2n {_num(r['el2n'])}")
                 for r in flagged.iter_rows(named=True)]
        total = int(rows["label_issue"].fill_null(False).sum())
        self.parts.append(f"<h2>Likely label errors ({total}; lowest label quality first)</h2>"
                          + _gallery(tiles, "none flagged"))

    def duplicates(self, rows: pl.DataFrame, scores: Path, groups: int) -> None:
        if "dup_group" not in rows.columns:
            # no selection grouped them (inspect --html): `curate shard` has no dedup default
            on = default_descriptor(scores)
            dup = embedding_columns(scores, DEFAULT_THRESHOLDS[on], None, dedup_on=on).select("key", "dup_group")
            rows = rows.join(dup, on="key", how="left")
            note = f"{on} similarity >= {DEFAULT_THRESHOLDS[on]}"
        else:
            note = "as curate shard grouped them; the kept one is marked"
        found = (rows.filter(pl.col("dup_group").fill_null(-1) >= 0).sort("dup_group", "key")
                 .group_by("dup_group", maintain_order=True).agg(pl.all()).head(groups))
        blocks = []
        for grp in found.iter_rows(named=True):
            names = [c for c in grp if c != "dup_group"]
            members = [dict(zip(names, vals)) for vals in zip(*(grp[c] for c in names))]
            tiles = [self._tile(m, f"{_e(m['class_name'])}<br>{_e(m['reason'])}") for m in members]
            # copies with different labels: one of the labels is wrong
            conflict = ("<p><b>labels disagree: a label issue</b></p>"
                        if len({m["class_name"] for m in members}) > 1 else "")
            blocks.append(f"<div class=group>{conflict}{''.join(tiles)}</div>")
        self.parts.append(f"<h2>Near-duplicate groups ({note})</h2>"
                          + (f"<div class=groups>{''.join(blocks)}</div>" if blocks else "<p>none found</p>"))

    def extremes(self, rows: pl.DataFrame, n: int, selected: bool) -> None:
        kept = rows.filter(pl.col("kept").fill_null(False) & pl.col("score").is_not_null())
        what = "kept " if selected else ""
        for title, frame in ((f"Hardest {what}images", kept.sort("score", descending=True).head(n)),
                             (f"Easiest {what}images", kept.sort("score").head(n))):
            tiles = [self._tile(r, f"{_e(r['class_name'])}<br>score {_num(r['score'])}")
                     for r in frame.iter_rows(named=True)]
            self.parts.append(f"<h2>{title}</h2>" + _gallery(tiles, "none"))

    def overlays(self, rows: pl.DataFrame, maps: Path | None, n: int) -> None:
        if maps is None:
            self.info.skipped.append("importance overlays: no table has maps (they need a ViT proxy)")
            return
        shown = rows.filter(pl.col("kept").fill_null(False)).sort("score", descending=True, nulls_last=True)
        grids = (table.scan(maps).filter(pl.col("key").is_in(shown["key"].head(4 * n).implode())
                                         & pl.col("importance").is_not_null())
                 .select("key", "importance", "importance_h", "importance_w").collect())
        frame = shown.join(grids, on="key", how="inner").sort("score", descending=True, nulls_last=True).head(n)
        tiles = [self._tile(r, f"{_e(r['class_name'])}", overlay=True) for r in frame.iter_rows(named=True)]
        self.parts.append("<h2>Patch importance (image | map over it: yellow = important, blue = not)</h2>"
                          + _gallery(tiles, "none"))

    # -- images ---------------------------------------------------------------------------------

    def _tile(self, row: dict[str, Any], caption: str, overlay: bool = False) -> str:
        src = self._image(row["source"])
        if src is None:
            img = f"<div class=missing>not readable:<br>{_e(row['source'][-60:])}</div>"
        else:
            img = f"<img src='{src}' alt='{_e(row['key'])}'>"
            self.info.images += 1
            if overlay:
                grid = table.importance_from_bytes(row["importance"], row["importance_h"], row["importance_w"])
                img += f"<img src='{self._image(row['source'], grid)}' alt='map of {_e(row['key'])}'>"
                self.info.images += 1
        return f"<figure title='{_e(row['key'])}'>{img}<figcaption>{caption}</figcaption></figure>"

    def _image(self, source: str, grid: np.ndarray | None = None) -> str | None:
        cache_key = (source, None if grid is None else grid.tobytes())
        if cache_key not in self._images:
            pixels = score_inspect.thumbnail(source, THUMB)
            if pixels is None:
                self.info.unreadable.append(source)
                self._images[cache_key] = None
            else:
                self._images[cache_key] = _jpeg_uri(pixels if grid is None else score_inspect.overlay(pixels, grid))
        return self._images[cache_key]

    def render(self) -> str:
        warn = ""
        if self.info.unreadable:
            warn = (f"<p class=warn>{len(set(self.info.unreadable))} images could not be read from their source "
                    "(moved or deleted?): their tiles say so; counts and plots come from the table.</p>")
        skipped = "".join(f"<li>{_e(s)}</li>" for s in self.info.skipped)
        skipped = f"<h2>Left out</h2><ul>{skipped}</ul>" if skipped else ""
        return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>curate report</title>"
                f"<style>{_CSS}</style></head><body><div id=banner></div>{warn}{''.join(self.parts)}{skipped}"
                f"<script>{_SCRIPT}</script></body></html>\n")


def _histograms_png(rows: pl.DataFrame, proxy: str, selected: bool) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    ok = rows.filter(pl.col("score").is_not_null())
    kept, dropped = (ok.filter(pl.col("kept"))["score"].to_numpy(), ok.filter(~pl.col("kept"))["score"].to_numpy())
    n = 2 if selected else 1
    axes[0].hist([kept, dropped][:n], bins=40, stacked=True, color=["#2e7d32", "#9e9e9e"][:n],
                 label=["kept", "not kept"][:n])
    if selected and len(kept):  # the kept set spans [lowest, highest] kept score (ccs keeps strata within it)
        for x, name in ((kept.min(), "lowest kept"), (kept.max(), "highest kept")):
            axes[0].axvline(x, color="#c62828", ls="--", lw=1)
            axes[0].annotate(f"{name} {x:.3g}", (x, 0.95), xycoords=("data", "axes fraction"), fontsize=7,
                             rotation=90, va="top", ha="right")
    axes[0].set(xlabel="selection score (hardness; larger = harder)" if selected else "EL2N (larger = harder)",
                ylabel="images", title=f"{proxy}: {'selection score' if selected else 'EL2N'}")
    axes[0].legend(fontsize=8)
    quality = rows.filter(pl.col("label_quality").is_not_null())
    flagged = quality["label_issue"].to_numpy().astype(bool) if quality.height else np.zeros(0, bool)
    q = quality["label_quality"].to_numpy()
    axes[1].hist([q[~flagged], q[flagged]], bins=40, stacked=True, color=["#2e7d32", "#c62828"],
                 label=["label looks right", "label issue"])
    axes[1].set(xlabel="label quality (probability of the given label)", ylabel="images",
                title=f"{proxy}: label quality")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _jpeg_uri(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _bar_row(name: str, counts: dict[str, int], scale: int) -> str:
    order = sorted(counts.items(), key=lambda rn: list(REASON_COLOURS).index(rn[0]) if rn[0] in REASON_COLOURS else 99)
    segments = "".join(f"<span style='width:{100 * n / max(scale, 1):.2f}%;background:"
                       f"{REASON_COLOURS.get(r, '#607d8b')}' title='{_e(r)}: {n}'></span>" for r, n in order)
    text = ", ".join(f"{_e(r)} {n}" for r, n in order)
    return f"<tr><th>{_e(name)}</th><td class=bar>{segments}</td><td>{text}</td></tr>"


def _gallery(tiles: list[str], empty: str) -> str:
    return f"<div class=gallery>{''.join(tiles)}</div>" if tiles else f"<p>{_e(empty)}</p>"


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


_CSS = """
body{font:14px system-ui,sans-serif;margin:24px;color:#212121;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table.facts th{text-align:left;padding-right:16px;font-weight:600}
table.bars{border-collapse:collapse;width:100%}table.bars th{text-align:left;width:180px;font-weight:500}
td.bar{width:55%}td.bar span{display:inline-block;height:14px}
span.key{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}
.gallery,.group,.groups{display:flex;flex-wrap:wrap;gap:8px}.group{border:1px solid #ddd;padding:6px}
figure{margin:0;min-width:100px;max-width:204px;font-size:11px}figure img{width:96px;height:96px;margin-right:4px}
.missing{width:96px;height:96px;background:#eee;font-size:9px;overflow:hidden;word-break:break-all}
img.plot{max-width:100%}.warn,#banner:not(:empty){background:#fff3e0;border:1px solid #ef6c00;padding:8px}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute("data-images-loaded", (imgs.length - bad.length) + "/" + imgs.length);
  if (bad.length) { document.getElementById("banner").textContent = bad.length + " images failed to show."; }
});
"""
