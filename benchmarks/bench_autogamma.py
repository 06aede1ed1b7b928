"""DeepClean at the paper's gamma against ``gamma="auto"``, with gold as the reference (issue 11).

Run (small, CPU): ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_autogamma.py
--dataset digits --model small_cnn --seeds 0 1 2 --out benchmarks/results/autogamma``

Per (seed, scenario) it trains the original on ``--train-size`` training images; the training
images it never saw are the held-out set (auto-gamma and the verdict read only those; the test
split is reported only). Gold is retrained on D_r with the same recipe. For the original, gold,
DeepClean at the paper's gamma (1.1 random, 2.0 class) and DeepClean ``gamma="auto"`` it records
Acc_Df, Acc_Dr, Acc_test, the paper's entropy MIA, the Avg. Gap to gold, the reset share, the
unlearning wall time, the fine-tune steps (search + full), and the forgetting verdict on the
held-out set. One JSON per (seed, scenario) plus ``env_autogamma.json``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from deepclean import (
    DeepClean,
    TrainConfig,
    build_model,
    class_split,
    forgetting_verdict,
    load_dataset,
    memorisation,
    random_split,
    train_model,
)
from deepclean.evaluation.metrics import accuracy, entropy_mia, predict_proba
from deepclean.evaluation.summaries import avg_gap

PAPER_GAMMA = {"random": 1.1, "class": 2.0}


def _metrics(model, xf, yf, xr, yr, xt, yt) -> dict[str, float]:
    pf, pr, pt = (predict_proba(model, x) for x in (xf, xr, xt))
    return {"acc_forget": accuracy(pf, yf), "acc_retain": accuracy(pr, yr),
            "acc_test": accuracy(pt, yt), "mia": entropy_mia(pr, pt, pf)}


def run_case(data, *, model_name: str, width: float, seed: int, scenario: str, train_size: int,
             epochs: int, ft_epochs: int, holdout_size: int | None = None,
             refresh_every: int = 0) -> dict:
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(data.train_y), generator=g)
    end = None if holdout_size is None else train_size + holdout_size
    train_idx, held_idx = perm[:train_size].sort().values, perm[train_size:end].sort().values
    x, y = data.train_x[train_idx], data.train_y[train_idx]
    xh, yh = data.train_x[held_idx], data.train_y[held_idx]
    split = (class_split(y, [0]) if scenario == "class" else random_split(len(y), 0.1, seed=seed))
    xf, yf, xr, yr = x[split.forget], y[split.forget], x[split.retain], y[split.retain]
    cfg = TrainConfig(epochs=epochs, lr=0.05)  # the default run's recipe (batch 128)
    c = data.train_x.shape[1]

    def fresh():
        return build_model(model_name, in_channels=c, num_classes=data.num_classes, width=width,
                           seed=seed)

    original = train_model(fresh(), x, y, cfg, seed=seed, progress=False)
    t0 = time.perf_counter()
    gold = train_model(fresh(), xr, yr, cfg, seed=seed, progress=False)
    gold_time = time.perf_counter() - t0
    rows = {"original": {"model": original, "time_s": None},
            "gold": {"model": gold, "time_s": gold_time}}
    variants = [("deepclean_paper", PAPER_GAMMA[scenario], 0), ("deepclean_auto", "auto", 0)]
    if refresh_every:  # dynamic Fisher (paper limitation 3) against static, at the paper's gamma
        variants.append(("deepclean_dynamic", PAPER_GAMMA[scenario], refresh_every))
    for label, gamma, refresh in variants:
        m = DeepClean(gamma=gamma, epochs=ft_epochs, seed=seed, refresh_every=refresh,
                      holdout=TensorDataset(xh, yh) if gamma == "auto" else None)
        t0 = time.perf_counter()
        out = m.unlearn(original, TensorDataset(xf, yf), TensorDataset(xr, yr))
        rows[label] = {"model": out, "time_s": time.perf_counter() - t0, "info": m.info_}
    gold_m = _metrics(gold, xf, yf, xr, yr, data.test_x, data.test_y)
    retained = yh != 0 if scenario == "class" else torch.ones_like(yh, dtype=torch.bool)
    record = {"seed": seed, "scenario": scenario, "dataset": data.name, "model": model_name,
              "width": width, "train_size": train_size, "holdout_size": len(yh),
              "n_forget": len(yf), "epochs": epochs, "ft_epochs": ft_epochs,
              "memorisation": memorisation(original, xr, yr, xh, yh, seed=seed),
              "rows": {}}
    for label, row in rows.items():
        met = _metrics(row["model"], xf, yf, xr, yr, data.test_x, data.test_y)
        v = forgetting_verdict(row["model"], TensorDataset(xf, yf), TensorDataset(xh, yh),
                               original=original,
                               retained_holdout=TensorDataset(xh[retained], yh[retained]),
                               seed=seed)
        entry = {**met, "avg_gap": avg_gap(met, gold_m), "time_s": row["time_s"],
                 "verdict": v.to_dict()}
        info = row.get("info")
        if info:
            auto = info.get("auto_gamma", {})
            entry.update(gamma=info["gamma"], share_reset=info["share_reset"],
                         search_steps=auto.get("search_steps", 0),
                         full_steps=ft_epochs * math.ceil(len(yr) / 128),
                         auto_gamma=auto or None)
        record["rows"][label] = entry
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scenarios", nargs="+", default=["class", "random"])
    ap.add_argument("--train-size", type=int, default=1100)
    ap.add_argument("--holdout-size", type=int, default=None,
                    help="held-out images (never trained on) taken from the rest of the training "
                    "split; default all of the rest")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--refresh-every", type=int, default=0,
                    help="also run DeepClean at the paper's gamma with the dynamic Fisher, "
                    "recomputed every K fine-tune steps (0: off)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/autogamma"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.dataset)
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    (args.out / "env_autogamma.json").write_text(json.dumps(env, indent=1))
    print("| seed | scenario | model | gamma | reset % | Acc_Df | Acc_Dr | Acc_test | MIA | "
          "Avg.Gap | time s | search/full steps | verdict |")
    print("|" + "---|" * 13)
    for seed in args.seeds:
        for scenario in args.scenarios:
            torch.manual_seed(seed)
            rec = run_case(data, model_name=args.model, width=args.width, seed=seed,
                           scenario=scenario, train_size=args.train_size, epochs=args.epochs,
                           ft_epochs=args.ft_epochs, holdout_size=args.holdout_size,
                           refresh_every=args.refresh_every)
            name = f"{args.dataset}_{args.model}_{scenario}_seed{seed}.json"
            (args.out / name).write_text(json.dumps(rec, indent=1, allow_nan=False))
            for label, r in rec["rows"].items():
                gamma = f"{r['gamma']:.3g}" if "gamma" in r else "-"
                share = f"{100 * r['share_reset']:.2f}" if "share_reset" in r else "-"
                steps = (f"{r['search_steps']}/{r['full_steps']}" if "full_steps" in r else "-")
                t = f"{r['time_s']:.2f}" if r["time_s"] is not None else "-"
                print(f"| {seed} | {scenario} | {label} | {gamma} | {share} | "
                      f"{r['acc_forget']:.2f} | {r['acc_retain']:.2f} | {r['acc_test']:.2f} | "
                      f"{r['mia']:.1f} | {r['avg_gap']:.2f} | {t} | {steps} | "
                      f"{r['verdict']['summary'].split(':')[0]} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
