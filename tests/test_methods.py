"""Merge methods against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from medsamix.merging import kernels
from medsamix.errors import ConfigError
from medsamix.merging.methods import REGISTRY, Sources, get_method

ALIASES = ["sam", "a", "b"]


def run(method: str, base, models, **params) -> torch.Tensor:
    m = get_method(method)
    src = Sources.of(torch.tensor(base, dtype=torch.float32), [torch.tensor(x, dtype=torch.float32) for x in models])
    aliases = ALIASES[: len(models) + 1]
    return m.fn(src, m.resolve(params, aliases), None)


def close(x: torch.Tensor, expected) -> bool:
    return torch.allclose(x, torch.tensor(expected, dtype=torch.float32), atol=1e-5)


def test_registry_has_all_methods():
    assert set(REGISTRY) == {"linear", "task_arithmetic", "ties", "slerp", "pick", "dare"}


def test_linear_normalises_weights():
    out = run("linear", [1, 2], [[3, 4], [5, 6]], weights={"sam": 1, "a": 1, "b": 2})
    assert close(out, [3.5, 4.5])  # (1 + 3 + 2*5) / 4, (2 + 4 + 2*6) / 4


def test_linear_missing_alias_counts_as_zero():
    assert close(run("linear", [1, 2], [[3, 4], [5, 6]], weights={"b": 0.3}), [5, 6])


def test_task_arithmetic():
    # tau_a = [2, 2], tau_b = [4, 4]; base + 0.5 * (tau_a + tau_b)
    assert close(run("task_arithmetic", [1, 2], [[3, 4], [5, 6]], scale=0.5), [4, 5])


def test_task_arithmetic_weights_per_model():
    base, models = [1, 2], [[3, 4], [5, 6]]  # tau_a = [2, 2], tau_b = [4, 4]
    # default: every model weighs 1 (the recipes written before weights existed mean the same)
    assert close(run("task_arithmetic", base, models, scale=0.5, weights={"a": 1, "b": 1}),
                 run("task_arithmetic", base, models, scale=0.5))
    # base + 1.0 * (1.2 tau_a + 0 tau_b): extrapolates model a alone
    assert close(run("task_arithmetic", base, models, scale=1.0, weights={"a": 1.2, "b": 0}), [3.4, 4.4])
    assert close(run("task_arithmetic", base, models, scale=0.5, weights={"b": 0.5}), [2, 3])  # missing a -> 0
    for bad, match in [({"sam": 1.0}, "base"), ({"a": -0.1}, "a"), ({"a": 3.5}, "a"), ({"a": float("nan")}, "a"),
                       ([1, 1], "mapping")]:
        with pytest.raises(ConfigError, match=match):
            run("task_arithmetic", base, models, scale=0.5, weights=bad)


def test_ties_trim_elect_disjoint_mean():
    base = [0, 0, 0, 0]
    models = [[3, -1, 0.5, -2], [-1, 2, -0.2, -3]]
    # keep 50%: a -> [3, 0, 0, -2], b -> [0, 2, 0, -3]; signs + + 0 -; disjoint means 3, 2, 0, -2.5
    assert close(run("ties", base, models, keep=0.5, scale=1.0), [3, 2, 0, -2.5])
    assert close(run("ties", [1, 1, 1, 1], [[x + 1 for x in m] for m in models], keep=0.5, scale=0.5),
                 [2.5, 2, 1, -0.25])


def test_ties_sign_conflict_keeps_majority_mass():
    # no trimming; element 0: 1 + 2 > 0 -> mean(1, 2); element 1: -4 + 1 < 0 -> only -4 agrees
    assert close(run("ties", [0, 0], [[1, -4], [2, 1]], keep=1.0, scale=1.0), [1.5, -4])
    # three models; element 0: 1 + 2 - 5 < 0 -> only -5 agrees; element 1: -4 + 1 + 1 < 0 -> only -4 agrees
    out = get_method("ties").fn(Sources.of(torch.zeros(2), [torch.tensor([1.0, -4]), torch.tensor([2.0, 1]),
                                                              torch.tensor([-5.0, 1])]),
                                {"keep": 1.0, "scale": 1.0}, None)
    assert close(out, [-5, -4])


def test_ties_keep_zero_is_base():
    assert close(run("ties", [1, 2], [[3, 4], [5, 6]], keep=0.0, scale=1.0), [1, 2])


def test_slerp_two_point_no_cap():
    base, model = [1, 0], [[0, 1]]
    assert close(run("slerp", base, model, t=0.0), [1, 0])
    assert close(run("slerp", base, model, t=1.0), [0, 1])
    h = math.sqrt(0.5)
    assert close(run("slerp", base, model, t=0.5), [h, h])
    # t beyond 0.5 really moves past the midpoint
    assert close(run("slerp", base, model, t=0.8), [math.sin(0.2 * math.pi / 2), math.sin(0.8 * math.pi / 2)])


def test_slerp_many_models_goes_to_spherical_centroid():
    base = [1, 0, 0]
    models = [[0, 2, 0], [0, 0, 2]]
    r = math.sqrt(2)  # centroid direction (0, 1, 1)/sqrt(2), mean norm 2 -> (0, sqrt2, sqrt2)
    assert close(run("slerp", base, models, t=1.0), [0, r, r])
    h = math.sqrt(0.5)
    assert close(run("slerp", base, models, t=0.5), [h, h * r, h * r])


def test_slerp_parallel_falls_back_to_lerp():
    assert close(run("slerp", [1, 1], [[2, 2]], t=0.5), [1.5, 1.5])
    assert close(run("slerp", [0, 0], [[2, 4]], t=0.25), [0.5, 1.0])


def test_pick():
    assert close(run("pick", [1, 2], [[3, 4], [5, 6]], source="b"), [5, 6])
    assert close(run("pick", [1, 2], [[3, 4], [5, 6]], source="sam"), [1, 2])


def test_dare_drop_zero_is_task_arithmetic():
    assert close(run("dare", [1, 2], [[3, 4], [5, 6]], drop=0.0, scale=0.5, seed=3), [4, 5])


def test_dare_is_seeded_and_rescales():
    n = 20000
    base = torch.zeros(n)
    models = [torch.ones(n)]
    m = get_method("dare")
    params = m.resolve({"drop": 0.75, "scale": 1.0, "seed": 7}, ["sam", "a"])
    out1 = m.fn(Sources.of(base, models, key="w"), params, None)
    out2 = m.fn(Sources.of(base, models, key="w"), params, None)
    out3 = m.fn(Sources.of(base, models, key="w"), {**params, "seed": 8}, None)
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)
    values = set(out1.unique().tolist())
    assert values == {0.0, 4.0}  # dropped, or kept and rescaled by 1 / (1 - 0.75)
    kept = float((out1 > 0).float().mean())
    assert abs(kept - 0.25) < 0.02
    assert abs(float(out1.mean()) - 1.0) < 0.08  # unbiased in expectation


def test_out_argument_is_written_in_place():
    src = Sources.of(torch.tensor([1.0, 2.0]), [torch.tensor([3.0, 4.0])])
    for name in REGISTRY:
        m = get_method(name)
        out = torch.empty(2)
        res = m.fn(src, m.resolve({"source": "a"} if name == "pick" else
                                  {"weights": {"sam": 1, "a": 1}} if name == "linear" else {}, ["sam", "a"]), out)
        assert res.data_ptr() == out.data_ptr(), name


@pytest.mark.parametrize(
    "method,params,match",
    [
        ("linear", {"weights": {"sam": 0, "a": 0, "b": 0}}, "all weights are zero"),
        ("linear", {"weights": {"sam": -1, "a": 1}}, "weights.sam"),
        ("linear", {"weights": {"c": 1}}, "unknown source"),
        ("ties", {"keep": 1.5, "scale": 1}, r"keep: 1.5 is outside \[0.0, 1.0\]"),
        ("ties", {"keep": 0.5, "lambda": 1}, "unknown parameter"),
        ("slerp", {"t": "half"}, "expected a number"),
        ("slerp", {"t": float("nan")}, "outside"),
        ("pick", {"source": "models/medsam.pth"}, "unknown source"),
        ("dare", {"drop": 1.0}, r"outside \[0.0, 1.0\)"),
        ("dare", {"seed": 1.5}, "expected an integer"),
        ("pick", {}, "required"),
    ],
)
def test_bad_parameters_are_rejected(method, params, match):
    with pytest.raises(ConfigError, match=match):
        get_method(method).resolve(params, ALIASES, where="groups.enc.neck")


def test_unknown_method():
    with pytest.raises(ConfigError, match="unknown merge method 'fisher'"):
        get_method("fisher")


def test_compiled_kernels_equal_eager():
    """The fused (torch.compile) kernels compute exactly what the eager definitions compute."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5000, generator=g)
    models = torch.randn(3, 5000, generator=g)
    src = Sources(base=base, models=models)
    outs = {}
    for enabled in (False, True):
        kernels.set_compile(enabled)
        try:
            outs[enabled] = [
                get_method("ties").fn(src, {"keep": 0.3, "scale": 0.7}, None),
                get_method("dare").fn(src, {"drop": 0.4, "scale": 0.9, "seed": 1}, None),
            ]
        finally:
            kernels.set_compile(False)
    for eager, fused in zip(outs[False], outs[True]):
        assert torch.allclose(eager, fused, atol=1e-6)
