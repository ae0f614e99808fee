"""Shard writing: deterministic, atomically written WebDataset tars, resumable shard by shard.

Determinism: the same plan and the same sample data give byte-identical tars, in one run or
killed and resumed. Every header field is fixed: mtime FIXED_MTIME, uid/gid 0, uname/gname
TAR_OWNER, mode TAR_MODE, all ints (TarWriter 1.0.2 ignores its `format` argument, so tarfile
writes its default PAX format; with ASCII names under 100 chars and int fields that is plain
ustar headers, while a float mtime or a long name would add a PAX record). TarWriter writes a
sample's fields in sorted order, JSON is dumped with sorted keys, `.npy` uses numpy's v1.0
header (the repr of a fixed dict), and images are stored as given (PNG transcodes and the
JPEGs of `--max-side` depend on the Pillow, zlib and libjpeg versions). A shard is written as
`.NAME.tmp`, fsynced, then renamed, so a file under a final name is always complete. Resume
trusts that and re-reads an existing shard for its sha256 and keys rather than keeping a
sidecar: the tar stays the only truth, and a kill between rename and sidecar cannot leave the
two disagreeing. It refuses a shard whose keys
differ from the plan. What goes into a sample is the shard format's (curate.shard.format).
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import tarfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

from tqdm import tqdm
from webdataset import TarWriter

from curate.common.atomic import file_sha256, fsync_dir, tmp_path
from curate.common.runtime import die_with_parent
from curate.shard.format import ENCODERS, SampleData, ShardInfo, read_samples, sample_fields
from curate.shard.plan import ShardPlan

FIXED_MTIME = 0  # tar member mtime: TarWriter's default (time.time()) breaks reproducibility
TAR_OWNER = "curate"  # uname and gname of every member (uid/gid stay tarfile's default 0)
TAR_MODE = 0o444  # members are read-only data

Load = Callable[[Sequence[str]], Iterator[SampleData]]  # keys -> their samples, in that order


def write_shard(path: Path, samples: Iterable[SampleData]) -> ShardInfo:
    """Write one tar atomically: `.NAME.tmp`, fsync, rename. A failure removes the tmp file."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        count, sha256 = _write_tar(tmp, samples)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a SIGKILL still leaves it: the next run overwrites it
        raise
    fsync_dir(path.parent)  # make the rename itself durable
    return ShardInfo(path.name, count, sha256, path.stat().st_size)


class _HashingFile:
    """A write-only stream that hashes what goes through it: the shard's sha256 without reading
    the file back (tarfile's "w|" stream mode only ever calls write)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.f.write(data)


def _write_tar(tmp: Path, samples: Iterable[SampleData]) -> tuple[int, str]:
    """(samples written, sha256 of the file)."""
    seen: set[str] = set()
    with open(tmp, "wb") as f:  # "wb" truncates a tmp left by a killed run
        stream = _HashingFile(f)
        with TarWriter(stream, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE,
                       encoder=ENCODERS, mtime=FIXED_MTIME) as writer:
            # TarWriter ignores its `format` argument; set it on the stream. For our ASCII names
            # under 100 chars the bytes equal PAX's, and tarfile skips its per-member PAX checks.
            writer.tarstream.format = tarfile.USTAR_FORMAT
            for sample in samples:
                if sample.key in seen:  # webdataset would merge them or raise on read
                    raise ValueError(f"{tmp}: key {sample.key!r} written twice")
                seen.add(sample.key)
                writer.write(sample_fields(sample))  # one call: members stay contiguous
        f.flush()
        os.fsync(f.fileno())
    return len(seen), stream.sha256.hexdigest()


def write_split(
    out: Path,
    plan: ShardPlan,
    load: Load,
    resume: bool,
    progress: bool = True,
    workers: int = 1,
) -> list[ShardInfo]:
    """Write `OUT/{split}-{i:06d}.tar` for every shard of the plan.

    `load(keys)` yields SampleData for exactly those keys in that order. With `resume`, a
    shard whose final file exists is complete (it was renamed only once whole): it is
    re-read for its sha256 and keys instead of rewritten. Without it, every shard is rewritten.
    Exceptions from `load` propagate; the shards already renamed stay valid for a resume.
    `workers` > 1 writes shards in forked processes (Python's tarfile's cost per member caps one
    core: docs/benchmarks.md, "Shard writing"); each shard's bytes do not depend on it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out / name, keys) for name, keys in zip(plan.filenames, plan.shards)]
    with tqdm(total=plan.num_samples, desc=f"shards {plan.split}", unit="img",
              disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1 or len(jobs) <= 1:
            return [_one_shard(path, keys, load, resume, bar) for path, keys in jobs]
        return _parallel(jobs, load, resume, workers, bar)


def _one_shard(path: Path, keys: Sequence[str], load: Load,
               resume: bool, bar: tqdm | None) -> ShardInfo:
    if resume and path.exists():
        info = _existing_shard(path, keys)
        if bar is not None:
            bar.update(len(keys))
        return info
    return write_shard(path, _checked(load(keys), keys, bar))


_LOAD: Load | None = None  # set in forked workers


def _worker_init(load: Load) -> None:
    global _LOAD
    die_with_parent()  # a killed job leaves no writer behind
    _LOAD = load


def _worker_shard(job: tuple[Path, Sequence[str], bool]) -> ShardInfo:
    assert _LOAD is not None
    return _one_shard(job[0], job[1], _LOAD, job[2], None)


def _parallel(jobs: list[tuple[Path, Sequence[str]]], load: Load,
              resume: bool, workers: int, bar: tqdm) -> list[ShardInfo]:
    # fork: workers inherit `load` (the item index, the scores) instead of unpickling it per task
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_worker_init, initargs=(load,)) as pool:
        infos = []
        for info in pool.imap(_worker_shard, [(path, keys, resume) for path, keys in jobs]):
            bar.update(info.count)
            infos.append(info)
    return infos


def _checked(
    samples: Iterator[SampleData], keys: Sequence[str], bar: tqdm | None
) -> Iterator[SampleData]:
    """Pass samples on, failing if `load` strays from the requested keys and order."""
    n = 0
    for n, sample in enumerate(samples, 1):
        if n > len(keys) or sample.key != keys[n - 1]:
            expected = keys[n - 1] if n <= len(keys) else "nothing more"
            raise ValueError(f"load() yielded {sample.key!r} at position {n}, expected {expected}")
        if bar is not None:
            bar.update(1)
        yield sample
    if n != len(keys):
        raise ValueError(f"load() yielded {n} samples for {len(keys)} keys")


def _existing_shard(path: Path, keys: Sequence[str]) -> ShardInfo:
    found = [s["__key__"] for s in read_samples(path)]
    if found != list(keys):
        raise ValueError(f"{path} exists but holds other keys than the plan (the selection or "
                         "shard settings changed?): write to a new folder or do not resume")
    return ShardInfo(path.name, len(found), file_sha256(path), path.stat().st_size)
