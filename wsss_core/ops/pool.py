"""The process pool for per-image CPU work: dense CRF and mask rules of the per-image stages
(ir_labels, make_masks, the parts of `stages.common`), COCO conversion (`data.coco`) and
segmentation inference (`seg_inference`). Its workers end with the stage that started them
(`die_with`) and run one BLAS/OpenMP thread each.
"""
from __future__ import annotations

import multiprocessing
import os
import select
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def die_with(stage_pid: int) -> None:
    """Pool initializer (`initargs=(os.getpid(),)`): the worker ends as soon as the stage's
    process `stage_pid` is gone. A SIGKILLed stage otherwise leaves its workers running, and
    with them the fork server and multiprocessing's resource tracker (both stay up while any
    worker holds their pipes). The parent-death signal cannot do this: under `forkserver` a
    worker's parent is the fork server, which waits for its workers."""
    def watch() -> None:
        try:
            select.select([os.pidfd_open(stage_pid)], [], [])  # readable once it has exited
        except (AttributeError, OSError):  # no pidfd (old kernel), or already gone: poll
            while _running(stage_pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-stage", daemon=True).start()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _init_worker(stage_pid: int) -> None:
    die_with(stage_pid)
    # one BLAS/OpenMP thread per process: the pool itself provides the parallelism
    os.environ["OMP_NUM_THREADS"] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def pool_chunks(items: list[T], threads: int) -> list[tuple[T, ...]]:
    """`items` dealt round-robin into about 4 chunks per worker: a job per chunk opens the
    dataset index and the map stores once, not once per image."""
    n = max(1, int(threads)) * 4
    return [c for c in (tuple(items[i::n]) for i in range(n)) if c]


def map_pool(fn: Callable[[T], R], items: Iterable[T], threads: int = 1) -> list[R]:
    """`[fn(x) for x in items]`, spread over `threads` worker processes, results in input order.

    `threads <= 1` (or a single item) runs a plain loop in this process. Workers are started
    with the `forkserver` method (safe with an initialised torch), so `fn` and the items must be
    picklable (a module-level function and plain data such as ids and paths).
    """
    items = list(items)
    workers = min(int(threads), len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    chunksize = max(1, len(items) // (workers * 4))
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                             initializer=_init_worker, initargs=(os.getpid(),)) as pool:
        return list(pool.map(fn, items, chunksize=chunksize))
