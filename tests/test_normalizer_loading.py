"""Adam / Adafactor normalizers loaded from real optimizer states (no Ray)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from bergson_ray.config import GradientConfig
from bergson_ray.errors import BadInputError
from bergson_ray.gradients.modules import find_target_modules, weight_shape
from bergson_ray.gradients.normalizers import (
    AdafactorNormalizer,
    AdamNormalizer,
    load_optimizer_normalizers,
)


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))


def trained_adam_state(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 50, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    return opt


def test_torch_optimizer_pt_maps_to_modules_in_out_in_orientation(tmp_path):
    model = gpt2()
    opt = trained_adam_state(model)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    mods = find_target_modules(model, GradientConfig())
    norms = load_optimizer_normalizers(str(tmp_path), model, mods, include_bias=True)
    assert set(norms) == set(mods)
    params = dict(model.named_parameters())
    for name, n in norms.items():
        assert isinstance(n, AdamNormalizer)
        assert tuple(n.weight_avg_sq.shape) == weight_shape(mods[name])
        # HF Conv1D stores [I, O]: the normalizer is the transposed moment
        v = opt.state[params[f"transformer.{name}.weight"]]["exp_avg_sq"]
        torch.testing.assert_close(n.weight_avg_sq, v.t())
        assert n.bias_avg_sq is not None


def test_safetensors_adam_and_adafactor(tmp_path, tiny_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets.model_dir)
    mods = find_target_modules(model, GradientConfig())
    norms = load_optimizer_normalizers(str(tiny_assets.model_dir), model, mods, include_bias=False)
    assert set(norms) == set(mods) and all(isinstance(n, AdamNormalizer) for n in norms.values())

    factored = {}
    for name, mod in mods.items():
        o, i = weight_shape(mod)
        pname = next(p for p, t in model.named_parameters() if p.endswith(f"{name}.weight"))
        factored[f"{pname}.exp_avg_sq_row"] = torch.rand(o) + 0.1
        factored[f"{pname}.exp_avg_sq_col"] = torch.rand(i) + 0.1
    save_file(factored, str(tmp_path / "optimizer_state.safetensors"))
    ada = load_optimizer_normalizers(str(tmp_path), model, mods, include_bias=False)
    assert all(isinstance(n, AdafactorNormalizer) for n in ada.values())


def test_missing_moments_and_files_are_clear_errors(tmp_path):
    model = gpt2()
    mods = find_target_modules(model, GradientConfig())
    with pytest.raises(BadInputError, match="does not exist"):
        load_optimizer_normalizers(str(tmp_path / "nope.pt"), model, mods, False)
    save_file({"unrelated.exp_avg_sq": torch.ones(2)}, str(tmp_path / "optimizer_state.safetensors"))
    with pytest.raises(BadInputError, match="no second moments"):
        load_optimizer_normalizers(str(tmp_path), model, mods, False)
