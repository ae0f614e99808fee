"""MB/s of `curate shard` vs `tar` copying the same image files, as a ratio in one run.

Both read the same files from a warm page cache and write one or more tars to the same disk.
`curate shard` keeps everything (--keep 1.0) so both move the same bytes; on top of `tar` it
runs the selection, adds the cls/json/importance members, shuffles across shards, hashes every
shard (sha256) and fsyncs it. Ratio = ours / tar; the goal is >= 0.5.

    python bench/throughput/shard_throughput.py [--images 2000]
"""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from score_throughput import make_photos  # noqa: E402  (same photo-like JPEGs)

from curate.score.job import ScoreConfig, run_score  # noqa: E402
from curate.score.proxies import create_model, resolve_recipe  # noqa: E402
from curate.shard.job import ShardConfig, run_shard  # noqa: E402


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def time_tar(src: Path, dest: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["tar", "cf", str(dest), "-C", str(src), "."], check=True)
    subprocess.run(["sync", "-f", str(dest)], check=True)  # ours fsyncs each shard: so does tar here
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--samples-per-shard", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="curate shard --workers")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "photos"
        make_photos(src, args.images)
        recipe = resolve_recipe("demo-vit")
        torch.manual_seed(0)
        torch.save(create_model(recipe, 4).state_dict(), tmp / "w.pt")
        run_score(ScoreConfig(str(src), tmp / "scores", checkpoint=tmp / "w.pt", progress=False))
        mb = folder_bytes(src) / 1e6
        print(f"# {platform.machine()}, {args.images} JPEGs 500x375, {mb:.0f} MB, "
              f"{args.samples_per_shard} samples/shard, {args.workers} writer processes, best of {args.repeats}")
        tar_s, ours_s = [], []
        for i in range(args.repeats):
            tar_s.append(time_tar(src, tmp / f"copy{i}.tar"))
            out = tmp / f"shards{i}"
            t0 = time.perf_counter()
            run_shard(ShardConfig(str(src), (tmp / "scores",), out, keep=1.0, workers=args.workers,
                                  samples_per_shard=args.samples_per_shard, progress=False))
            ours_s.append(time.perf_counter() - t0)
            shutil.rmtree(out)
            (tmp / f"copy{i}.tar").unlink()
        tar_rate, ours_rate = mb / min(tar_s), mb / min(ours_s)
        print("| | seconds | MB/s |\n|---|---|---|")
        print(f"| tar cf | {min(tar_s):.2f} | {tar_rate:.0f} |")
        print(f"| curate shard --keep 1.0 | {min(ours_s):.2f} | {ours_rate:.0f} |")
        print(f"ratio curate/tar = {ours_rate / tar_rate:.2f}")


if __name__ == "__main__":
    main()
