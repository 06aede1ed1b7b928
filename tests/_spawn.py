"""Run a function on several ranks of a gloo process group on the CPU (torch.multiprocessing),
for the tests of distributed code: tests/fisher/test_distributed.py,
tests/core/test_masking_distributed.py, tests/evaluation/test_distributed_evaluation.py."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def run_spawned(worker: Callable[[int, int, str, str], None], tmp: Path, world: int = 2,
                limit_s: float = 240.0) -> list[dict]:
    """Start ``worker(rank, world, init_file, out_dir)`` on ``world`` spawned processes, wait at
    most ``limit_s`` seconds (then kill them and fail), and return what each rank saved with
    ``torch.save`` in ``out_dir/rank{rank}.pt``, in rank order. ``init_file`` is the file for
    ``init_process_group(init_method="file://...")``; ``worker`` must be importable by module
    name (defined at the top level of a module on ``sys.path``)."""
    ctx = mp.start_processes(worker, args=(world, str(tmp / "pg"), str(tmp)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {limit_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
