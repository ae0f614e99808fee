"""MB/s of `curate shard` vs `tar` copying the same image files, as a ratio in one run.

Both read the same files from a warm page cache and write one or more tars to the same disk.
`curate shard` keeps everything (--keep 1.0) so both move the same bytes; on top of `tar` it
runs the selection, adds the cls/json/importance members, shuffles across shards, hashes every
shard (sha256) and fsyncs it. Ratio = ours / tar; the goal is >= 0.5.

    python bench/throughput/shard_throughput.py [--images 2000]
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for common
import common  # noqa: E402

from curate.score.job import ScoreConfig, run_score  # noqa: E402
from curate.select.policies import SelectConfig  # noqa: E402
from curate.shard.job import ShardConfig, run_shard  # noqa: E402


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def time_tar(src: Path, dest: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["tar", "cf", str(dest), "-C", str(src), "."], check=True)
    subprocess.run(["sync", "-f", str(dest)], check=True)  # ours fsyncs each shard: so does tar here
    return time.perf_counter() - t0


def main() -> None:
    ap = common.parser(__doc__)
    common.int_options(ap, images=2000, samples_per_shard=250, repeats=3, workers=2)  # workers: curate shard's
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "photos"
        common.make_photos(src, args.images)
        common.random_proxy(tmp / "w.pt", 4)
        run_score(ScoreConfig(str(src), tmp / "scores", checkpoint=tmp / "w.pt", progress=False))
        mb = folder_bytes(src) / 1e6
        print(common.header(f"{args.images} JPEGs 500x375", f"{mb:.0f} MB", f"{args.samples_per_shard} samples/shard",
                            f"{args.workers} writer processes", f"best of {args.repeats}"))
        tar_s, ours_s = [], []
        for i in range(args.repeats):
            tar_s.append(time_tar(src, tmp / f"copy{i}.tar"))
            out = tmp / f"shards{i}"
            t0 = time.perf_counter()
            run_shard(ShardConfig(str(src), (tmp / "scores",), out, SelectConfig(keep=1.0, drop_label_issues=False),
                                  dedup=None, workers=args.workers,
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
