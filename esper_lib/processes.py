"""Process pools for work that runs torch in parallel processes (trainings, evaluations)."""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor


def spawn_process_pool(workers: int) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes (no fork of a process holding torch threads)."""
    import multiprocessing

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
