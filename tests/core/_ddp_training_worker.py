"""The ranks of tests/core/test_training_distributed.py: train_model under DDP (gloo, CPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from _gloo import init_gloo, outcome
from torch import nn
from torch.utils.data import Dataset

from deepclean import TrainConfig, train_model

#: name -> (samples, batch size, BatchNorm, augmentation, streamed through a DataLoader, epochs)
CASES = {
    "plain": (37, 8, False, False, False, 1),  # last batch 5: blocks of 2 and 3
    "float32": (37, 8, False, False, False, 1),  # as "plain", in float32
    "odd_batch": (15, 7, False, False, False, 1),  # blocks of 3 and 4; last batch 1: one empty
    "augmented": (37, 8, False, True, False, 2),
    "streamed": (15, 7, False, True, True, 2),  # read through a DataLoader, sharded
    "batchnorm": (37, 8, True, False, False, 2),
    "batchnorm_streamed": (37, 8, True, False, True, 1),
}


class Streamed(Dataset):
    """Samples held in tensors but not a TensorDataset: train_model reads it through a
    DataLoader (ShuffledBatches)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def build_case(n: int, batchnorm: bool, dtype: torch.dtype = torch.float64
               ) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A CNN in ``dtype`` (with BatchNorm or without), ``n`` samples of 1x6x6 and labels in
    [0, 3), all drawn from fixed generators."""
    layers = [nn.Conv2d(1, 3, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(3))
    model = nn.Sequential(*layers, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 3))
    model = model.to(dtype)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=dtype))
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def initial(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The untrained model and the data of case ``name``."""
    n, _, batchnorm = CASES[name][:3]
    return build_case(n, batchnorm, torch.float32 if name == "float32" else torch.float64)


def train(name: str, *, seed: int = 3, distributed: bool | None = None) -> nn.Module:
    """Case ``name`` trained (by default data-parallel under a process group)."""
    _, batch_size, _, augmented, streamed, epochs = CASES[name]
    model, x, y = initial(name)
    config = TrainConfig(epochs=epochs, lr=0.05, batch_size=batch_size,
                         crop_padding=1 if augmented else 0, flip=augmented)
    if streamed:
        return train_model(model, Streamed(x, y), config=config, seed=seed, progress=False,
                           distributed=distributed)
    return train_model(model, x, y, config, seed=seed, progress=False, distributed=distributed)



def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    try:
        torch.set_num_threads(1)
        out = {name: {k: v.detach().clone() for k, v in train(name).state_dict().items()}
               for name in CASES}
        out["different_seeds"] = outcome(lambda: train("plain", seed=rank))
        out["bad_config_on_rank_1"] = outcome(
            lambda: train_model(nn.Linear(2, 2), torch.zeros(4, 2), torch.zeros(4).long(),
                                TrainConfig(epochs=1) if rank == 0 else None, seed=0,
                                progress=False))
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
