"""Config validation, module assignment and shard bookkeeping (no Ray, no model)."""

from __future__ import annotations

import pytest
import torch

from bergson_ray.config import GradientConfig, HessianConfig, HessianRunConfig, as_config
from bergson_ray.errors import BadInputError
from bergson_ray.hessians.assign import assign_modules
from bergson_ray.hessians.kfac import KFACAccumulator
from bergson_ray.hessians.shard_state import ShardState
from bergson_ray.hessians.specs import ModuleSpec


@pytest.mark.parametrize(
    "hkw,gkw,match",
    [
        ({"method": "autocorrelation", "ev_correction": True}, {}, "factored"),
        ({"method": "kfac", "ev_correction": True}, {"projection_dim": 8}, "projection_dim 0"),
        ({"method": "kfac"}, {"split_attention_modules": ["x"]}, "whole module"),
        ({"hessian_dtype": "fp8"}, {}, "dtype"),
        ({"method": "autocorrelation"}, {"projection_dim": 4, "projection_target": "global"}, "global"),
        ({"method": "newton"}, {}, "unknown --method"),
        ({"num_shards": -1}, {}, "num_shards"),
    ],
)
def test_validation_names_the_problem(hkw, gkw, match):
    """Each bad combination fails when the config is made, whatever makes it."""
    with pytest.raises(BadInputError, match=match):
        HessianRunConfig(hessian=HessianConfig(**hkw), grad=GradientConfig(**gkw))
    with pytest.raises(BadInputError, match=match):
        as_config(HessianRunConfig, {"hessian": hkw, "grad": gkw})


def test_assignment_balances_cost_and_keeps_order():
    costs = {f"m{i}": float(c) for i, c in enumerate([8, 1, 1, 8, 4, 4, 2, 2])}
    groups = assign_modules(costs, 3)
    loads = sorted(sum(costs[m] for m in g) for g in groups)
    assert sorted(m for g in groups for m in g) == sorted(costs)
    assert loads[-1] - loads[0] <= 2
    order = list(costs)
    assert all(g == sorted(g, key=order.index) for g in groups)
    assert assign_modules(costs, 3) == groups  # deterministic


def test_shard_state_merge_is_idempotent_and_finalize_frees_sums():
    specs = {"a": ModuleSpec(3, 4, False), "b": ModuleSpec(2, 2, True)}
    st = ShardState(specs, HessianConfig(method="kfac"))
    part = {}
    for name, s in specs.items():
        acc = KFACAccumulator(s.in_features, s.out_features, bias=s.bias)
        acc.update(torch.randn(2, 5, s.in_features), torch.randn(2, 5, s.out_features), None)
        part[name] = acc.state_dict()
    assert st.merge("w0", part) and not st.merge("w0", part)  # a re-sent contribution is ignored
    assert st.counts() == {"a": 10, "b": 10}
    with pytest.raises(ValueError):
        st.merge("w1", {"a": part["a"]})  # wrong module set
    before = st.nbytes
    st.finalize(num_documents=2)
    st.finalize(num_documents=2)  # idempotent (a replayed call)
    assert st.counts() == {"a": 10, "b": 10} and not st.acc
    assert set(st.results) == {"a", "b"} and st.results["b"].shape == (2, 3)
    assert st.nbytes > 0 and before > 0
    slices = st.file_slices(2)
    assert slices[0]["factor_eig_a"]["a"].shape == (4,) == slices[1]["factor_eig_a"]["a"].shape
