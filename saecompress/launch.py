"""The processes of a data-parallel run: started here (torch.distributed's launcher) or by torchrun.

``run_ranks(nproc, fn, ...)`` starts ``nproc`` processes on this machine with torch.distributed's
elastic launcher (as ``torchrun --standalone`` does) and calls ``fn(..., group=Group)`` in each;
it returns every rank's result. When one rank fails, the launcher stops the others and the failure
becomes one ``SaeCompressError`` line (the rank, and what stopped it). ``environment_group`` joins a
run that ``torchrun`` started (its ``WORLD_SIZE`` / ``RANK`` / ``MASTER_*`` environment). Training runs
on the CPU, so the backend is gloo.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .distributed import LOCAL, Group
from .errors import SaeCompressError

BACKEND = "gloo"
TIMEOUT = timedelta(minutes=30)  # how long a collective waits for a rank that is alive but silent


def environment_group() -> Group:
    """This process's ``Group``: joins the process group torchrun (or ``run_ranks``) set up, else ``LOCAL``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return LOCAL
    if not dist.is_initialized():
        dist.init_process_group(backend=BACKEND, timeout=TIMEOUT)
    return Group(dist.get_rank(), dist.get_world_size())


def process_group(nproc: int) -> Group:
    """The ``Group`` of a command run with ``--nproc nproc``: torchrun's (refusing ``--nproc`` under it), else
    ``LOCAL`` (``run_ranks`` then starts the processes)."""
    group = environment_group()
    if group.world > 1 and nproc > 1:
        raise SaeCompressError(f"this process is rank {group.rank} of {group.world} started by torchrun: drop --nproc")
    return group


def run_id() -> str:
    """The name of the run this process belongs to (the same on every rank; empty outside one)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def run_ranks(nproc: int, fn: Callable[..., Any], *args: Any, threads: int | None = None, checkpoint: str = "",
              **kwargs: Any) -> Any:
    """``fn(*args, **kwargs, group=...)`` on ``nproc`` processes of this machine, ``threads`` torch threads each
    (default: the cores shared out); returns every rank's result, in rank order. ``checkpoint``: the file a failed
    run can resume from, for the error line."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise SaeCompressError(f"--nproc must be at least 1, got {nproc}")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"saecompress-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    quiet = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
             if name.startswith(("torch.distributed", "torch.multiprocessing"))]  # one error line is ours to print
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, _rank_main)(fn, args, kwargs, threads)
    except ChildFailedError as e:
        text = failure_message(e.failures, checkpoint)
        if text.startswith("rank "):  # a rank died mid-run: rank 0's progress bar may still hold the line
            sys.stderr.write("\n")
        raise SaeCompressError(text) from None
    except SignalException:  # Ctrl-C: the launcher passed it on to the ranks, which stopped at a checkpoint
        raise KeyboardInterrupt from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return [results[rank] for rank in range(nproc)]


def failure_message(failures: dict, checkpoint: str = "") -> str:
    """One line for the failed ranks of a run (``ProcessFailure`` by rank): the first cause, not its echoes
    (the ranks that then lost contact with it)."""
    def cause(failure) -> tuple[int, int, str]:
        if not isinstance(failure.message, dict):  # no exception recorded: a signal or an exit code
            return 1, failure.timestamp, _exit_text(failure)
        message = str(failure.message.get("message", ""))
        kind, _, text = message.partition(": ")
        if kind in _USER_ERRORS:
            return 0, failure.timestamp, text
        if kind == "RankLost":
            return 2, failure.timestamp, text
        return 1, failure.timestamp, message

    rank, failure = min(failures.items(), key=lambda item: cause(item[1])[:2])
    kind, _, text = cause(failure)
    if kind == 0:
        return text
    return (f"rank {rank} of the run stopped ({text}); the other ranks were stopped too. The last checkpoint"
            f"{f' {checkpoint}' if checkpoint else ''} is intact: rerun with --resume to continue")


_USER_ERRORS = ("SaeCompressError", "CannotWrite")


def _exit_text(failure) -> str:
    return f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"


def _rank_main(fn: Callable[..., Any], args: tuple, kwargs: dict, threads: int) -> Any:
    from torch.distributed.elastic.multiprocessing.errors import record

    torch.set_num_threads(threads)

    @record
    def main() -> Any:
        group = environment_group()
        try:
            return fn(*args, **kwargs, group=group)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    return main()
