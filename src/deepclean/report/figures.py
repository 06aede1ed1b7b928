"""The paper's figures, drawn only from result JSON records (matplotlib, Agg backend).

- Fig. 2 (:func:`plot_method_bars`): per method, bars of Acc_Dr, MIA and unlearning time, the gold
  model's value as a dashed line (mean over seeds, 95 % interval as error bars).
- Fig. 3 (:func:`plot_selected_vs_gamma`): the number of weights DeepClean selects against gamma.
- Fig. 4 (:func:`plot_metrics_vs_gamma`): Acc_Dr, Acc_Df and MIA against gamma, gold dashed.

Figs. 3 and 4 read the records of ``deepclean sweep-gamma``. Every figure is written as PNG and
SVG.
"""

from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from deepclean.report.common import mean_ci

__all__ = ["plot_method_bars", "plot_selected_vs_gamma", "plot_metrics_vs_gamma",
           "write_figures"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path_stem: Path) -> dict[str, str]:
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for ext in ("png", "svg"):
        path = path_stem.with_suffix(f".{ext}")
        # a unique temporary name: two processes saving the same figure never share one
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            fig.savefig(name, format=ext, dpi=120, bbox_inches="tight")
            os.replace(name, path)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        out[ext] = str(path)
    _plt().close(fig)
    return out


def _mean_err(values: list[float]) -> tuple[float, float]:
    mean, half = mean_ci(values)
    return mean, 0.0 if half is None else half


def _group(records, key):
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[key(r)].append(r)
    return dict(sorted(groups.items()))


def plot_method_bars(records: list[dict[str, Any]], path_stem: str | Path,
                     title: str = "") -> dict[str, str]:
    """Fig. 2 for the records of one (data set, model, scenario): bars per method of Acc_Dr,
    Acc_Df, MIA and time (gold dashed); 95 % interval whiskers with two seeds or more.

    Returns:
        ``{"png": path, "svg": path}``.
    """
    plt = _plt()
    by_method = _group([r for r in records if r["method"] not in ("gold", "original")],
                       lambda r: r["method"])
    gold = [r for r in records if r["method"] == "gold"]
    # Acc_Df beside MIA: a method that did not forget must not look best on MIA alone
    panels = [("Acc_Dr (%)", lambda r: r["metrics"]["acc_retain"]),
              ("Acc_Df (%)", lambda r: r["metrics"]["acc_forget"]),
              ("MIA (%)", lambda r: r["metrics"]["mia"]),
              ("time (s)", lambda r: r.get("time_s"))]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    names = list(by_method)
    several = max((len(v) for v in by_method.values()), default=0) > 1
    for ax, (label, get) in zip(axes, panels):
        means, errs = [], []
        for name in names:
            values = [float(get(r)) for r in by_method[name] if get(r) is not None]
            m, e = _mean_err(values) if values else (float("nan"), 0.0)
            means.append(m)
            errs.append(e)
        # whiskers only where there is an interval (two seeds or more)
        ax.bar(range(len(names)), means, yerr=errs if several else None, color="tab:blue",
               alpha=0.8, capsize=3 if several else 0)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        gold_values = [float(get(r)) for r in gold if get(r) is not None]
        if gold_values:
            g = sum(gold_values) / len(gold_values)
            ax.axhline(g, color="tab:red", linestyle="--", label=f"gold {g:.2f}")
            ax.legend(loc="best", fontsize=8)
        ax.set_title(label)
    fig.suptitle(title, y=1.04)
    return _save(fig, Path(path_stem))


def plot_selected_vs_gamma(sweep: list[dict[str, Any]], path_stem: str | Path,
                           title: str = "") -> dict[str, str]:
    """Fig. 3: the number of selected (reset) weights against gamma, one line per scenario."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for scenario, recs in _group(sweep, lambda r: r["scenario"]).items():
        by_gamma = _group(recs, lambda r: r["gamma"])
        gammas = list(by_gamma)
        means = [_mean_err([float(r["n_reset"]) for r in by_gamma[g]])[0] for g in gammas]
        ax.plot(gammas, means, marker="o", label=scenario)
    total = sweep[0].get("n_weights") if sweep else None
    if total:
        ax.axhline(total / 2, color="grey", linestyle=":", label="half of all weights")
    ax.set_xlabel("gamma")
    ax.set_ylabel("selected weights |W_f|")
    ax.set_yscale("symlog")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, Path(path_stem))


def plot_metrics_vs_gamma(sweep: list[dict[str, Any]], path_stem: str | Path,
                          title: str = "") -> dict[str, str]:
    """Fig. 4 for one scenario: Acc_Dr, Acc_Df and MIA against gamma, gold values dashed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    by_gamma = _group(sweep, lambda r: r["gamma"])
    gammas = list(by_gamma)
    for (label, key), color in zip((("Acc_Dr", "acc_retain"), ("Acc_Df", "acc_forget"),
                                    ("MIA", "mia")), ("tab:blue", "tab:orange", "tab:green")):
        stats = [_mean_err([float(r["metrics"][key]) for r in by_gamma[g]]) for g in gammas]
        ax.errorbar(gammas, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o",
                    color=color, label=label, capsize=3)
        gold = [float(r["gold_metrics"][key]) for r in sweep if r.get("gold_metrics")]
        if gold:
            ax.axhline(sum(gold) / len(gold), color=color, linestyle="--", alpha=0.7,
                       label=f"{label} gold")
    ax.set_xlabel("gamma")
    ax.set_ylabel("%")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    return _save(fig, Path(path_stem))


def write_figures(records: list[dict[str, Any]], sweep: list[dict[str, Any]],
                  out_dir: str | Path) -> list[dict[str, str]]:
    """Every figure the records allow, into ``out_dir``.

    Returns:
        One ``{"title", "png", "svg"}`` per figure, in drawing order.
    """
    out_dir = Path(out_dir)
    out = []
    for (dataset, model, scenario), recs in _group(
            records, lambda r: (r["dataset"], r["model"], r["scenario"])).items():
        if not any(r["method"] not in ("gold", "original") for r in recs):
            continue
        title = f"Fig. 2: {dataset} / {model} / {scenario} forgetting"
        paths = plot_method_bars(recs, out_dir / f"fig2_{dataset}_{model}_{scenario}", title)
        out.append({"title": title, **paths})
    for (dataset, model), recs in _group(sweep, lambda r: (r["dataset"], r["model"])).items():
        title = f"Fig. 3: selected weights vs gamma, {dataset} / {model}"
        out.append({"title": title,
                    **plot_selected_vs_gamma(recs, out_dir / f"fig3_{dataset}_{model}", title)})
    for (dataset, model, scenario), recs in _group(
            sweep, lambda r: (r["dataset"], r["model"], r["scenario"])).items():
        title = f"Fig. 4: Acc_Dr, Acc_Df, MIA vs gamma, {dataset} / {model} / {scenario}"
        out.append({"title": title, **plot_metrics_vs_gamma(
            recs, out_dir / f"fig4_{dataset}_{model}_{scenario}", title)})
    return out
