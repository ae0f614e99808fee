"""Peak memory of `curate score` and `curate shard` at two dataset sizes, as a ratio.

Each stage runs as its own `python cli.py ...` subprocess, so one stage's allocations never
count against the next. Two peaks per stage:

- max RSS: the largest single process of the stage (`os.wait4` rusage of the child, which on
  Linux includes the decode and shard-writer processes it forked and reaped);
- tree PSS: the sum of proportional set sizes over the child and all its descendants, sampled
  from /proc every `--sample-s` seconds. PSS splits pages shared after `fork` between the
  processes that share them, so this is the stage's real footprint, which RSS summed over
  the tree would count several times.

A first process that only imports the stages' modules gives the floor (torch, timm, faiss...) that
both peaks stand on; the report also gives the growth per added image, which the floor hides.

The images are tiny random JPEGs in ImageFolder layout: every file differs (keys come from the
file names; random 8x8 colour layouts make the thumbnails distinct, so `--dedup` keeps almost
all of them and the shard stage writes about `--keep` of N). The proxy is the demo ViT at
`--side` px with random weights from `--checkpoint`: no training, since memory is the point,
and a ViT so that every row carries an importance map for the shards.

    python bench/throughput/memory_scale.py [--small 10000] [--large 100000] [--keep-files DIR]

Goal: peak(large) / peak(small) <= 1.5 for every stage.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.score.table import THUMB_SIDE  # noqa: E402


@dataclass(frozen=True)
class Peak:
    stage: str
    images: int
    max_rss_mib: float  # largest single process
    tree_pss_mib: float  # sum over the process tree, sampled
    seconds: float


# --- data -----------------------------------------------------------------------------------


def _jpeg(rng: np.random.Generator, side: int, quality: int) -> bytes:
    """A random 8x8 colour layout upscaled to side x side: distinct thumbnails, small files."""
    base = rng.integers(0, 256, size=(THUMB_SIDE, THUMB_SIDE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).resize((side, side), Image.BILINEAR).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_images(root: Path, n: int, classes: int, side: int, seed: int) -> None:
    """`root/c{k}/img_{i}.jpg`, reused when a previous call made the same set (stamp file)."""
    stamp = {"n": n, "classes": classes, "side": side, "seed": seed}
    stamp_path = root.parent / f"{root.name}.json"
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    folders = [root / f"c{k}" for k in range(classes)]
    for folder in folders:
        folder.mkdir(parents=True)
    for i in range(n):
        (folders[i % classes] / f"img_{i:07d}.jpg").write_bytes(_jpeg(rng, side, quality=90))
    stamp_path.write_text(json.dumps(stamp))


# --- measuring ------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    """ppid -> pids of every process visible in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_kib(root: int) -> int:
    """PSS of `root` and all its descendants, in KiB."""
    children, todo, total = _children_map(), [root], 0
    while todo:
        pid = todo.pop()
        total += _pss_kib(pid)
        todo.extend(children.get(pid, []))
    return total


def run_measured(stage: str, images: int, cmd: list[str], log: Path, sample_s: float) -> Peak:
    """Run `cmd`, sampling its tree's PSS until it exits; its own rusage gives the max RSS."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=out, stderr=subprocess.STDOUT)
        pss = 0
        while True:
            # wait4, not Popen.wait: it returns this child's rusage alone, whatever ran before.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            pss = max(pss, tree_pss_kib(proc.pid))
            time.sleep(sample_s)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{stage} failed ({proc.returncode}): see {log}\n{log.read_text()[-2000:]}")
    # Linux reports ru_maxrss in KiB
    return Peak(stage, images, usage.ru_maxrss / 1024, pss / 1024, time.perf_counter() - t0)


def score_cmd(src: Path, out: Path, ckpt: Path, side: int, batch: int) -> list[str]:
    return common.cli("score", src, "--out", out, "--proxy", "demo-vit", "--checkpoint", ckpt, "--image-size", side,
                      "--batch-size", batch, "--device", "cpu", "--quiet", "--overwrite")


def shard_cmd(src: Path, scores: Path, out: Path, keep: float, dedup: float) -> list[str]:
    return common.cli("shard", src, "--scores", scores, "--out", out, "--keep", keep, "--dedup", dedup,
                      "--dedup-on", "thumbnail", "--quiet", "--overwrite")


def measure_size(n: int, work: Path, args: argparse.Namespace) -> list[Peak]:
    """Generate n images (or reuse them), then score and shard them in separate processes."""
    work.mkdir(parents=True, exist_ok=True)
    src, ckpt = work / "images", work / "w.pt"
    make_images(src, n, args.classes, args.side, args.seed)
    common.random_proxy(ckpt, args.classes, "demo-vit", args.side)
    peaks = []
    if "score" in args.stages:
        cmd = score_cmd(src, work / "scores", ckpt, args.side, args.batch_size)
        peaks.append(run_measured("score", n, cmd, work / "score.log", args.sample_s))
    if "shard" in args.stages:
        cmd = shard_cmd(src, work / "scores", work / "shards", args.keep, args.dedup)
        peaks.append(run_measured("shard", n, cmd, work / "shard.log", args.sample_s))
    return peaks


# --- report ---------------------------------------------------------------------------------


def versions() -> list[str]:
    """The libraries whose allocations the peaks hold, beside torch."""
    import faiss
    import polars
    import pyarrow

    return [f"python {platform.python_version()}", f"polars {polars.__version__}", f"pyarrow {pyarrow.__version__}",
            f"faiss {faiss.__version__}"]


def thumbnail_matrix_mib(n: int) -> float:
    """The float32 thumbnail matrix dedup needs: the memory allowed to grow with N."""
    return n * 3 * THUMB_SIDE ** 2 * 4 / 2 ** 20


def measure_imports(work: Path, sample_s: float) -> Peak:
    """A process that only imports what both stages import (torch, timm, polars, faiss...): the
    floor under every peak, so growth with N can be told apart from it."""
    cmd = [sys.executable, "-c", "import cli, curate.score.job, curate.shard.job"]
    return run_measured("imports only", 0, cmd, work / "imports.log", sample_s)


def report(imports: Peak, small: list[Peak], large: list[Peak]) -> str:
    lines = ["| stage | images | max RSS MiB | tree PSS MiB | seconds | thumbnail matrix MiB |",
             "|---|---|---|---|---|---|"]
    for p in [imports, *small, *large]:
        lines.append(f"| {p.stage} | {p.images} | {p.max_rss_mib:.0f} | {p.tree_pss_mib:.0f} | {p.seconds:.0f} | "
                     f"{thumbnail_matrix_mib(p.images):.1f} |")
    per_image = thumbnail_matrix_mib(1) * 2 ** 20
    for s, lg in zip(small, large):
        grew = lg.max_rss_mib - s.max_rss_mib
        lines.append(f"ratio {lg.stage} {lg.images}/{s.images}: max RSS {lg.max_rss_mib / s.max_rss_mib:.2f}x, "
                     f"tree PSS {lg.tree_pss_mib / s.tree_pss_mib:.2f}x; max RSS grew {grew:.0f} MiB = "
                     f"{grew * 2 ** 20 / (lg.images - s.images):.0f} B per added image "
                     f"(thumbnail matrix: {per_image:.0f} B per image)")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    ap = common.parser(__doc__)
    ap.add_argument("--small", type=int, default=10_000, help="images in the small run")
    ap.add_argument("--large", type=int, default=100_000, help="images in the large run")
    ap.add_argument("--keep-files", type=Path, help="keep images and outputs here (images are reused)")
    ap.add_argument("--stages", type=common.words, default="score,shard",
                    help="comma-separated: score, shard (shard needs the scores of a run kept with --keep-files)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--side", type=int, default=32, help="image side and proxy input in px")
    ap.add_argument("--batch-size", type=int, default=1024, help="curate score --batch-size")
    ap.add_argument("--keep", type=float, default=0.7, help="curate shard --keep")
    ap.add_argument("--dedup", type=float, default=0.93, help="curate shard --dedup (on thumbnails)")
    ap.add_argument("--sample-s", type=float, default=0.2, help="PSS sampling period")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not set(args.stages) <= {"score", "shard"} or not args.stages:
        ap.error(f"--stages takes score and/or shard, got {args.stages}")
    return args


def main() -> None:
    args = parse_args()
    print(common.header(*versions()), flush=True)
    print(f"# {args.side}px JPEGs, {args.classes} classes; score: demo-vit@{args.side} random checkpoint, "
          f"batch {args.batch_size}; shard: --keep {args.keep} --dedup {args.dedup} (thumbnail)", flush=True)
    tmp = None if args.keep_files else tempfile.TemporaryDirectory()
    base = args.keep_files or Path(tmp.name)
    try:
        base.mkdir(parents=True, exist_ok=True)
        imports = measure_imports(base, args.sample_s)
        small = measure_size(args.small, base / f"n{args.small}", args)
        large = measure_size(args.large, base / f"n{args.large}", args)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(report(imports, small, large))


if __name__ == "__main__":
    main()
