"""Command-line interface: a thin shell over :func:`deepclean.harness.experiment.run_experiment`.

    deepclean run [options]       train (or reuse) original and gold models, unlearn, compare
    deepclean methods             list the unlearning methods with their references
    deepclean sweep-gamma [opts]  DeepClean over a grid of gamma, Fisher diagonals computed once
    deepclean report RESULTS_DIR  rebuild the tables, figures and HTML report from the JSON files
    deepclean tune [options]      tune every method with the same budget on a seed and a test
                                  half that are never reported; writes a --hp-file for 'run'
    deepclean forget [options]    unlearn a deletion request from your own model and data
    deepclean verify [options]    check an unlearned model against held-out data

``torchrun --nproc_per_node=N -m deepclean run [options]`` runs ``deepclean run`` as N processes
(see ``docs/scale.md``); the other commands run in one process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from deepclean._version import __version__
from deepclean.errors import ConfigurationError, DeepCleanError
from deepclean.validation import num_workers_argument as _workers
from deepclean.validation import threads_argument as _threads

__all__ = ["main", "build_parser"]


def _comma_list(text: str) -> tuple[str, ...]:
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in _comma_list(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _train_size(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from exc
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 training samples, got {value}")
    return value


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _hyperparameter(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(
            f"expected METHOD.NAME=VALUE (e.g. deepclean.epochs=1), got {text!r}"
        )
    key, value = text.split("=", 1)
    method, name = key.split(".", 1)
    return method, name, _value(value)


def _read_indices(path: str) -> tuple[int, ...]:
    p = Path(path)
    if not p.is_file():
        raise ConfigurationError(
            f"--forget-indices: {path} does not exist; expected a JSON list or a text file with "
            "one training index per line"
        )
    try:
        text = p.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(
            f"--forget-indices: {path} cannot be read as text ({exc}); expected a JSON list or "
            "one training index per line"
        ) from exc
    try:
        values = json.loads(text) if text.startswith("[") else text.split()
        if not isinstance(values, list):
            raise TypeError("not a list")
        out = []
        for v in values:
            if isinstance(v, str):
                v = int(v)  # "1.5" and "a" raise ValueError
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{v!r} is not an integer")
            out.append(v)
        return tuple(out)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"--forget-indices: {path} must hold integers (a JSON list, or one per line); "
            f"{exc}. Write whole-number training indices such as [3, 17, 42]."
        ) from exc


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in _comma_list(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``deepclean run: error: ...`` and exit status 2, without
    the usage block (``--help`` shows it)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deepclean",
        description="Machine unlearning of PyTorch classifiers (DeepClean, arXiv 2311.10448).",
    )
    parser.add_argument("--version", action="version", version=f"deepclean {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, show the Python traceback instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="train (or reuse) original and gold models, unlearn with each method, compare",
        description="Run the paper's experiment. With no options: Fashion-MNIST, ResNet-18 "
        "(width 0.125) on 20,000 training images, random-10% and class-0 forgetting, Fine-tune "
        "and DeepClean against the gold model.",
    )
    _add_experiment_arguments(run)
    _add_tuned_arguments(run)
    run.add_argument("--dist-timeout", type=_minutes, default=30.0, metavar="MINUTES",
                     help="under torchrun: how long a process waits for the others at a "
                     "collective before the job fails (default 30); the wait while rank 0 "
                     "waits for a cache entry that another run is training is not bound by it")

    tune = sub.add_parser(
        "tune",
        help="tune every method with the same number of trials; writes <out>/hyperparameters.json",
        description="Give every method the same number of trials over the search space it "
        "declares, on a tuning seed (its own split, original and gold model) and the validation "
        "half of the test set, minimising Avg. Gap to gold. Writes <out>/hyperparameters.json "
        "for 'deepclean run --hp-file', <out>/tuning/*.json (every trial) and <out>/tuning.md.",
    )
    _add_experiment_arguments(tune)
    tune.add_argument("--trials", type=int, default=12,
                      help="trials per method and scenario, the same for all (default 12)")
    tune.add_argument("--tune-seed", type=int, default=100,
                      help="seed of the tuning split and models; never a reported seed "
                      "(default 100)")
    tune.add_argument("--max-passes", type=int, default=3,
                      help="cap on unlearning work in passes over D_r (default 3)")

    sweep = sub.add_parser(
        "sweep-gamma",
        help="DeepClean over a grid of gamma (Fisher diagonals computed once); paper Figs. 3, 4",
        description="Run DeepClean for every gamma on the run's original and gold models "
        "(same options and cache as 'run'), computing the two Fisher diagonals once; writes "
        "<out>/sweep/*.json, the figures and the HTML report.",
    )
    _add_experiment_arguments(sweep)
    _add_tuned_arguments(sweep)
    sweep.add_argument("--gammas", type=_float_list,
                       help="comma list of thresholds (default 1,1.1,1.2,1.5,1.7,2,2.2,2.5,2.7,3)")
    sweep.add_argument("--paper-metrics-only", action="store_true",
                       help="skip the MIA family and distances per gamma (faster)")

    sub.add_parser("methods", help="list the unlearning methods with their references")

    report = sub.add_parser(
        "report", help="rebuild the tables, figures and HTML report from a results folder")
    report.add_argument("results_dir", help="the --out folder of a run")
    from deepclean.deletion.cli import add_parsers  # forget, verify: a user's own model and data

    add_parsers(sub)
    return parser


def _add_experiment_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--preset", choices=["default", "paper"], default="default",
                     help="'paper': full-width ResNet-18 and VGG-16-BN, full data, the paper's "
                     "recipe (for a GPU)")
    run.add_argument("--dataset", help="fashion-mnist (default), mnist, cifar10, cifar100, digits")
    run.add_argument("--data-dir", help="folder with the data set files")
    run.add_argument("--download", action="store_true",
                     help="let torchvision download missing data (needs internet)")
    run.add_argument("--model", type=_comma_list, help="resnet18, vgg16_bn, small_cnn; comma list")
    run.add_argument("--width", type=float, help="channel-width multiplier (1.0 = paper size)")
    run.add_argument("--train-size", type=_train_size, default=argparse.SUPPRESS,
                     help="training samples drawn from the training split, or 'all'")
    run.add_argument("--epochs", type=int, help="epochs of the original and gold models")
    run.add_argument("--lr", type=float, help="SGD learning rate of the original and gold models")
    run.add_argument("--scenarios", type=_comma_list, help="random, class, indices; comma list")
    run.add_argument("--forget-fraction", type=float, help="share forgotten in 'random' (0-1)")
    run.add_argument("--forget-class", type=_int_list, help="classes forgotten in 'class'")
    run.add_argument("--forget-indices",
                     help="file with training indices to forget (scenario 'indices')")
    run.add_argument("--methods", type=_comma_list,
                     help="comma list of methods, or 'all' (see 'deepclean methods')")
    run.add_argument("--seeds", type=int, nargs="+", help="one run per seed (default 0)")
    run.add_argument("--gold-models", type=int, metavar="K",
                     help="gold models per seed from different seeds (default 1); K >= 2 enables "
                     "the LiRA attack, gold-vs-gold normalised distances and the gold-versus-"
                     "gold spread of the paper metrics (gold_spread)")
    run.add_argument("--gamma", type=_gamma,
                     help="DeepClean threshold for every scenario: a number > 0, or 'auto' (chosen "
                     "on held-out data the original never saw, no gold model)")
    run.add_argument("--gamma-random", type=_gamma,
                     help="threshold for random (default 1.1), or 'auto'")
    run.add_argument("--gamma-class", type=_gamma,
                     help="threshold for class (default 2.0), or 'auto'")
    run.add_argument("--unlearn-epochs", type=int, help="fine-tune epochs of DeepClean/Fine-tune")
    run.add_argument("--unlearn-lr", type=float, help="their Adam learning rate (default 1e-3)")
    run.add_argument("--hp", type=_hyperparameter, action="append", default=[],
                     metavar="METHOD.NAME=VALUE", help="a method hyperparameter; repeatable")
    run.add_argument("--out", help="output folder (default runs/default)")
    run.add_argument("--cache-dir", help="cache of trained models (default ~/.cache/deepclean/models)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="default auto")
    run.add_argument("--precision", metavar="{fp32,bf16}",
                     help="bf16: training, unlearning and evaluation under bfloat16 autocast (the "
                     "Fisher stays in full precision); for GPUs; default fp32")
    run.add_argument("--channels-last", action="store_true",
                     help="channels-last (NHWC) memory format for every model; for GPUs")
    run.add_argument("--precompute-fisher", action="store_true",
                     help="compute the original model's Fisher on the whole training set once "
                     "(cached); DeepClean then runs the Fisher pass over D_f only (I_Dr follows "
                     "exactly) and its one-off time is reported apart")
    run.add_argument("--num-workers", type=_workers, metavar="N",
                     help="DataLoader worker processes of methods that stream their data "
                     "(all but L-CODEC) for data sets not in memory; does not "
                     "change results; default 0")
    run.add_argument("--threads", type=_threads, help="torch CPU threads (1 to the CPUs here)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--no-store-indices", action="store_true",
                     help="write only the SHA-256 of the forget indices (manifests, audit)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic torch kernels (reproducible results on CUDA)")


def _add_tuned_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--hp-file", action="append", default=[],
                     help="hyperparameters chosen by 'deepclean tune' (its hyperparameters.json); "
                     "repeatable, for searches made in several tune runs with the same tuning "
                     "seed; --hp values still win. Implies --test-half report")
    run.add_argument("--test-half", choices=["all", "report"],
                     help="evaluate on the whole test set (default) or on the half that tuning "
                     "never sees ('report')")


def _config_from_args(args: argparse.Namespace):
    from deepclean.harness.config import ExperimentConfig, preset
    from deepclean.methods import available_methods, method_class

    if args.gamma is not None and (args.gamma_random is not None or args.gamma_class is not None):
        raise ConfigurationError(
            "--gamma sets the threshold of every scenario and cannot be combined with "
            "--gamma-random or --gamma-class; pass either --gamma or the per-scenario flags"
        )
    for flag, values in (("--methods", args.methods), ("--scenarios", args.scenarios),
                         ("--forget-class", args.forget_class),
                         ("--seeds", tuple(args.seeds) if args.seeds else None)):
        repeated = sorted({v for v in values or () if list(values).count(v) > 1}, key=str)
        if repeated:
            raise ConfigurationError(
                f"{flag} lists {repeated} more than once; list each once (a repeated seed or "
                "method would be averaged as if it were another one)"
            )
    if args.forget_indices and args.scenarios is not None and "indices" not in args.scenarios:
        raise ConfigurationError(
            f"--forget-indices is used only by the scenario 'indices', but --scenarios is "
            f"{','.join(args.scenarios)}; add 'indices' to --scenarios or drop --forget-indices"
        )
    if args.scenarios is not None:  # a flag of a scenario not run would be ignored silently
        for flag, value, scenario in (("--forget-class", args.forget_class, "class"),
                                      ("--gamma-class", args.gamma_class, "class"),
                                      ("--forget-fraction", args.forget_fraction, "random"),
                                      ("--gamma-random", args.gamma_random, "random")):
            if value is not None and scenario not in args.scenarios:
                raise ConfigurationError(
                    f"{flag} is used only by the scenario '{scenario}', but --scenarios is "
                    f"{','.join(args.scenarios)}; add '{scenario}' to --scenarios or drop {flag}"
                )
    dataset = args.dataset or "fashion-mnist"
    fields: dict[str, Any] = preset(args.preset, dataset)
    fields["dataset"] = dataset
    simple = {
        "data_dir": args.data_dir,
        "models": args.model,
        "width": args.width,
        "scenarios": args.scenarios,
        "forget_fraction": args.forget_fraction,
        "forget_classes": args.forget_class,
        "seeds": tuple(args.seeds) if args.seeds else None,
        "gold_seeds": args.gold_models,
        "gamma_random": args.gamma_random if args.gamma is None else args.gamma,
        "gamma_class": args.gamma_class if args.gamma is None else args.gamma,
        "unlearn_epochs": args.unlearn_epochs,
        "unlearn_lr": args.unlearn_lr,
        "num_workers": args.num_workers,
        "out_dir": args.out,
        "cache_dir": args.cache_dir,
        "device": args.device,
        "precision": args.precision,
    }
    fields.update({k: v for k, v in simple.items() if v is not None})
    if "train_size" in vars(args):  # 'all' gives None, so presence is the signal
        fields["train_size"] = args.train_size
    if args.download:
        fields["download"] = True
    if args.no_progress:
        fields["progress"] = False
    if args.no_store_indices:
        fields["store_indices"] = False
    if args.deterministic:
        fields["deterministic"] = True
    if args.channels_last:
        fields["channels_last"] = True
    if args.precompute_fisher:
        fields["precompute_fisher"] = True
    if args.methods is not None:
        if args.methods == ("all",):
            fields["methods"] = tuple(m for m in available_methods() if method_class(m).in_all)
        else:
            fields["methods"] = args.methods
    if args.forget_indices:
        fields["forget_indices"] = _read_indices(args.forget_indices)
        if args.scenarios is None:
            fields["scenarios"] = ("indices",)
    hps: dict[str, dict[str, Any]] = {}
    for method, name, value in args.hp:
        hps.setdefault(method, {})[name] = value
    if hps:
        fields["hyperparameters"] = hps
    if getattr(args, "hp_file", None):
        from deepclean.harness.tuning import read_hp_files

        fields["tuned_hyperparameters"], fields["tuning_protocol"] = read_hp_files(args.hp_file)
        fields["test_half"] = "report"
    if getattr(args, "test_half", None):
        fields["test_half"] = args.test_half
    config = ExperimentConfig(**fields)
    if args.epochs is not None or args.lr is not None:
        changes = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None}
        config = replace(config, train=replace(config.train, **changes))
    config.validate()
    return config


def _cmd_methods() -> int:
    from deepclean.methods import available_methods, method_class

    for name in available_methods():
        cls = method_class(name)
        print(f"{name:18s} {cls.summary}\n{'':18s} ({cls.reference})")
    return 0


def _cmd_report(results_dir: str) -> int:
    from deepclean.report.build import build_report
    from deepclean.report.tables import load_records, load_sweep_records

    if not Path(results_dir).is_dir():
        raise ConfigurationError(f"{results_dir} is not a folder; pass the --out folder of a run")
    folder = Path(results_dir)
    if folder.name in ("results", "sweep") and (folder.parent / "config.json").is_file():
        results_dir = str(folder.parent)  # the run folder, where the report belongs
    records = load_records(results_dir)
    if not records and not load_sweep_records(results_dir):
        raise ConfigurationError(
            f"no result JSON files in {results_dir} (its results/ or sweep/ folder); pass the "
            "--out folder of a 'deepclean run' or 'deepclean sweep-gamma'"
        )
    print(build_report(results_dir, records=records))
    print(f"tables, figures/ and report.html written to {results_dir}/")
    return 0


def _gamma(text: str) -> float | str:
    """A gamma from the command line: ``auto`` or a number (checked later with the others)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number > 0 or 'auto', got {text!r}") from None


def _minutes(text: str) -> float:
    """A finite number of minutes > 0 (``--dist-timeout``)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number of minutes > 0, got {text!r}")
    return value


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deepclean`` command; returns the exit status.

    Under ``torchrun`` (environment variable ``WORLD_SIZE`` above 1), ``deepclean run`` joins the
    process group (gloo on the CPU, NCCL on the GPU of ``LOCAL_RANK``) and leaves it at the end;
    see ``docs/scale.md``. Every rank reports its own error with its rank and exits non-zero, and
    torchrun then stops the others.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from deepclean.distributed import launched_with_several_processes

    try:
        several = launched_with_several_processes()
    except DeepCleanError as exc:
        print(f"deepclean: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if not several:
        return _main(args)
    if args.command not in ("run", "methods"):
        print(f"deepclean: error: 'deepclean {args.command}' runs in one process, but this one "
              f"was started as one of {os.environ.get('WORLD_SIZE')} (torchrun); only 'deepclean "
              f"run' runs under torchrun. Start 'deepclean {args.command}' without torchrun.",
              file=sys.stderr)
        return 2
    if args.command == "methods":
        return _main(args)
    return _main_distributed(args)


def _main_distributed(args: argparse.Namespace) -> int:
    """``deepclean run`` as one of several processes started by torchrun."""
    from deepclean.distributed import rank, torchrun_process_group, world_size

    where = f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}"
    try:
        if not args.dist_timeout > 0:
            raise ConfigurationError(
                f"--dist-timeout must be a number of minutes > 0, got {args.dist_timeout}")
        if args.device and args.device not in ("auto", "cpu", "cuda"):
            raise ConfigurationError(
                f"--device {args.device} is not supported under torchrun; expected cpu, cuda or "
                "auto (each process then uses the GPU of its LOCAL_RANK)")
        from deepclean.training import resolve_device

        cuda = resolve_device(args.device).type == "cuda"
        with torchrun_process_group(timeout_s=60.0 * args.dist_timeout, cuda=cuda):
            where = f"rank {rank()} of {world_size()}"
            return _main(args, where=where)
    except DeepCleanError as exc:
        if args.traceback:
            raise
        print(f"deepclean: error ({where}): {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. a collective that timed out or lost a rank that died
        if args.traceback:
            raise
        print(f"deepclean: error ({where}): {type(exc).__name__}: {_one_line(exc)}. Under "
              "torchrun this usually means that another rank failed or was killed (its own "
              "message says why) or did not answer within --dist-timeout minutes.",
              file=sys.stderr)
        return 1


def _main(args: argparse.Namespace, *, where: str | None = None) -> int:
    """The command of ``args``; ``where`` ("rank r of W") prefixes the error messages under
    torchrun."""
    error_prefix = f"deepclean: error ({where}):" if where else "deepclean: error:"
    try:
        if args.command == "methods":
            return _cmd_methods()
        if args.command == "report":
            return _cmd_report(args.results_dir)
        if args.command in ("forget", "verify"):
            from deepclean.deletion.cli import run_command

            return run_command(args)
        import torch

        from deepclean.harness.experiment import run_experiment

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        config = _config_from_args(args)
        if args.command == "tune":
            from deepclean.harness.tune import run_tuning

            run_tuning(config, tune_seed=args.tune_seed, n_trials=args.trials,
                       max_passes=args.max_passes)
            return 0
        if args.command == "sweep-gamma":
            from deepclean.harness.sweep import DEFAULT_GAMMAS, sweep_gamma

            sweep_gamma(config, gammas=args.gammas or DEFAULT_GAMMAS,
                        extended=not args.paper_metrics_only)
            print(f"sweep written to {config.out_dir}/ (sweep/, figures/, report.html)")
            return 0
        records = run_experiment(config)
        from deepclean.distributed import is_main_process
        from deepclean.harness.records import failed_records

        main_process = is_main_process()  # under torchrun: rank 0 wrote the files and prints
        if main_process:
            print(f"results written to {config.out_dir}/ (results.md, results.csv, "
                  "results.tex, tables/, figures/, report.html, results/, splits/, audit/, "
                  "checkpoints/)")
        failed = failed_records(records)
        if failed:  # every rank exits with 4 (the same records on every rank)
            if not main_process:
                return 4
            names = sorted({f"{r['method']} ({r['scenario']}, seed {r['seed']})" for r in failed})
            print(f"deepclean: {len(failed)} method run(s) failed: {', '.join(names)}; see "
                  "results.md", file=sys.stderr)
            return 4
        return 0
    except DeepCleanError as exc:
        if args.traceback:
            raise
        print(f"{error_prefix} {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that cannot be written, a full disk
        if args.traceback:
            raise
        print(f"{error_prefix} {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("deepclean: interrupted; run the same command again to resume (finished results "
              "and searches are reused)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
