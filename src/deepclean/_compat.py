"""Old module paths keep working: ``import deepclean.mia`` gives ``deepclean.evaluation.mia``.

Modules moved into packages (``data``, ``fisher``, ``evaluation``, ``harness``, ``report``) when
the package was reorganised; this finder maps each old dotted name to the module's new home, so
user code and pickles that name the old path still import the same module object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old module name -> new module name
MOVED = {
    "deepclean.splits": "deepclean.data.splits",
    "deepclean.models": "deepclean.data.models",
    "deepclean.train_fisher": "deepclean.fisher.train_fisher",
    "deepclean.metrics": "deepclean.evaluation.metrics",
    "deepclean.mia": "deepclean.evaluation.mia",
    "deepclean.distances": "deepclean.evaluation.distances",
    "deepclean.summaries": "deepclean.evaluation.summaries",
    "deepclean.experiment": "deepclean.harness.experiment",
    "deepclean.sweep": "deepclean.harness.sweep",
    "deepclean.tuning": "deepclean.harness.tuning",
    "deepclean.resume": "deepclean.harness.resume",
    "deepclean.audit": "deepclean.harness.audit",
    "deepclean.locking": "deepclean.harness.locking",
    "deepclean.reporting": "deepclean.report",
    "deepclean.figures": "deepclean.report.figures",
    "deepclean.html_report": "deepclean.report.html",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:  # the new module is already executed
        return None


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
