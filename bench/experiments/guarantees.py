"""The hostile and newcomer cases of issue 26, each run through the CLI in its own process, with
what came out: a one-line message, an error row, a refusal before work, or (what must not
happen) a traceback, a hang, secret bytes in an output, a file lost. Prints a Markdown table.

    python bench/experiments/guarantees.py [--work DIR]

The cases are built with the test suite's helpers (tests/test_guarantees.py), which assert the
same outcomes; this script shows them side by side, for docs/benchmarks.md.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from tests.sparse_fixtures import write_shards  # noqa: E402
from tests.test_guarantees import SECRET, TINY, broken, hostile_images, image_folder  # noqa: E402

Row = tuple[str, str]


def curate(*args: object, timeout: float = 300) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `curate ARGS` in a process of its own; 124 on a hang."""
    try:
        proc = subprocess.run(common.cli(*args), cwd=common.ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "", "HANG: killed after the timeout"
    return proc.returncode, proc.stdout, proc.stderr


# A parent whose only child is the measured command: its RUSAGE_CHILDREN peak is that command's.
_PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_mb(*args: object) -> float:
    """Peak resident memory of `curate ARGS`, in MB."""
    cmd = [sys.executable, "-c", _PEAK, *common.cli(*args)]
    return int(subprocess.run(cmd, cwd=common.ROOT, capture_output=True, text=True, timeout=300).stdout) / 1024


def outcome(code: int, out: str, err: str) -> str:
    """The message a user sees, shortened, and whether it came with a traceback."""
    text = out + err
    if "Traceback" in text:
        return f"TRACEBACK (exit {code}): {text.strip().splitlines()[-1][:120]}"
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(("Error", "FAULT"))] or text.strip().splitlines()
    return f"exit {code}: " + " / ".join(ln.strip()[:160] for ln in lines[:2])


def predict_cases(work: Path, run: Path) -> list[Row]:
    rows: list[Row] = []
    images = image_folder(work / "valcopy")
    precious = work / "precious.txt"
    precious.write_text("mine")
    image_bytes = (images / "img0.jpg").read_bytes()
    for label, args in (("--out over precious.txt", ("--out", precious)),
                        ("--out over an input image (with --overwrite)", ("--out", images / "img0.jpg", "--overwrite")),
                        ("--export over an input image", ("--export", images / "img1.jpg")),
                        ("--out nodir/p.parquet", ("--out", work / "nodir" / "p.parquet")),
                        ("--out an existing directory", ("--out", work)),
                        ("--export into a missing folder", ("--export", work / "nodir" / "m.pt2"))):
        rows.append((f"predict {label}", outcome(*curate("predict", run, images, *args, "--workers", "0"))))
    intact = precious.read_text() == "mine" and (images / "img0.jpg").read_bytes() == image_bytes
    leftovers = sorted(p.name for p in work.glob(".*.tmp"))
    rows.append(("predict: files after the refusals", f"precious.txt and the images intact: {intact}; "
                                                      f".tmp left: {leftovers or 'none'}"))
    hostile = hostile_images(work / "hostile")
    with open(hostile / "three-gib.jpg", "wb") as f:  # the 3 GiB file (sparse: no disk used)
        f.truncate(3 << 30)
    files = len(list(hostile.iterdir()))
    out = work / "hostile.parquet"
    code, o, e = curate("predict", run, hostile, "--out", out, "--workers", "0")
    rss = peak_mb("predict", run, hostile, "--out", work / "again.parquet", "--workers", "0")
    table = pl.read_parquet(out) if out.exists() else None
    if table is None:
        return rows + [("predict on hostile IMAGES", outcome(code, o, e))]
    leak = SECRET in "\n".join(map(str, table.to_dicts())) + o + e
    for path, label, name, err in table.select("path", "label", "class_name", "error").iter_rows():
        shown = f"error row: {err[:110]}" if err else f"predicted {label} ({name})"
        rows.append((f"predict IMAGES/{Path(path).name}", shown))
    rows.append(("predict on hostile IMAGES, as a whole", f"exit {code}, {table.height} rows for {files} files, secret "
                 f"bytes in any output: {leak}, peak RSS {rss:.0f} MB with a 3 GiB file among them"))
    for label, bad in checkpoint_cases(work, run).items():
        rows.append((f"predict with a checkpoint: {label}",
                     outcome(*curate("predict", bad, images, "--out", work / "x.parquet"))))
    return rows


def checkpoint_cases(work: Path, run: Path) -> dict[str, Path]:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    (work / "text.pt").write_text("not a checkpoint\n")
    cases = {"a text file": work / "text.pt"}
    for key, value in (("img_size", 100000), ("keep", 5), ("patch_size", 0)):
        edited = json.loads(json.dumps(state["config"])) | {key: value}
        torch.save(state | {"config": edited}, work / f"{key}.pt")
        cases[f"config {key} {value}"] = work / f"{key}.pt"
    return cases


def shard_cases(work: Path) -> list[Row]:
    rows: list[Row] = []
    for kind in ("cls=1000000000000", "cls=-1", "cls=-100", "cls=4", "num_classes=0", "num_classes=-1",
                 "num_classes=1000000000", 'num_classes="three"', "count=50", "count=-2", "duplicate"):
        shards = write_shards(work / f"shards-{kind}", per_class=4, multiple=2, per_shard=4)
        broken(kind, shards)
        rows.append((f"verify: {kind}", outcome(*curate("verify", shards))))
        rows.append((f"train: {kind}", outcome(*curate("train", shards, "--out", work / f"run-{kind}", *TINY,
                                                      "--epochs", "1", "--workers", "0"))))
    return rows


def loss_cases(work: Path) -> list[Row]:
    shards = write_shards(work / "s25", per_class=8, multiple=2, per_shard=7, train_samples=25,
                          corrupt=lambda key: key == "train-0-0003")
    code, out, err = curate("train", shards, "--out", work / "r25", *TINY[:-1], "--epochs", "1", "--workers", "2")
    epoch = [json.loads(line) for line in (work / "r25" / "metrics.jsonl").read_text().splitlines()][-1]
    console = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("note:") or ": loss " in ln]
    return [("train 25 samples, batch 8, 2 workers, 1 undecodable",
             f"exit {code}: unused {epoch['unused']} of 25 ({epoch['unused'] / 25:.0%}), skipped {epoch['skipped']}; "
             f"console: {' / '.join(console)}"),
            ("train: the end of the run", " / ".join(out.strip().splitlines()))]


def settings_cases(work: Path, demo: Path, scores: Path) -> list[Row]:
    rows: list[Row] = []
    for size in ("1", "0", "100000"):
        out = work / f"score-{size}"
        res = outcome(*curate("score", demo / "train", "--out", out, "--train-epochs", "1", "--image-size", size,
                              "--quiet"))
        rows.append((f"score --image-size {size}", f"{res}; --out created: {out.exists()}"))
    out = work / "score-folds"
    res = outcome(*curate("score", demo / "train", "--out", out, "--train-epochs", "1", "--folds", "20", "--quiet"))
    rows.append(("score --folds 20 (small classes)", f"{res}; --out created: {out.exists()}"))
    for keep in ("2.0", "1", "-1"):
        code, out_, err = curate("shard", demo / "train", "--scores", scores, "--out", work / "o", "--keep", keep,
                                 "--dry-run")
        kept = [ln for ln in err.splitlines() if "inputs:" in ln]
        shown = outcome(code, out_, err) if code else f"exit 0: {kept[0] if kept else ''}"
        rows.append((f"shard --keep {keep}", shown))
    for column in ("key", "class_name", "embedding", "importance"):
        rows.append((f"shard --by {column}", outcome(*curate("shard", demo / "train", "--scores", scores, "--out",
                                                             work / "o", "--by", column, "--dry-run"))))
    rows.append(("train SCORES_FOLDER", outcome(*curate("train", scores, "--out", work / "rs"))))
    shards = work / "real-shards"
    curate("shard", demo / "train", "--scores", scores, "--out", shards, "--quiet")
    rows.append(("shard --scores SHARDS_FOLDER", outcome(*curate("shard", demo / "train", "--scores", shards,
                                                                "--out", work / "o2"))))
    help_text = curate("train", "--help")[1]
    rows.append(("train --help on --num-classes",
                 " ".join(help_text.split("--num-classes", 1)[1].split("--epochs")[0].split())))
    return rows


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--work", type=Path, help="Folder for the cases [default: a temporary one].")
    args = ap.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="guarantees-"))).resolve()  # the CLI runs in the checkout
    work.mkdir(parents=True, exist_ok=True)
    from curate.demo.data import DemoConfig, make_demo

    demo = work / "demo"
    make_demo(DemoConfig(root=demo, classes=3, per_class=12, val_per_class=2, seed=1))
    scores = work / "scores"
    common.random_proxy(work / "w.pt", classes=3)
    curate("score", demo / "train", "--out", scores, "--checkpoint", work / "w.pt", "--workers", "0", "--quiet")
    toy = write_shards(work / "toy", per_class=4)
    run = work / "run"
    curate("train", toy, "--out", run, *TINY, "--epochs", "1", "--workers", "0")
    rows = predict_cases(work, run) + shard_cases(work) + loss_cases(work) + settings_cases(work, demo, scores)
    print("| case | outcome |\n|---|---|")
    for case, result in rows:
        print(f"| {case} | {result.replace('|', '/')} |")


if __name__ == "__main__":
    main()
