"""The ``ekfac`` pipeline scores ⟨g_b, H⁻¹ q̄⟩, checked against an in-process computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bergson_ray.hessians.preconditioner import load_preconditioner

pytestmark = pytest.mark.ray


def in_process_rows(split: str, projection_dim: int = 0) -> torch.Tensor:
    from bergson_ray.config import BatchConfig, DataConfig, GradientConfig, ModelConfig
    from bergson_ray.runners.gradient_runner import GradientRunner, RunnerSpec

    runner = GradientRunner(
        RunnerSpec(
            ModelConfig(),
            GradientConfig(projection_dim=projection_dim),
            DataConfig(split=split),
            BatchConfig(),
        )
    )
    n = int(split.split(":")[1].rstrip("]"))
    return torch.from_numpy(runner.gradients(np.arange(n))["grads"]).float()


@pytest.mark.parametrize("projection_dim", [0, 8])
def test_ekfac_scores_are_preconditioned_inner_products(
    ray_session, tiny_assets, tmp_path, projection_dim
):
    from bergson_ray.config import GradientConfig, ModelConfig
    from bergson_ray.gradients.projection import ProjectionCache
    from bergson_ray.pipelines.ekfac import ekfac
    from bergson_ray.pipelines.stages import plan_layout
    from bergson_ray.store.gradient_store import GradientStore
    from bergson_ray.store.score_store import ScoreStore

    out = ekfac(
        run_path=str(tmp_path / "ek"), split="train[:12]", window_size=8,
        projection_dim=projection_dim, executor="process",  # its build/score stages
    )  # fmt: skip
    root = tmp_path / "ek"
    scores = torch.from_numpy(ScoreStore.open(out).scores)
    assert scores.shape == (12, 1)  # query_aggregation mean: one column

    query = GradientStore.open(root / "query")
    q = torch.from_numpy(np.asarray(query.rows(np.arange(query.num_grads)))).float()
    assert q.shape[0] == 1  # aggregated
    pre = load_preconditioner(str(root / "hessian" / "kfac"), ev_correction=True)
    hq = pre.apply_inverse(q, -1.0, grad_sizes=query.grad_sizes)
    if projection_dim:
        proj = ProjectionCache("rademacher", "jl", version=GradientConfig().projection_version)
        blocks, start = [], 0
        for name, size in query.grad_sizes.items():
            o, i = pre.factors[name].shape
            g = hq[:, start : start + size].reshape(-1, o, i)
            left = proj.get(name, "left", projection_dim, o, torch.float32, "cpu")
            right = proj.get(name, "right", projection_dim, i, torch.float32, "cpu")
            blocks.append((left @ g @ right.T).reshape(len(g), -1))
            start += size
        hq = torch.cat(blocks, dim=1)
        sizes = plan_layout(ModelConfig(), GradientConfig(projection_dim=projection_dim)).grad_sizes
        assert hq.shape[1] == sum(sizes.values())
    g = in_process_rows("train[:12]", projection_dim)
    expected = g @ hq.T
    assert torch.allclose(scores, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    # the preconditioned query store records its Hessian, so score never applies it twice
    from bergson_ray.pipelines.score import query_preprocess_done

    done = query_preprocess_done(root / "kfac_query")
    assert done.hessian_path and done.ev_correction
