"""What every stage entry point shares: argument parsing, logging, errors, device, seeds."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import WSSSError
from ..param_schema import check_stage_params, fill_stage_defaults

log = logging.getLogger("wsss")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"wsss {prog}", description=description)
    p.add_argument("--log", help="log file (written beside the outputs by the workflow)")
    return p


def json_arg(text: str) -> Any:
    """argparse type for JSON parameter blocks passed by the Snakemake rules."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None


def process_rank() -> int:
    """This process's rank under torchrun (0 when run directly)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(log_path: str | None) -> list[logging.Handler]:
    """INFO to stderr and the log file; under torchrun only rank 0 logs to the file, the other
    ranks print warnings and errors to stderr, prefixed with their rank."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    rank = process_rank()
    if log_path and rank == 0:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers,
                        force=True, datefmt="%H:%M:%S",
                        format="%(asctime)s %(message)s" if rank == 0 else
                        f"%(asctime)s [rank {rank}] %(message)s")
    return handlers


#: errors of the file system, not of wsss: what the user can do about each
WRITE_ERRORS = {
    errno.ENOSPC: "free space on that disk and re-run",
    errno.EDQUOT: "free space within your quota and re-run",
    errno.EFBIG: "the file size limit (ulimit -f) is too low; raise it and re-run",
    errno.EROFS: "the file system is read-only; point `results` at a writable folder",
    errno.EACCES: "you may not write there; fix the folder's permissions or `results`",
}


def log_params(stage: str, params: dict) -> None:
    """Write the resolved parameter block at the top of the stage log, one key a line (where
    each value comes from: `wsss params DATASET METHOD STAGE`, or `wsss explain OUTPUT`)."""
    log.info("parameters of %s (their sources: wsss params DATASET METHOD %s):", stage, stage)
    for key in sorted(params):
        log.info("  %s = %s", key, json.dumps(params[key], sort_keys=True))


def run_stage(args: argparse.Namespace, fn: Callable[..., Any], *, stage: str | None = None,
              **kwargs) -> int:
    """Run a stage function with logging: `fn(**kwargs)`.

    Args:
        args: the parsed command line; its `log` is the log file, and with `stage` its
            `params` is the stage's parameter block.
        fn: the stage function.
        stage: the stage whose schema (schemas/stages/<stage>.schema.yaml) `args.params` must
            satisfy; the block is checked before `fn` runs, the keys it leaves out that the
            schema gives a default are set (in place), and it is written at the top of the log.

    Returns: 0, or 2 after a WSSSError (one line: a `--params` block with an unknown or missing
    key, or a value out of range, is a ConfigError naming the stage and the key) or a write
    error of the file system. Other exceptions are logged as bugs and raised."""
    handlers = setup_logging(getattr(args, "log", None))
    start = time.perf_counter()
    try:
        if stage is not None:
            check_stage_params(stage, args.params)
            log_params(stage, fill_stage_defaults(stage, args.params))
        fn(**kwargs)
        log.info("done in %.1f s", time.perf_counter() - start)
        return 0
    except WSSSError as e:
        if os.environ.get("WSSS_DEBUG") == "1":
            raise
        log.error("wsss: error: %s", e)
        return 2
    except OSError as e:
        if e.errno not in WRITE_ERRORS or os.environ.get("WSSS_DEBUG") == "1":
            log.exception("wsss: unexpected error (a bug; please report it with this log)")
            raise
        log.error("wsss: error: %s: cannot write (%s); %s", e.filename or "output",
                  e.strerror.lower(), WRITE_ERRORS[e.errno])
        return 2
    except Exception:
        log.exception("wsss: unexpected error (a bug; please report it with this log)")
        raise
    finally:
        # a stage run in-process (tests, notebooks) must not leave handlers on streams that
        # close after it: the log file, or a captured stderr
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(preference: str | None = None):
    """CUDA when present (or WSSS_DEVICE / preference says so), CPU otherwise; under torchrun
    the GPU of this process's LOCAL_RANK."""
    import torch
    pref = preference or os.environ.get("WSSS_DEVICE", "auto")
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(pref)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def set_threads(threads: int | None) -> None:
    """Use `threads` (the job's cores), shared evenly by the processes torchrun started on
    this machine."""
    import torch
    if threads:
        per_process = int(threads) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, per_process))


#: images per CPU worker below which a map-store stage computes in its own process: starting
#: a worker (torch import, model load) costs about as much as 30 small images
IMAGES_PER_WORKER = 32


def image_workers(threads: int | None, images: int, device) -> int:
    """Worker processes for a per-image stage on `device`: on CPU one per thread, each with
    one thread (batch-2 forwards of single images keep a second thread of the same process
    mostly idle), and at least IMAGES_PER_WORKER images each; 1 on CUDA."""
    if getattr(device, "type", "cpu") != "cpu":
        return 1
    return max(1, min(int(threads or 1), images // IMAGES_PER_WORKER))


def blocks(ids: list[str], n: int) -> list[tuple[str, ...]]:
    """`ids` cut into `n` contiguous blocks whose sizes differ by at most one."""
    return [tuple(ids[i * len(ids) // n:(i + 1) * len(ids) // n]) for i in range(n)]


def write_in_parts(out: str | os.PathLike, attrs: dict, image_ids: list[str], workers: int,
                   make_part: Callable[[tuple[str, ...], str], Any], run_part: Callable[[Any], Any],
                   dtype: str = "float16") -> None:
    """Write map store `out` (file attributes `attrs`) with `workers` processes: `image_ids`
    is cut into contiguous blocks, `make_part(block, path)` describes one worker's job (plain,
    picklable data), `run_part(job)` (a module-level function) writes that block's store at
    `path`, and each image's group is then copied into `out` as stored, in `image_ids` order:
    the file equals one written in a single pass.

    The parts live in a temporary folder beside `out`, made after `out`'s own temporary, so a
    killed run's parts are removed as stale by the next run's writer."""
    import shutil
    import tempfile

    from ..map_store import MapReader, MapWriter
    from ..ops.pool import map_pool

    out = Path(out)
    with MapWriter(out, attrs, dtype=dtype) as writer:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.parts.", suffix=".tmp", dir=out.parent))
        try:
            cut = blocks(image_ids, workers)
            paths = [str(tmp / f"part{k}.h5") for k in range(len(cut))]
            map_pool(run_part, [make_part(block, path) for block, path in zip(cut, paths)], workers)
            for block, path in zip(cut, paths):
                with MapReader(path) as reader:
                    for image_id in block:
                        writer.copy_image(reader, image_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def start_training(seed: int, threads: int | None):
    """What a training stage does first: use `threads`, seed every generator with `seed`.
    Returns the device it trains on (get_device)."""
    set_threads(threads)
    seed_everything(seed)
    return get_device()
