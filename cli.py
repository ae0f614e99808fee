"""`curate`: score an image dataset once, select and shard it, train on the shards, inspect, run the demo.

Thin by design: options -> a config dataclass -> one library call -> a short summary.
"""
from __future__ import annotations

import errno
import importlib
import json
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from curate.ingest.limits import DEFAULT_MAX_CLASSES, DEFAULT_MAX_PIXELS  # no dependencies: --help stays fast

if TYPE_CHECKING:
    from curate.score.job import ScoreConfig
    from curate.select.policies import SelectConfig
    from curate.select.report import ReportInfo

# The one error policy of every command. These are the user's to fix (bad input or settings, a
# file that is missing, unreadable or full, a name that is not there): one line, exit code 2, as
# click's own usage errors. Anything else is a bug and ends in its traceback; --debug shows the
# traceback of these too. Code that fails on the user's input raises one of these at the source.
EXPECTED = (ValueError, OSError, KeyError)


class Refusal(click.ClickException):
    """An expected error, shown as the one line `error: ...` on stderr."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


def one_line(exc: BaseException) -> str:
    """The message of `exc` on one line (str() of a KeyError would quote it; an empty one is named)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def _usage(exc: click.ClickException) -> Refusal:
    ctx = getattr(exc, "ctx", None)  # usage errors know their command: point at its help
    text = " ".join(exc.format_message().split())  # "Invalid value for 'SOURCE': ..." on one line
    return Refusal(text + (f" (see '{ctx.command_path} --help')" if ctx is not None else ""))


class CurateGroup(click.Group):
    """The `curate` group: applies EXPECTED's policy to every command, its options and its parsing."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise  # bare `curate`: the help, as click shows it
        except click.UsageError as e:
            raise _usage(e) from e

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Refusal:
            raise
        except click.ClickException as e:
            raise _usage(e) from e
        except EXPECTED as e:
            if ctx.params.get("debug") or getattr(e, "errno", None) == errno.EPIPE:
                raise  # --debug: the traceback; a closed pipe (`| head`): click ends quietly
            raise Refusal(one_line(e)) from e


class RegistryChoice(click.Choice):
    """The names of a registry (or a tuple of names) as click choices, read when first needed, so
    that `curate --help` imports none of the modules that hold them (sparsevit's are torch-free in
    `sparsevit.names`, so `curate train --help` waits for no torch either)."""

    def __init__(self, module: str, attribute: str) -> None:
        self._source, self._names = (module, attribute), None
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        if self._names is None:
            module, attribute = self._source
            self._names = tuple(getattr(importlib.import_module(module), attribute))
        return self._names

    @choices.setter
    def choices(self, _names: tuple[str, ...]) -> None:
        """click.Choice.__init__ sets the names; ours come from the registry."""


def _blocks(value: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(v) for v in value.split(",")) if value else None
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@click.group(cls=CurateGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show the traceback of expected errors too (bad input, settings, files).")
@click.version_option(package_name="curate")
def main(debug: bool) -> None:
    """Score a labelled image dataset with proxy models and keep the informative part.

    Expected errors (bad input, settings, files) are one line `error: ...` and exit code 2."""


@main.command()
@click.argument("source")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder for the scores table.")
@click.option("--proxy", help="Recipe name (`curate proxies`) or timm model [default: with --train-epochs, by image "
              "size: airbench up to 64 px, imagenet-vit above; with given weights, demo-vit].")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Proxy weights (a state dict) to load.")
@click.option("--pretrained", is_flag=True, help="Load timm hub weights (needs network access).")
@click.option("--train-epochs", type=int, help="Train the proxy here for N epochs (early-dynamics scores).")
@click.option("--folds", default=1, show_default=True, type=click.IntRange(min=1),
              help="K > 1: also train K proxies, each without one fold (stratified), for out-of-sample "
                   "probabilities and label issues (needs --train-epochs; costs about K times the training); "
                   "with --probe, the number of probe folds [default then: 5].")
@click.option("--probe", is_flag=True,
              help="Label issues from K-fold linear classifiers on the embeddings of the given --checkpoint or "
                   "--pretrained model (seconds, not K trainings; the way to use a pretrained backbone).")
@click.option("--label-filter", default="low_self_confidence", show_default=True,
              type=RegistryChoice("curate.score.label_issues", "FILTERS"),
              help="cleanlab's filter_by for label_issue; rerun with --resume to change it (only the label pass runs).")
@click.option("--image-size", type=int, help="Proxy input side in pixels [default: the recipe's].")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Decode workers.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", default=0, show_default=True)
@click.option("--chunk-size", default=4096, show_default=True, help="Inputs per Parquet part (unit of resume).")
@click.option("--importance", type=RegistryChoice("curate.score.table", "IMPORTANCE_METHODS"), default="auto",
              show_default=True,
              help="Patch importance: a ViT's CLS attention (cls) or attention rollout, a CNN's class activation "
                   "map of the label (cam), or none; auto: cls for a ViT, cam for a CNN.")
@click.option("--importance-blocks", callback=lambda _c, _p, v: _blocks(v),
              help="Comma-separated block indices averaged for --importance cls (negative = from the end) "
                   "[default: the recipe's, else a quarter, half and three quarters of the depth].")
@click.option("--class-map", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file, one class name per line; line number = class index.")
@click.option("--allow-root", "allow_roots", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A folder a list file may name files in, besides its own (repeatable).")
@click.option("--max-classes", default=DEFAULT_MAX_CLASSES, show_default=True,
              help="Labels must be below this; a larger one is refused as a data error.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Decompression-bomb guard: larger images become error rows (Pillow's own limit).")
@click.option("--resume", is_flag=True, help="Continue a killed run in --out.")
@click.option("--overwrite", is_flag=True, help="Replace a previous run's outputs in --out.")
@click.option("--distributed", is_flag=True,
              help="Run as one rank of `torchrun --nproc_per_node N cli.py score ...`: each rank scores its "
                   "share of the parts (automatic when WORLD_SIZE > 1; the flag makes a plain launch an error).")
@click.option("--dry-run", is_flag=True, help="List the classes and their input counts; score and write nothing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def score(source: str, out: Path, quiet: bool, dry_run: bool, **opts: object) -> None:
    """Score every image of SOURCE (ImageFolder, WebDataset shards, or a CSV/Parquet list)."""
    from curate.ingest.sources import split_root_warning
    from curate.score.job import ScoreConfig, run_score

    if warning := split_root_warning(source):
        click.echo(f"warning: {warning}", err=True)
    cfg = ScoreConfig(source=source, out=out, progress=not quiet, **opts)  # type: ignore[arg-type]
    if dry_run:
        click.echo(class_counts(cfg))
        return
    result = run_score(cfg)
    if result.is_main:  # one summary per job, not one per rank
        click.echo(score_summary(result.manifest, out, result.parts_written), err=True)


def class_counts(cfg: "ScoreConfig") -> str:
    """`curate score --dry-run`: SOURCE indexed as the real run indexes it, per class."""
    import polars as pl

    from curate.ingest.sources import open_source

    items = open_source(cfg.source, cfg.class_map, cfg.allow_roots, cfg.max_classes)
    df = pl.DataFrame({"label": [it.label for it in items], "class_name": [it.class_name for it in items]})
    per = df.group_by("label", "class_name").len("inputs").sort("label")
    with pl.Config(tbl_rows=1000, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        return f"{per}\n{len(items)} inputs in {per.height} classes; nothing written (dry run)"


def label_issue_lines(proxy: dict) -> list[str]:
    """What the label-issue pass found, and from which probabilities."""
    found, folds = proxy.get("label_issues"), proxy.get("folds")
    if not found or not found["rows"]:
        return []
    where = (f"out-of-sample probabilities of {proxy['probe']['k']} linear probes on the embeddings"
             if proxy.get("probe") else f"out-of-sample probabilities of {folds['k']} fold proxies" if folds else
             "the proxy's own probabilities (in sample: it trained on these labels; --folds K gives "
             "out-of-sample ones)")
    agree = f", which agree with {found['agreement']:.1%} of the given labels" if found["agreement"] is not None else ""
    if per_fold := found.get("agreement_per_fold"):
        agree += " (held-out accuracy per fold: " + ", ".join(f"{a:.1%}" for a in per_fold.values()) + ")"
    return [f"label issues (cleanlab): {found['label_issues']} of {found['rows']} "
            f"({found['label_issues'] / found['rows']:.1%}) from {where}{agree}"]


def score_summary(manifest: dict, out: Path, parts_written: int) -> str:
    from curate.score.proxy_training import health_warning

    c, t, p = manifest["counts"], manifest["timing"], manifest["proxy"]
    history = p.get("training", {}).get("history", [])
    lines = [
        f"scored {c['inputs']} inputs ({c['ok']} ok, {c['error']} errors, {c['classes']} classes) -> {out}",
        f"proxy {p['name']} [{p['model']}, weights: {p['weights']}], importance: {p['importance']['method']}"
        + (f" {p['importance']['grid']}" if p["importance"]["grid"] else "")
        + (f" (chosen by {p['chosen_by']}; --proxy names another)" if p.get("chosen_by") else ""),
        *([f"proxy training (loss / accuracy per epoch, given labels): " + ", ".join(
            f"{h['epoch']}: {h['loss']:.2f} / {h['accuracy']:.0%}" for h in history)] if history else []),
        *([f"warning: {w}"] if (w := health_warning(history, c["classes"], p["name"])) else []),
        *label_issue_lines(p),
        f"time {t['total_s']:.1f}s (index+train {t['index_and_train_s']:.1f}s, scoring {t['score_s']:.1f}s); "
        f"{parts_written} part(s) written this run",
        f"next: curate inspect {out}",
    ]
    return "\n".join(lines)


@main.command()
@click.argument("scores_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), help="Write PNG plots here.")
@click.option("--html", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a self-contained HTML report here: counts, per-class bars, histograms, galleries of "
                   "likely label errors, near-duplicates, hardest and easiest images, importance overlays.")
def inspect(scores_dir: Path, plots: Path | None, html: Path | None) -> None:
    """Counts, errors, per-class statistics and score distributions of a scores table."""
    from curate.score import inspect as inspect_table

    click.echo(inspect_table.summary_text(scores_dir))
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
        click.echo(f"wrote {inspect_table.plot_histograms(scores_dir, plots)}", err=True)
        path, skipped = inspect_table.plot_importance(scores_dir, plots)
        for line in ([f"wrote {path}"] if path else []) + ([f"skipped {skipped}"] if skipped else []):
            click.echo(line, err=True)
    if html is not None:
        from curate.select.report import write_report

        click.echo(report_line(write_report([scores_dir], html)), err=True)


def report_line(info: "ReportInfo") -> str:
    """Where the report went, what it holds, and what it had to leave out."""
    lines = [f"wrote {info.path} ({info.images} images inline)"]
    if info.unreadable:
        lines.append(f"  {len(set(info.unreadable))} images could not be read from their source (moved or "
                     f"deleted?), e.g. {info.unreadable[0]}: their tiles say so")
    lines += [f"  left out {s}" for s in info.skipped]
    return "\n".join(lines)


def parse_keep(value: str) -> float | int:
    """--keep 0.7 or 70% is a fraction of the candidates, --keep 5000 (an integer) a count; 1.0 or
    100% keeps all, 1 keeps one. Anything else is refused with the forms it may take."""
    text = value.strip()
    forms = "give a fraction in (0, 1] (0.7), a percentage (70%) or a whole count >= 1 (5000)"
    try:
        if text.endswith("%"):
            number, kind = float(text[:-1]) / 100, "fraction"
        elif text.lstrip("+").isdigit():
            number, kind = int(text), "count"
        else:
            number, kind = float(text), "fraction"
    except ValueError:
        raise ValueError(f"--keep {value!r}: {forms}") from None
    if kind == "fraction" and not 0 < number <= 1:
        count = f"; for a count of {int(number)} write {int(number)}" if number > 1 and number.is_integer() else ""
        raise ValueError(f"--keep {value!r} is not a fraction in (0, 1]{count}: {forms}")
    if kind == "count" and number < 1:
        raise ValueError(f"--keep {value!r}: a count keeps at least 1; {forms}")
    return number


@main.command()
@click.argument("source")
@click.option("--scores", "scores", multiple=True, required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A `curate score` output; repeat for several proxies (joined by key, each weighed by its "
                   "held-out accuracy when the tables record one).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder for the shards.")
@click.option("--keep", default="1.0", show_default=True,
              help="Fraction of the candidates left after label issues and near-duplicates (0.7, 70%; 1.0 "
                   "keeps all), or a whole count (5000); below 1 --policy ranks them by --by.")
@click.option("--by", multiple=True, default=("el2n",), show_default=True,
              help="Score column to rank by; repeat to rank-average several.")
@click.option("--policy", type=RegistryChoice("curate.select.policies", "POLICIES"), default="ccs", show_default=True)
@click.option("--beta", default=0.1, show_default=True, help="ccs: hardest fraction dropped first.")
@click.option("--class-balanced", is_flag=True, help="Apply the keep fraction per class.")
@click.option("--min-per-class", default=0, show_default=True)
@click.option("--dedup", type=float,
              help="Drop near-duplicates at or above this similarity [default: phash 0.75, thumbnail 0.93; "
                   "embedding needs one]; copies with different labels are flagged dup_label_conflict, and "
                   "dropped with the label issues.")
@click.option("--no-dedup", is_flag=True, help="Keep near-duplicates.")
@click.option("--dedup-on", type=RegistryChoice("curate.select.embeddings", "DEDUP_ON"), default="phash",
              show_default=True,
              help="phash: perceptual hashes of the image, its mirror and centre crop (copies, re-encoded, "
                   "resized, cropped or flipped; any proxy); thumbnail: 8x8 pixel layout; embedding: the "
                   "proxy's features (semantic, needs a strong pretrained proxy).")
@click.option("--drop-label-issues/--keep-label-issues", default=None,
              help="Drop the rows cleanlab flagged as label issues (in the most accurate --scores table; score "
                   "with --folds 5 or --probe for out-of-sample probabilities, which find most); reason "
                   "`label_issue`. [default: dropped, unless the proxy that flagged them is near chance]")
@click.option("--relabel", type=click.FloatRange(0, 1, min_open=True),
              help="Flagged label issues whose suggested class has at least this probability (e.g. 0.7) ship "
                   "with it as cls (the given label kept in the sample's json as relabelled_from) instead of "
                   "being dropped.")
@click.option("--prototypes", type=int, help="k-means clusters for the proto_dist score.")
@click.option("--maps-from", type=int,
              help="Index (0 = the first) of the --scores table whose importance maps ship [default: the most "
                   "accurate proxy's with maps].")
@click.option("--val", help="Validation source, written unpruned as the `validation` split.")
@click.option("--val-scores", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A `curate score` output over --val: its importance maps go into the validation shards.")
@click.option("--max-side", type=click.IntRange(min=8),
              help="Ship images re-encoded as JPEG with the longer side at most this (e.g. 256): "
                   "a lighter loader. Default: the original bytes.")
@click.option("--quality", default=90, show_default=True, type=click.IntRange(1, 95),
              help="JPEG quality of images re-encoded for --max-side.")
@click.option("--samples-per-shard", default=1000, show_default=True)
@click.option("--shard-multiple", default=1, show_default=True, help="Shard count multiple (ranks x workers).")
@click.option("--name", default="curated", show_default=True, help="Dataset name in _info.json.")
@click.option("--workers", default=2, show_default=True, help="Processes writing shards in parallel.")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True)
@click.option("--overwrite", is_flag=True)
@click.option("--dry-run", is_flag=True, help="Print per-class kept counts; write nothing.")
@click.option("--report", is_flag=True, help="Also write OUT/report.html: what was kept and pruned, and why, "
                                             "with the images (see `curate inspect --html`).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def shard(source: str, scores: tuple[Path, ...], keep: str, by: tuple[str, ...], quiet: bool,
          **opts: object) -> None:
    """Select a subset of SOURCE by its scores and write timm-ready WebDataset shards."""
    import polars as pl

    from curate.shard.job import ShardConfig, run_shard

    opts["dedup"] = dedup_threshold(opts.pop("dedup"), bool(opts.pop("no_dedup")), str(opts["dedup_on"]))
    cfg = ShardConfig(source=source, scores=scores, select=select_config(keep, by, opts), progress=not quiet,
                      **opts)  # type: ignore[arg-type]
    result = run_shard(cfg)
    with pl.Config(tbl_rows=100, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        click.echo(str(result.per_class))
    if len(scores) > 1 or any("near chance" in line for line in result.weighing):
        for line in result.weighing:
            click.echo(line, err=True)
    sel = result.selection
    reasons = ", ".join(f"{r} {n}" for r, n in sel.group_by("reason").len().sort("reason").iter_rows())
    click.echo(f"{len(sel)} inputs: {reasons}", err=True)
    if conflicts := int(sel["dup_label_conflict"].sum()):
        fate = ("dropped as label issues" if cfg.select.drop_label_issues
                else "kept as duplicates are; --drop-label-issues drops them")
        click.echo(f"{conflicts} inputs are copies of an image with another label (dup_label_conflict in "
                   f"{cfg.out}/selection.parquet): {fate}", err=True)
    click.echo(epoch_cost_line(sel), err=True)
    for line in result.warnings:
        click.echo(f"warning: {line}", err=True)
    if result.report is not None:
        click.echo(report_line(result.report), err=True)
    if result.manifest is None:
        click.echo("dry run: nothing written", err=True)
        return
    train = result.manifest["splits"]["train"]
    size = sum(s["bytes"] for s in train["shards"]) / 1e6
    click.echo(f"wrote {train['num_samples']} samples in {len(train['shards'])} shards ({size:.1f} MB) "
               f"to {cfg.out} in {result.seconds:.1f}s; check with: curate verify {cfg.out}", err=True)


def dedup_threshold(given: float | None, off: bool, dedup_on: str) -> float | None:
    """--dedup / --no-dedup as ShardConfig's threshold: the descriptor's own where none was given."""
    from curate.select.embeddings import DEFAULT_THRESHOLDS

    if off:
        if given is not None:
            raise click.UsageError("--dedup and --no-dedup contradict each other: give one")
        return None
    if given is None and dedup_on not in DEFAULT_THRESHOLDS:
        raise click.UsageError(f"--dedup-on {dedup_on} has no default threshold: give --dedup (a cosine "
                               "similarity in (0, 1)) or --no-dedup")
    return DEFAULT_THRESHOLDS[dedup_on] if given is None else given


# `curate shard`'s options that make up its SelectConfig (with --keep, --by and --relabel)
SELECT_OPTIONS = ("policy", "beta", "class_balanced", "min_per_class", "drop_label_issues", "seed")


def select_config(keep: str, by: tuple[str, ...], opts: dict[str, Any]) -> "SelectConfig":
    """The selection part of `curate shard`'s options (taken out of `opts`) as one SelectConfig."""
    from curate.select.policies import SelectConfig

    chosen = {name: opts.pop(name) for name in SELECT_OPTIONS}
    return SelectConfig(keep=parse_keep(keep), by=by, relabel_min_prob=opts.pop("relabel"), **chosen)


def epoch_cost_line(selection: "pl.DataFrame") -> str:
    """What an epoch over the kept set should cost against one over every readable input: the
    share of samples (the training step's cost is per sample; the loader's too)."""
    import polars as pl

    readable = selection.filter(pl.col("reason") != "error").height
    kept = int(selection["kept"].sum())
    share = kept / readable if readable else 0.0
    return (f"an epoch over the kept set costs ~{share:.2f}x one over all {readable} readable inputs "
            f"({kept} samples) with curate train --loader memory, which costs what it trains on small images; "
            "the stream loader adds a fixed cost per epoch, and --keep multiplies the step's share further "
            "(docs/benchmarks.md, \"Epochs that cost what they train\")")


def _model_args(values: tuple[str, ...]) -> dict[str, object]:
    out: dict[str, object] = {}
    for v in values:
        name, sep, raw = v.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected KEY=VALUE, got {v!r}")
        out[name] = json.loads(raw) if raw[:1].isdigit() or raw[:1] in "-[{" or raw in ("true", "false") else raw
    return out


@main.command()
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option("--model", default="deit_tiny_patch16_224", show_default=True, help="timm VisionTransformer name.")
@click.option("--model-arg", multiple=True, help="Extra timm.create_model argument KEY=VALUE (e.g. depth=6).")
@click.option("--img-size", default=224, show_default=True)
@click.option("--patch-size", type=int, help="Override the model's patch size [default: the model's].")
@click.option("--num-classes", type=int, help="[default: the shards' manifest.json num_classes]")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=64, show_default=True, help="Per rank.")
@click.option("--lr", default=1e-3, show_default=True, help="For a global batch of 512; scaled linearly.")
@click.option("--warmup-epochs", default=1.0, show_default=True)
@click.option("--weight-decay", default=0.05, show_default=True)
@click.option("--smoothing", default=0.1, show_default=True, help="Label smoothing.")
@click.option("--crop-scale", nargs=2, type=float, default=(0.08, 1.0), show_default=True,
              help="RandomResizedCrop area range (timm's --scale).")
@click.option("--mixup", default=0.0, show_default=True, help="Mixup alpha (0: off).")
@click.option("--cutmix", default=0.0, show_default=True, help="CutMix alpha (0: off).")
@click.option("--drop-path", default=0.0, show_default=True)
@click.option("--ema", default=0.0, show_default=True, help="EMA decay (0: off).")
@click.option("--keep", default=1.0, show_default=True, help="Fraction of patch tokens kept at the input.")
@click.option("--keep-schedule", type=RegistryChoice("sparsevit.names", "KEEP_SCHEDULES"), default="constant",
              show_default=True)
@click.option("--drop-by", type=RegistryChoice("sparsevit.names", "DROP_BY"), default="importance", show_default=True,
              help="Rank tokens by the stored maps, or at random (the control).")
@click.option("--package-token", is_flag=True, help="Fuse the dropped tokens into one token.")
@click.option("--online-blocks", callback=lambda _c, _p, v: _blocks(v),
              help="Drop again after these blocks by CLS attention, e.g. 3,6,9.")
@click.option("--online-keep", default=1.0, show_default=True, help="Keep ratio at each --online-blocks block.")
@click.option("--selector-blocks", callback=lambda _c, _p, v: _blocks(v),
              help="Learn a token selector before these blocks, e.g. 0 or 3,6,9: the drop of --keep moves there, "
                   "and at inference the selector picks the tokens without maps.")
@click.option("--select-by", type=RegistryChoice("sparsevit.names", "SELECT_BY"), default="maps", show_default=True,
              help="Who ranks the tokens while training with a selector (mix: maps first, the selector by the end).")
@click.option("--distill-weight", default=1.0, show_default=True, help="Selector loss towards the maps' top k.")
@click.option("--ratio-weight", default=2.0, show_default=True,
              help="Selector loss holding its mean keep probability at --keep.")
@click.option("--selector-lr-scale", default=10.0, show_default=True,
              help="The selector's learning rate as a multiple of the ViT's.")
@click.option("--attention", type=RegistryChoice("sparsevit.names", "ATTENTION_MODES"), default="dense",
              show_default=True,
              help="topk: Tri-Level connection sparsity (regularises, saves nothing); gather: all queries "
                   "attend to the top --key-keep keys by importance (saves the N^2 part).")
@click.option("--rho", default=1.0, show_default=True, help="topk: share of keys each query keeps.")
@click.option("--key-keep", default=0.5, show_default=True, help="gather: share of patch keys attended to.")
@click.option("--example-pruning", type=RegistryChoice("sparsevit.names", "EXAMPLE_PRUNERS"), default="none",
              show_default=True, help="rs2: a fresh random --example-keep share of the examples each epoch; "
                   "top-score: the --example-keep share of each batch with the highest stored score.")
@click.option("--example-keep", default=0.7, show_default=True,
              help="rs2: share of the examples each epoch trains; top-score: share of each batch.")
@click.option("--workers", default=2, show_default=True, help="Loader processes per rank.")
@click.option("--decode", type=RegistryChoice("sparsevit.names", "DECODE"), default="cpu", show_default=True,
              help="gpu: loader workers only read bytes and draw crops; JPEGs decode with nvJPEG on the GPU.")
@click.option("--loader", type=RegistryChoice("sparsevit.names", "LOADERS"), default="stream", show_default=True,
              help="memory: decode the train split once and augment in batches (small images: an epoch costs "
                   "what its model steps cost; examples the pruner sets out take no steps).")
@click.option("--seed", default=0, show_default=True)
@click.option("--log-every", default=10, show_default=True, help="Steps between metrics.jsonl step records.")
@click.option("--record-keys", is_flag=True, help="Write the keys each rank trained on (keys-rankR-epochE.txt).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start over in a non-empty --out.")
@click.option("--quiet", is_flag=True)
def train(shards: Path, out: Path, model_arg: tuple[str, ...], drop_by: str, package_token: bool,
          online_blocks: tuple[int, ...] | None, selector_blocks: tuple[int, ...] | None, attention: str,
          rho: float, key_keep: float, quiet: bool, **opts: object) -> None:
    """Train a timm ViT on SHARDS (from `curate shard`); runs under torchrun for DDP."""
    from sparsevit.model import SparseConfig
    from sparsevit.train import TrainConfig, run_train

    sparse = SparseConfig(drop_by=drop_by, package=package_token, online_blocks=online_blocks or (),
                          selector_blocks=selector_blocks or (), attention=attention, rho=rho, key_keep=key_keep)
    cfg = TrainConfig(shards=shards, out=out, model_kwargs=_model_args(model_arg), sparse=sparse,
                      progress=not quiet, **opts)  # type: ignore[arg-type]
    summary = run_train(cfg)
    click.echo(train_summary(summary, out))


def train_summary(summary: dict, out: Path) -> str:
    """What the run reached, in how long, where it is, and what to do with it."""
    def pct(key: str) -> str:
        return f"{summary[key]:.1%}" if summary.get(key) is not None else "n/a"

    acc = f"val accuracy {pct('val_acc')}"
    if summary.get("val_acc_dropped") is not None:
        acc += f" (as trained, tokens dropped: {pct('val_acc_dropped')})"
    if summary.get("val_acc_selected") is not None:
        acc += f" (selector alone: {pct('val_acc_selected')})"
    lost = [f"{summary[k]} {w} per epoch" for k, w in (("unused_per_epoch", "unused"),
                                                     ("skipped_per_epoch", "skipped")) if summary.get(k)]
    return "\n".join([
        f"trained {summary['epochs']} epochs ({summary['steps']} steps) in {summary['wall_s']:.0f}s: {acc}, "
        f"train accuracy {pct('train_acc')}" + (f"; {', '.join(lost)}" if lost else ""),
        f"checkpoint {out / 'checkpoint.pt'}; metrics {out / 'metrics.jsonl'}, summary {out / 'summary.json'}",
        f"next: curate predict {out} IMAGES --out predictions.parquet",
    ])


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.argument("images", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path),
              help="Predictions as Parquet: path, label, class_name, prob, error (one row per file).")
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True),
              help="Tokens the selector keeps [default: the run's keep with a selector, else 1].")
@click.option("--export", "export_to", type=click.Path(path_type=Path),
              help="Also write the model as it ships (torch.export, .pt2; dynamic batch).")
@click.option("--allow-root", "allow_roots", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A folder that symlinks in IMAGES may point into (repeatable); others are error rows, not read.")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=click.IntRange(min=1),
              help="Decompression-bomb guard: larger images become error rows.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing --out or --export file.")
def predict(checkpoint: Path, images: Path, out: Path | None, keep: float | None, export_to: Path | None,
            allow_roots: tuple[Path, ...], max_pixels: int, batch_size: int, workers: int, device: str,
            overwrite: bool) -> None:
    """Classify IMAGES (a file or a folder) with the model of a `curate train` run (CHECKPOINT: the
    run folder or its checkpoint.pt); a model with a token selector picks its own tokens.

    Every file under IMAGES becomes one row (files that are not images, or cannot be read, as
    error rows), read by the rules of `curate score`."""
    from curate.common.runfolder import check_output_file
    from curate.common.runtime import resolve_device
    from curate.ingest.sources import from_files
    from sparsevit import predict as pred

    if out is None and export_to is None:
        raise click.UsageError("give --out for predictions, --export for the model, or both")
    if out is not None and export_to is not None and out.resolve() == export_to.resolve():
        raise click.UsageError("--out and --export name the same file")
    items = from_files(images, allow_roots)
    for option, path in (("--out", out), ("--export", export_to)):
        if path is not None:  # before any work: a bad path is found now, not after inference
            check_output_file(path, option, overwrite, [images, checkpoint])
    dev = resolve_device(device)
    model, run = pred.deployed(checkpoint, keep, dev)
    if export_to is not None:
        pred.export(model, run.config.img_size, export_to)
        click.echo(f"exported {export_to} (keep {model.keep})", err=True)
    if out is not None:
        t0 = time.perf_counter()
        table = pred.predict(model, items, run.config.img_size, batch_size, workers, dev, run.class_names,
                             max_pixels)
        seconds = time.perf_counter() - t0
        pred.write_predictions(table, out)
        errors = sum(1 for e in table.column("error").to_pylist() if e)
        names = "" if run.class_names else " (the run records no class names: labels are class indices)"
        click.echo(f"{len(items)} files ({errors} unreadable, listed in {out}) at keep {model.keep}: "
                   f"{len(items) / seconds:.0f} images/s end to end{names}", err=True)


@main.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(out: Path) -> None:
    """Re-read every shard in OUT: sha256, counts, _info.json, decodability, importance shapes."""
    from curate.shard.format import read_manifest
    from curate.shard.verify import verify as verify_shards

    faults = verify_shards(out)
    for fault in faults:
        click.echo(f"FAULT {fault}", err=True)
    if faults:
        raise click.ClickException(f"{len(faults)} fault(s) in {out}")
    manifest = read_manifest(out)
    counts = ", ".join(f"{s} {v['num_samples']} samples in {len(v['shards'])} shards"
                       for s, v in manifest["splits"].items())
    click.echo(f"ok: {counts}")


@main.command()
def proxies() -> None:
    """List the named proxy recipes."""
    from curate.score.proxies import RECIPES

    for name, r in RECIPES.items():
        click.echo(f"{name:14s} {r.model} {r.model_kwargs} @{r.img_size}px, {r.epochs} epochs: {r.note}")


@main.command()
@click.option("--out", default="demo-run", show_default=True, type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out: Path, seed: int, workers: int, quiet: bool) -> None:
    """Generate the demo data, score, shard and train on it, and report against the truth."""
    from curate.demo.run import run_demo

    t0 = time.perf_counter()
    text = run_demo(out, seed=seed, workers=workers, progress=not quiet)
    click.echo(text)
    click.echo(f"demo finished in {time.perf_counter() - t0:.0f}s; report in {out / 'report.txt'}", err=True)


if __name__ == "__main__":
    sys.exit(main())
