"""The ranks of tests/evaluation/test_distributed_evaluation.py: the per-sample outputs and the
metrics built on them under a gloo process group, on the model and the N = 101 samples of the
distributed Fisher case (tests/fisher/_ddp_fisher_script.py)."""

from __future__ import annotations

import _ddp_fisher_script as case
import torch
import torch.distributed as dist
from _gloo import init_gloo, outcome
from torch.utils.data import Dataset, Subset, TensorDataset

from deepclean.data.splits import random_split
from deepclean.evaluation import (
    accuracy,
    evaluate_model,
    memorisation,
    predict_logits,
    sample_outputs,
)
from deepclean.evaluation.verdict import forgetting_verdict


class FloatLabelAt(Dataset):
    """The case's samples, one of which (``bad``) has a float label: a DataError where read."""

    def __init__(self, bad: int) -> None:
        self.x, self.y = case.build_tensors()
        self.bad = bad

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], (0.5 if i == self.bad else self.y[i])



def metrics(model, train, test, holdout_part) -> dict:
    """Every metric of the test, from Datasets (all computed alike in one process)."""
    split = random_split(case.N, 0.2, seed=0)
    return {
        "evaluate": evaluate_model(model, x_train=train, split=split, x_test=test),
        "accuracy": accuracy(model, train, batch_size=16),
        "memorisation": memorisation(model, train, test, batch_size=16),
        "verdict": forgetting_verdict(model, Subset(train, split.forget.tolist()), test,
                                      batch_size=16).metrics,
        "holdout_part": sample_outputs(model, holdout_part, batch_size=16).logits,
    }


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    try:
        torch.set_num_threads(1)
        model = case.build_model()
        x, y = case.build_tensors()
        computed = []  # the samples this rank's forward passes saw
        hook = model.register_forward_hook(lambda m, i, o: computed.append(int(i[0].shape[0])))
        streamed = case.Streamed()
        out = {"streamed": sample_outputs(model, streamed, batch_size=16),
               "computed_streamed": sum(computed)}
        out["streamed_reads"] = list(streamed.reads)
        computed.clear()
        out["tensor"] = predict_logits(model, x, batch_size=16)
        out["computed_tensor"] = sum(computed)
        hook.remove()
        out |= {
            "memory": sample_outputs(model, TensorDataset(x, y), batch_size=16),
            "workers": sample_outputs(model, case.Streamed(), batch_size=16, num_workers=1),
            "alone": sample_outputs(model, case.Streamed(), batch_size=16, distributed=False),
            "one_sample": sample_outputs(model, case.Streamed(1), batch_size=16),
            "metrics": metrics(model, case.Streamed(), case.Streamed(40),
                               Subset(case.Streamed(), range(3, 60))),
            "bad_label_on_rank_1": outcome(
                lambda: sample_outputs(model, FloatLabelAt(case.N - 1), batch_size=16)),
            "different_lengths": outcome(
                lambda: predict_logits(model, x[:case.N - rank], batch_size=16)),
            "after_errors": sample_outputs(model, case.Streamed(), batch_size=16),
        }
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
