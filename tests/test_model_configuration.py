"""``test_model_configuration``: padding-sensitive models are flagged, the fix is printed,
and every flag it can print exists on build / score / hessian."""

from __future__ import annotations

import shlex

import pytest
import torch
import torch.nn.functional as F

from bergson_ray.cli.main import main, make_parser
from bergson_ray.config import ModelConfig
from bergson_ray.diagnostics.padding import gradient_cosine
from bergson_ray.diagnostics.settings import Setting, escalation, kernel_state


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is fastest, and spares the shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAST = ["--precision", "fp32", "--n_trials", "3", "--max_len", "40", "--max_documents", "24"]


def leaky_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """Attention that ignores the causal mask: every token sees the padding after it."""
    out = F.scaled_dot_product_attention(query, key, value, is_causal=False, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def leaky():
    from transformers import AttentionInterface

    AttentionInterface.register("leaky", leaky_attention)
    return "attn_implementation=leaky"


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(["test_model_configuration", *FAST, *args])
    return rc, capsys.readouterr().out


def test_consistent_model_passes_with_defaults(tiny_assets, capsys):
    rc, out = run_cli(capsys)
    assert rc == 0, out
    assert "no flags needed" in out
    assert out.count("== Padding:") == 1  # stopped at the first setting without a flagged trial
    assert "PASS  equal-length batching" in out


def test_padding_sensitive_model_is_flagged_and_fixed(tiny_assets, capsys, leaky):
    """Attention that leaks padding into the document diverges under sdpa's and the math
    kernel's settings alike; the model's eager attention (causal) fixes it, and that is
    the flag printed."""
    rc, out = run_cli(capsys, "--model_kwargs", leaky)
    assert rc == 0, out
    assert "FAIL  padding, defaults (precision=fp32)" in out
    assert "FAIL  padding, --force_math_sdp" in out
    assert "PASS  padding, --model_kwargs attn_implementation=eager" in out
    line = next(ln for ln in out.splitlines() if "Add to build / score / hessian:" in ln)
    flags = shlex.split(line.split(":", 1)[1])
    assert flags == ["--model_kwargs", "attn_implementation=eager"]
    # equal-length batches never pad: the leak has nothing to leak
    assert "PASS  equal-length batching" in out


def test_every_recommended_flag_exists_on_build_score_hessian(tmp_path):
    """The union of what any rung can print parses on the three commands and reaches the
    model config."""
    flags: list[str] = []
    for gpu in (False, True):
        for s in escalation("bf16", on_gpu=gpu):
            flags += [f for f in s.flags("bf16") if f not in flags]
    assert {"--precision fp32", "--use_tf32_matmuls", "--force_math_sdp",
            "--model_kwargs attn_implementation=eager"} <= set(flags)
    parser = make_parser()
    for command in ("build", "score", "hessian"):
        args = parser.parse_args([command, str(tmp_path / command)] + shlex.split(" ".join(flags)))
        m = args.func.__self__.config_from_args(args).model  # the command's ConfigCommand
        assert (m.precision, m.force_math_sdp, m.use_tf32_matmuls) == ("fp32", True, True)
        assert m.model_kwargs == "attn_implementation=eager"


def test_escalation_order():
    cpu = [s.label("bf16") for s in escalation("bf16", on_gpu=False)]
    assert cpu == [
        "defaults (precision=bf16)", "--force_math_sdp",
        "--model_kwargs attn_implementation=eager", "--precision fp32",
        "--precision fp32 --force_math_sdp",
        "--precision fp32 --model_kwargs attn_implementation=eager",
    ]
    gpu = escalation("bf16", on_gpu=True)
    assert gpu[1] == Setting("fp32", use_tf32_matmuls=True)  # the cheapest fix on a GPU
    assert not any(s.use_tf32_matmuls for s in escalation("fp32", on_gpu=True))


def test_force_math_sdp_takes_effect_when_loading(tiny_assets):
    """--force_math_sdp switches SDPA to the math kernel (on CPU too) for the process that
    loads the model; kernel_state puts the switches back."""
    from bergson_ray.runners.model_loading import load_model

    flash_before = torch.backends.cuda.flash_sdp_enabled()
    with kernel_state():
        load_model(ModelConfig(model="tiny", force_math_sdp=True, use_tf32_matmuls=True))
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.flash_sdp_enabled() == flash_before
    assert torch.get_float32_matmul_precision() == "highest"


def test_gradient_cosine_is_exact_for_a_causal_model(tiny_assets):
    from bergson_ray.runners.model_loading import load_model

    model, _ = load_model(ModelConfig(model="tiny"))
    cos, loss_diff = gradient_cosine(model, torch.arange(5, 20), torch.arange(30, 60))
    assert cos == pytest.approx(1.0, abs=1e-6) and loss_diff < 1e-4
