"""The distributed Fisher case shared by tests/fisher/test_distributed.py and its torchrun launches.

As a script (under torchrun): ``python -m torch.distributed.run ... _ddp_fisher_script.py OUT``
initialises gloo from the torchrun environment, computes the Fisher of :func:`build_case` in
memory and streamed, and rank 0 writes ``OUT`` (torch.save).
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from deepclean import fisher_diagonal

N = 101
N_FORGET = 20
TIMEOUT = datetime.timedelta(seconds=60)


def build_model() -> nn.Module:
    """A small float64 CNN (Conv2d, BatchNorm2d with non-default statistics, Linear); every
    weight and buffer drawn from one fixed generator."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5),
    ).to(torch.float64)
    g = torch.Generator().manual_seed(2024)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def build_tensors(n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` float64 inputs of shape (1, 8, 8) and labels in [0, 5), from a fixed generator."""
    g = torch.Generator().manual_seed(7)
    return (torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (n,), generator=g))


class Streamed(Dataset):
    """The same samples as :func:`build_tensors`, served one at a time (not a TensorDataset), so
    ``fisher_diagonal`` streams them through a DataLoader. ``nan_at``: that sample's input is NaN."""

    def __init__(self, n: int = N, nan_at: int | None = None) -> None:
        x, y = build_tensors()
        self.x, self.y = x[:n], y[:n]
        self.nan_at = nan_at
        self.reads: list[int] = []  # the indices read, in order

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        self.reads.append(i)
        x = self.x[i] * float("nan") if i == self.nan_at else self.x[i]
        return x, self.y[i]


def one_process_results(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The Fishers the distributed runs must reproduce, computed by this process alone."""
    x, y = build_tensors()
    return {
        "memory": fisher_diagonal(model, TensorDataset(x, y), batch_size=16, distributed=False),
        "forget": fisher_diagonal(model, TensorDataset(x[:N_FORGET], y[:N_FORGET]),
                                  batch_size=16, distributed=False),
        "retain": fisher_diagonal(model, TensorDataset(x[N_FORGET:], y[N_FORGET:]),
                                  batch_size=16, distributed=False),
    }


def _outcome(fn) -> tuple[str, str]:
    """``("ok", "")`` or the class name and message of what ``fn()`` raised."""
    try:
        fn()
    except Exception as exc:  # the test checks which class every rank raised
        return type(exc).__name__, str(exc)
    return "ok", ""


def spawn_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of the ``torch.multiprocessing`` test: every case in the same order on every
    rank (each a collective), this rank's results written to ``out_dir/rank{rank}.pt``."""
    from deepclean import DeepClean, precompute_train_fisher, select_weights
    from deepclean.fisher import diagonal

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=TIMEOUT)
    try:
        torch.set_num_threads(1)
        model = build_model()
        x, y = build_tensors()
        forget = TensorDataset(x[:N_FORGET], y[:N_FORGET])
        retain = TensorDataset(x[N_FORGET:], y[N_FORGET:])
        summed = []  # how many samples this rank's Fisher pass sums, batch by batch
        run = diagonal._FisherPass.run

        def counting_run(self, model, xb, yb):
            summed.append(int(xb.shape[0]))
            return run(self, model, xb, yb)

        diagonal._FisherPass.run = counting_run
        streamed = Streamed()
        out = {"memory": fisher_diagonal(model, TensorDataset(x, y), batch_size=16)}
        out["summed_memory"] = sum(summed)
        out["streamed"] = fisher_diagonal(model, streamed, batch_size=16)
        out["summed_streamed"] = sum(summed) - out["summed_memory"]
        out["streamed_reads"] = list(streamed.reads)
        diagonal._FisherPass.run = run
        out |= {
            "streamed_workers": fisher_diagonal(model, Streamed(), batch_size=16, num_workers=1),
            "explicit": fisher_diagonal(model, TensorDataset(x, y), batch_size=16,
                                        distributed=True),
            "alone": fisher_diagonal(model, TensorDataset(x, y), batch_size=16,
                                     distributed=False),
            "forget": fisher_diagonal(model, forget, batch_size=16),
            "retain": fisher_diagonal(model, retain, batch_size=16),
            # one sample, two ranks: one rank owns nothing
            "one_sample": fisher_diagonal(model, TensorDataset(x[:1], y[:1]), batch_size=16),
            "one_sample_streamed": fisher_diagonal(model, Streamed(1), batch_size=16),
        }
        out["mask"] = select_weights(out["forget"], out["retain"], 1.1)
        method = DeepClean(gamma=1.1, epochs=0, fisher_batch_size=16)
        method.unlearn(model, forget, retain)
        out["deepclean_mask"] = method.mask_
        out["train_fisher"] = precompute_train_fisher(model, TensorDataset(x, y),
                                                      batch_size=16).fisher
        # Failures on one rank only: every rank raises instead of waiting for the others.
        out["nan_on_rank_1"] = _outcome(
            lambda: fisher_diagonal(model, Streamed(nan_at=N - 1), batch_size=16))
        x_nan = x.clone()
        x_nan[N - 1] = float("nan")  # in rank 1's block; every rank checks the whole set first
        out["nan_in_memory"] = _outcome(
            lambda: fisher_diagonal(model, TensorDataset(x_nan, y), batch_size=16))
        out["different_lengths"] = _outcome(
            lambda: fisher_diagonal(model, TensorDataset(x[:N - rank], y[:N - rank])))
        out["bad_batch_size"] = _outcome(
            lambda: fisher_diagonal(model, TensorDataset(x, y), batch_size=0))
        out["after_errors"] = fisher_diagonal(model, TensorDataset(x, y), batch_size=16)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(out: str) -> None:
    dist.init_process_group("gloo", timeout=TIMEOUT)  # rank and world size from torchrun
    try:
        torch.set_num_threads(1)
        model = build_model()
        x, y = build_tensors()
        result = {
            "world_size": dist.get_world_size(),
            "memory": fisher_diagonal(model, TensorDataset(x, y), batch_size=16),
            "streamed": fisher_diagonal(model, Streamed(), batch_size=16),
        }
        if dist.get_rank() == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
