"""What every gloo worker of the distributed tests shares (imported in the spawned processes,
which inherit the test session's ``sys.path``): the process-group start and the capture of what
each rank raised."""

from __future__ import annotations

import datetime

import torch.distributed as dist

#: Collective timeout of the test process groups: a hang fails within a minute.
TIMEOUT = datetime.timedelta(seconds=60)


def init_gloo(rank: int, world: int, init_file: str) -> None:
    """Join the gloo process group of ``world`` ranks that meet at the file ``init_file``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=TIMEOUT)


def outcome(fn) -> tuple[str, str]:
    """``("ok", "")``, or the class name and message of what ``fn()`` raised: the tests check
    that every rank raised the same class."""
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""
