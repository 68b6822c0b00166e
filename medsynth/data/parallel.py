"""Worker processes and progress bars shared by the header scan and the per-case preprocessing."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Any


def process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes, each with one torch thread.

    Args:
        workers: Number of processes.

    Returns:
        The pool (use it as a context manager).
    """
    # spawn: torch and MONAI are not fork-safe once their thread pools are up.
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init
    )


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def progress_bar(total: int, desc: str, *, enabled: bool) -> Any:
    """Progress on stderr labelled ``preprocess: <desc>``, counting cases (``desc="cases"``) or files.

    Args:
        total: Number of steps.
        desc: What is counted.
        enabled: ``False`` gives a bar that shows nothing.

    Returns:
        The bar (``update``, ``close``): a tqdm bar on a terminal, whole lines in a log file
        (:func:`medsynth.progress.progress_bar`).
    """
    from medsynth.progress import progress_bar as make_bar

    return make_bar(
        total=total, desc=f"preprocess: {desc}", unit="case" if desc == "cases" else "file", enabled=enabled, leave=False
    )
