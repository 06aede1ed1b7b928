"""Each method receives only its own hyperparameters from the harness (what it declares)."""

import inspect

import pytest
import torch

from deepclean.harness.config import ExperimentConfig, _method_kwargs, fisher_methods
from deepclean.methods import available_methods, make_method, method_class

JSON = (int, float, str, bool, type(None))


@pytest.mark.parametrize("scenario", ["random", "class"])
@pytest.mark.parametrize("name", available_methods())
def test_recorded_hyperparameters_equal_what_the_constructor_got(name, scenario):
    cfg = ExperimentConfig(methods=(name,), gamma_random=1.1, gamma_class=2.0)
    kwargs = _method_kwargs(cfg, name, scenario, 0, torch.device("cpu"), "resnet18", None)
    method = make_method(name, **kwargs)
    recorded = method.hyperparameters()
    defaults = {k: p.default for k, p in inspect.signature(method_class(name).__init__)
                .parameters.items() if k not in ("self", "device", "progress")}
    for key, value in recorded.items():
        assert isinstance(value, JSON) or isinstance(value, dict), (name, key, value)
        given = kwargs.get(key, defaults[key])
        expected = given.to_dict() if hasattr(given, "to_dict") else given
        if expected is None and isinstance(value, dict):  # retrain: default recipe object
            continue
        assert value == expected, (name, key)
    assert not set(recorded) & set(method_class(name).collaborators)


def test_the_scenario_threshold_reaches_only_the_methods_that_declare_it():
    cfg = ExperimentConfig(methods=("deepclean",), gamma_random=1.1, gamma_class=2.0)
    for scenario, gamma in (("random", 1.1), ("class", 2.0)):
        got = {n: _method_kwargs(cfg, n, scenario, 0, torch.device("cpu"), "resnet18", None)
               for n in available_methods()}
        assert got["deepclean"]["gamma"] == gamma and got["zero_weights"]["gamma"] == gamma
        # sparse_mu's l1 strength and scrub's CE weight are also called gamma: untouched
        assert "gamma" not in got["sparse_mu"] and "gamma" not in got["scrub"]
        assert make_method("sparse_mu", **got["sparse_mu"]).hyperparameters()["gamma"] == 5e-4
        assert make_method("scrub", **got["scrub"]).hyperparameters()["gamma"] == 0.99
        for n, kw in got.items():
            if method_class(n).scenario_threshold is None:
                assert "gamma" not in kw, n


def test_capabilities_are_declared_not_named():
    assert fisher_methods() == ["deepclean", "zero_weights"]
    assert [m for m in available_methods() if not method_class(m).in_all] == ["retrain"]
