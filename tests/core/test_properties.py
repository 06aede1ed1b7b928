"""Property-based tests (hypothesis) of the split builders and the weight selection (issue 6)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepclean import DataError, class_split, index_split, random_split, select_weights

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _is_partition(split) -> bool:
    f, r = split.forget.tolist(), split.retain.tolist()
    return (not set(f) & set(r) and sorted(f + r) == list(range(split.n))
            and f == sorted(f) and r == sorted(r))


@SETTINGS
@given(n=st.integers(2, 3000), fraction=st.floats(0.001, 0.999), seed=st.integers(0, 2**31 - 1))
def test_random_split_is_a_reproducible_partition(n, fraction, seed):
    k = int(round(fraction * n))
    if k < 1 or k >= n:
        try:
            random_split(n, fraction, seed=seed)
        except DataError:
            return
        raise AssertionError("a split with an empty D_f or D_r was accepted")
    a, b = random_split(n, fraction, seed=seed), random_split(n, fraction, seed=seed)
    assert _is_partition(a)
    assert a.forget.numel() == k
    assert torch.equal(a.forget, b.forget) and a.digest == b.digest


@SETTINGS
@given(labels=st.lists(st.integers(0, 6), min_size=1, max_size=400),
       classes=st.sets(st.integers(0, 6), min_size=1, max_size=3))
def test_class_split_takes_exactly_the_classes(labels, classes):
    y = torch.tensor(labels)
    present = set(labels)
    if not classes <= present or present <= classes:
        try:
            class_split(y, sorted(classes))
        except DataError:
            return
        raise AssertionError("an absent class or an empty D_r was accepted")
    s = class_split(y, sorted(classes))
    assert _is_partition(s)
    assert set(y[s.forget].tolist()) == classes  # every forgotten sample is of those classes
    assert not set(y[s.retain].tolist()) & classes  # and no retained one is
    assert s.forget.numel() == sum(lab in classes for lab in labels)


@SETTINGS
@given(n=st.integers(2, 500), data=st.data())
def test_index_split_is_a_partition_of_the_request(n, data):
    request = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n - 1, unique=True))
    s = index_split(n, request)
    assert _is_partition(s)
    assert s.forget.tolist() == sorted(request)
    assert index_split(n, list(reversed(request))).digest == s.digest  # order does not matter


values = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False,
                   width=32)
zero_heavy = st.one_of(st.just(0.0), values)


@SETTINGS
@given(data=st.data(), size=st.integers(1, 64),
       gammas=st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=4))
def test_selection_is_monotone_in_gamma_and_follows_the_zero_rule(data, size, gammas):
    i_f = torch.tensor(data.draw(st.lists(zero_heavy, min_size=size, max_size=size)))
    i_r = torch.tensor(data.draw(st.lists(zero_heavy, min_size=size, max_size=size)))
    masks = [select_weights({"w": i_f}, {"w": i_r}, g)["w"] for g in sorted(gammas)]
    for low, high in zip(masks, masks[1:]):
        assert not (high & ~low).any()  # a larger gamma never selects more weights
    for m in masks:
        assert m.dtype == torch.bool and m.shape == i_f.shape
        assert m[(i_f > 0) & (i_r == 0)].all()  # I_f > 0, I_r = 0: selected
        assert not m[(i_f == 0) & (i_r == 0)].any()  # 0 / 0: not selected
        assert not m[i_f == 0].any()  # nothing without forget information


@SETTINGS
@given(data=st.data(), size=st.integers(1, 32), gamma=st.floats(1e-3, 1e3))
def test_selection_equals_the_ratio_rule_and_never_yields_nan(data, size, gamma):
    pos = st.floats(1e-6, 1e6, allow_nan=False, allow_infinity=False)
    i_f = torch.tensor(data.draw(st.lists(pos, min_size=size, max_size=size)), dtype=torch.float64)
    i_r = torch.tensor(data.draw(st.lists(pos, min_size=size, max_size=size)), dtype=torch.float64)
    m = select_weights({"w": i_f}, {"w": i_r}, gamma)["w"]
    ratio = i_f / i_r
    assert not torch.isnan(ratio).any()
    clear = (ratio - gamma).abs() > 1e-9 * gamma  # away from the boundary, the two rules agree
    assert torch.equal(m[clear], (ratio > gamma)[clear])
