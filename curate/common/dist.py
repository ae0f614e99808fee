"""Process groups for jobs launched with torchrun: set up from the environment, always torn down.

torchrun (`python -m torch.distributed.run`) starts one process per rank and tells each its place
through WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Jobs take a `Dist` and use
only the few collectives below; with one process every one of them is a plain function call, so a
job has a single code path.

Only small Python objects cross ranks (index hashes, part lists, errors, timings), never tensors,
so a group `session` creates uses gloo, also on GPU nodes: NCCL would need each rank pinned to its
device before the first collective and gains nothing for a few hundred bytes. A group that already
exists is used as it is: `curate train` creates its own (nccl on CUDA, after pinning each rank's
device; sparsevit/train.py), and these collectives then run over it.
"""
from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch.distributed as tdist

T = TypeVar("T")

# Long, because a rank may wait at a collective while rank 0 trains the proxy alone (hours on a
# large dataset). A crashed rank does not leave the others hanging for this long: torchrun stops
# every worker as soon as one fails.
DEFAULT_TIMEOUT = timedelta(days=7)
BACKEND = "gloo"


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # rank on this node: picks the GPU

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            tdist.barrier()

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (the others pass anything, e.g. None)."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; every rank returns its result, or raises its error."""
        return self._on_main(fn, share=True)

    def main_only(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only (its result stays there; None elsewhere); every rank waits for
        it and raises its error, so a failure on rank 0 is a clean error everywhere, not a hang."""
        return self._on_main(fn, share=False)

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0, then on the other ranks: for work whose first run leaves a result
        on disk (a download cache, a finished training state) that the later runs only read."""
        result = self.main_only(fn)
        return result if self.is_main else fn()  # type: ignore[return-value]

    def deal(self, jobs: Sequence[T], fn: Callable[[T], Any], first_rank: int = 0) -> None:
        """Run `fn(job)` for the jobs dealt out round-robin, job 0 to `first_rank` (so rank 0,
        which has other work of its own, can be dealt the fewest), then wait for every rank; an
        error on any rank is raised on every rank, not a hang."""
        error: BaseException | None = None
        try:
            for job in jobs[(self.rank - first_rank) % self.world_size::self.world_size]:
                fn(job)
        except Exception as e:  # noqa: BLE001 - handed to every rank, re-raised below
            error = e
        errors = self.all_gather(_picklable(error, self.rank))
        if error is not None:
            raise error
        if first := next((e for e in errors if e is not None), None):
            raise first

    def _on_main(self, fn: Callable[[], T], share: bool) -> Any:
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to every rank, re-raised below
                error = e
        sent = self.broadcast((result if share else None, _picklable(error, 0)))
        if self.is_main and error is not None:
            raise error
        if sent[1] is not None:
            raise sent[1]
        return result if self.is_main else sent[0]


def _picklable(error: BaseException | None, rank: int) -> BaseException | None:
    """The error itself when it survives pickling (keeps its type for the CLI), else its text."""
    if error is None:
        return None
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(f"{type(error).__name__} on rank {rank}: {error}")


def launched() -> bool:
    """True in a process that torchrun started as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def session(required: bool = False, timeout: timedelta = DEFAULT_TIMEOUT) -> Iterator[Dist]:
    """This process's `Dist`: a gloo group when launched by torchrun with WORLD_SIZE > 1, torn
    down on exit whatever happens; a group that already exists (the caller's) is used and kept.

    `required` (the --distributed flag) turns a plain launch into an error instead of a silent
    single-process run, which would score everything once per intended rank.
    """
    if not launched():
        if required:
            raise ValueError("--distributed needs a torchrun launch (WORLD_SIZE > 1 is not set), e.g. "
                             "torchrun --nproc_per_node N cli.py score ...; drop --distributed to run "
                             "as a single process")
        yield Dist()
        return
    if tdist.is_initialized():
        yield _from_group()
        return
    tdist.init_process_group(BACKEND, timeout=timeout)
    try:
        yield _from_group()
    finally:
        tdist.destroy_process_group()


def _from_group() -> Dist:
    return Dist(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
