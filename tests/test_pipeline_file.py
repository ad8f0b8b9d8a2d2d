"""``bergson-ray FILE.yaml``: bergson's pipeline documents translated to our configs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import anchor
import pytest
import yaml

from bergson_ray.cli.main import COMMANDS, main
from bergson_ray.cli.pipeline_file import is_pipeline_argument, plan, read_document
from bergson_ray.config import BuildConfig, EkfacRunConfig
from bergson_ray.config.bergson_steps import expand_matrix
from bergson_ray.errors import BadInputError

# bergson's examples/compare_wikitext/ekfac.yaml (first step), only paths and sizes changed
EKFAC_STEP = """
run_path: {root}/ekfac
steps:
  - ekfac:
      index_cfg:
        run_path: {root}/ekfac
        model: tiny
        overwrite: true
        token_batch_size: 256
        max_batch_size: 8
        filter_modules: "embed_out"
        distributed:
          nproc_per_node: 8
          nnode: 1
        data:
          dataset: tiny
          split: "train"
          chunk_length: 0
      hessian_cfg:
        method: kfac
        ev_correction: true
      score_cfg:
        batch_size: 1024
        query_batch_size: 4
      preprocess_cfg:
        unit_normalize: false
      hessian_pipeline_cfg:
        query:
          dataset: tiny
          split: "train[:4]"
          chunk_length: 0
        query_aggregation: none
        inversion_cfg:
          damping_factor: 0.2
"""


def _doc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(textwrap.dedent(text).format(root=tmp_path))
    return path


def test_bergson_ekfac_step_becomes_our_config(tmp_path):
    (step,) = plan(read_document(_doc(tmp_path, EKFAC_STEP)), COMMANDS)
    cfg = step.config
    assert isinstance(cfg, EkfacRunConfig)
    assert cfg.run.run_path == str(tmp_path / "ekfac") and cfg.run.overwrite
    assert (cfg.batch.token_batch_size, cfg.batch.max_batch_size) == (256, 8)
    assert cfg.grad.filter_modules == "embed_out"
    assert cfg.hessian.method == "kfac" and cfg.hessian.ev_correction
    assert cfg.query.dataset == "tiny" and cfg.query.split == "train[:4]"
    assert cfg.query_aggregation == "none" and cfg.query_batch_size == 4
    assert cfg.damping_factor == 0.2
    # everything not given keeps the command's default
    assert cfg.grad.projection_dim == EkfacRunConfig().grad.projection_dim


VALIDATE_STEP = """
  - validate:
      run_path: {root}/validate_ekfac
      model: tiny
      overwrite: true
      scores: {root}/ekfac/scores
      retrained_dir: {root}/bank
      data:
        dataset: tiny
        split: "train"
        chunk_length: 0
      query:
        dataset: tiny
        split: "train[:4]"
        chunk_length: 0
      distributed:
        nproc_per_node: 8
        nnode: 1
      batch_size: 64
"""


def test_bergson_compare_wikitext_ekfac_document_plans(tmp_path):
    """bergson's two-step examples/compare_wikitext/ekfac.yaml (ekfac, then validate on a
    saved bank with the old flat keys) becomes two validated configs."""
    ekfac, validate = plan(read_document(_doc(tmp_path, EKFAC_STEP + VALIDATE_STEP)), COMMANDS)
    assert ekfac.command == "ekfac" and validate.command == "validate"
    v = validate.config
    assert v.run.run_path == str(tmp_path / "validate_ekfac") and v.run.overwrite
    assert v.scores == str(tmp_path / "ekfac" / "scores")
    assert v.method == "lds" and v.lds.subsets == "bank" and v.lds.paths == [str(tmp_path / "bank")]
    assert v.training.batch_size == 64 and v.query.split == "train[:4]"


MAGIC_DOCS = {
    # bergson's examples/compare_wikitext/magic.yaml, paths and sizes changed
    "compare_wikitext": """
run_path: {root}/compare
steps:
  - magic:
      run_path: {root}/random
      model: tiny
      overwrite: true
      resume: true
      data: {{dataset: tiny, split: "train[:16]", chunk_length: 0}}
      query: {{dataset: tiny, split: "train[:2]", chunk_length: 0}}
      distributed: {{nproc_per_node: 8, nnode: 1}}
      batch_size: 4
      grad_accum_steps: 2
      double_backward_batch_size: 2
      num_epochs: 1
      lr_schedule:
        lr_scheduler_type: polynomial
        lr: 0.0008
        lr_start: 1e-6
        lr_end: 0.00008
        warmup_steps: 0.25
      skip_validation: false
      num_subsets: 8
      subset_fraction: 0.25
      save_models: true
      save_optimizer_state: last
      wandb_project: magic
""",
    # bergson's examples/magic/gpt2_wikitext_tiny.yaml, paths and sizes changed
    "gpt2_wikitext_tiny": """
steps:
  - magic:
      run_path: {root}/gpt2_wikitext
      model: tiny
      overwrite: true
      data: {{dataset: tiny, split: "train", chunk_length: 0}}
      query: {{dataset: tiny, split: "train[0:1]", chunk_length: 0}}
      distributed: {{nproc_per_node: 1}}
      batch_size: 8
      grad_accum_steps: 4
      double_backward_batch_size: 4
      num_epochs: 1
      lr_schedule:
        lr_scheduler_type: polynomial
        lr: 0.0008
        lr_start: 1e-6
        lr_end: 0.00008
        warmup_steps: 0.25
      wandb_project: magic
""",
}


@pytest.mark.parametrize("name", sorted(MAGIC_DOCS))
def test_bergson_magic_examples_plan(tmp_path, name):
    (step,) = plan(read_document(_doc(tmp_path, MAGIC_DOCS[name])), COMMANDS)
    cfg = step.config
    t = cfg.training
    assert step.command == "magic" and cfg.model.model == "tiny"
    assert t.lr_schedule.lr_scheduler_type == "polynomial" and t.lr_schedule.lr == 0.0008
    assert t.lr_schedule.warmup_steps == 0.25 and t.grad_accum_steps in (2, 4)
    assert cfg.magic.double_backward_batch_size in (2, 4)
    if name == "compare_wikitext":
        assert step.resume and not cfg.magic.skip_validation
        assert (cfg.lds.count, cfg.lds.fraction) == (8, 0.25) and cfg.save_models
        assert t.save_optimizer_state == "last"


# bergson's examples/compare_wikitext/trackstar.yaml (first step), paths and sizes changed
TRACKSTAR_STEP = """
run_path: {root}/trackstar
steps:
  - trackstar:
      index_cfg:
        projection_dim: 32
        run_path: {root}/trackstar
        model: tiny
        overwrite: true
        token_batch_size: 256
        filter_modules: "embed_out"
        distributed: {{nproc_per_node: 8, nnode: 1}}
        data: {{dataset: tiny, split: "train", chunk_length: 0}}
      trackstar_cfg:
        stats_sample_size: 100
        query: {{dataset: tiny, split: "train[0:4]", chunk_length: 0}}
        preprocess_cfg: {{unit_normalize: true, aggregation: none}}
        score_cfg: {{batch_size: 1024}}
"""


def test_bergson_trackstar_example_plans(tmp_path):
    (step,) = plan(read_document(_doc(tmp_path, TRACKSTAR_STEP)), COMMANDS)
    cfg = step.config
    assert step.command == "trackstar" and cfg.grad.projection_dim == 32
    assert cfg.stats_sample_size == 100 and cfg.query.split == "train[0:4]"
    assert cfg.preprocess.unit_normalize and cfg.grad.filter_modules == "embed_out"


def test_our_own_config_yaml_round_trips(tmp_path):
    import dataclasses

    cfg = BuildConfig()
    cfg.run.run_path = str(tmp_path / "r")
    cfg.grad.projection_dim = 8
    path = tmp_path / "ours.yaml"
    path.write_text(yaml.safe_dump({"steps": [{"build": dataclasses.asdict(cfg)}]}))
    (step,) = plan(read_document(path), COMMANDS)
    assert step.config == cfg


def test_matrix_expands_with_typed_and_textual_substitution():
    cells = expand_matrix(
        {"matrix": {"p": [8, 16]}, "index_cfg": {"run_path": "runs/p{p}", "projection_dim": "{p}"}}
    )
    assert [c["index_cfg"] for c in cells] == [
        {"run_path": "runs/p8", "projection_dim": 8},
        {"run_path": "runs/p16", "projection_dim": 16},
    ]
    with pytest.raises(BadInputError, match="both write"):
        expand_matrix({"matrix": {"p": [8, 16]}, "index_cfg": {"run_path": "runs/same"}})


@pytest.mark.parametrize(
    "steps,match",
    [
        ("- buld: {}", "unknown command 'buld'"),
        ("- status: {}", "`status` cannot run from a pipeline file"),
        ("- build: {index_cfg: {run_path: x, projection_dimm: 3}}", "unknown option 'projection_dimm'"),
        ("- build: {index_cfg: {run_path: x, grad_checkpointing: true}}", "grad_checkpointing=True"),
        ("- build: {index_cfg: {run_path: x, token_batch_size: 1}}", "token_batch_size must be > 1"),
        ("- build: [1, 2]", "expected a mapping"),
        ("- build: {}\n  score: {}", "must be one"),
    ],
)
def test_bad_documents_fail_before_any_step_runs(tmp_path, steps, match, capsys):
    first = f"- build: {{index_cfg: {{run_path: {tmp_path}/first}}}}\n"
    path = tmp_path / "bad.yaml"
    path.write_text("steps:\n" + textwrap.indent(first + steps, "  "))
    with pytest.raises(BadInputError, match=match):
        plan(read_document(path), COMMANDS)
    assert main([str(path)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "first").exists() and not (tmp_path / "first.part").exists()


def test_pipeline_argument_detection(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("steps: []")
    assert is_pipeline_argument(["p.yaml"]) == "p.yaml"
    assert is_pipeline_argument(["build", "p.yml"]) == "p.yml"
    assert is_pipeline_argument([str(tmp_path / "run")]) == str(tmp_path / "run" / "config.yaml")
    assert is_pipeline_argument(["build", "runs/x"]) is None
    assert is_pipeline_argument(["build", "runs/x", "--projection_dim", "3"]) is None


def test_resume_skips_complete_steps_and_runs_the_rest(tmp_path, monkeypatch):
    """A fake command records what runs: with ``resume: true`` a step whose run dir is
    complete is skipped, the others run in order."""
    pkg = tmp_path / "fakecmd"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "cmd.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path
            from bergson_ray.cli.command import ConfigCommand
            from bergson_ray.config import BuildConfig

            RAN = []

            def fake(cfg):
                RAN.append(cfg.run.run_path)
                Path(cfg.run.run_path).mkdir()
                return cfg.run.run_path

            COMMAND = ConfigCommand("build", BuildConfig, "fake", "fakecmd.cmd:fake", "done {}")
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from bergson_ray.cli.pipeline_file import run_document

    (tmp_path / "a").mkdir()  # step 1 finished earlier
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run_path": str(tmp_path / "pipe"),
                "resume": True,
                "steps": [
                    {"build": {"index_cfg": {"run_path": str(tmp_path / "a")}}},
                    {"build": {"index_cfg": {"run_path": str(tmp_path / "b")}}},
                ],
            }
        )
    )
    import fakecmd.cmd as fake

    assert run_document(path, {"build": "fakecmd.cmd"}) == 0
    assert fake.RAN == [str(tmp_path / "b")]
    resolved = yaml.safe_load((tmp_path / "pipe" / "config.yaml").read_text())
    assert [list(s) for s in resolved["steps"]] == [["build"], ["build"]]
    assert resolved["steps"][1]["build"]["run"]["run_path"] == str(tmp_path / "b")


# bergson 2.5.1's lissa and approxunrolling steps, with the keys that carry over only by
# translation: index_cfg.drop_columns, lissa_cfg.batch_size beside score_cfg.batch_size,
# the query set's path (an existing query index) and aggregation
LISSA_AND_UNROLLING = """
steps:
  - lissa:
      index_cfg:
        run_path: {root}/lissa
        model: tiny
        drop_columns: true
        profile: false
        data: {{dataset: tiny, split: "train[:16]", truncation: true}}
      score_cfg: {{batch_size: 1024, query_path: "", candidates: {{scores: "", top_k: 0}}}}
      preprocess_cfg:
        unit_normalize: false
        hessian_path: null
        inversion_cfg: {{damping_factor: 0.1, inversion: damped_inverse, apply_batch_size: 2}}
      lissa_cfg:
        batch_size: 4
        micro_batch_size: 2
        depth: 30
        scale: 300.0
        seed: 3
        query: {{dataset: tiny, split: "train[:2]", path: {root}/q_lissa, aggregation: mean}}
  - approxunrolling:
      index_cfg:
        run_path: {root}/source
        model: tiny
        drop_columns: false
        data: {{dataset: tiny, split: "train[:16]"}}
      hessian_cfg: {{method: kfac, ev_correction: true}}
      approx_unrolling_cfg:
        checkpoints: [{root}/ckpt_a, {root}/ckpt_b]
        segments: 2
        inversion_cfg: {{apply_batch_size: 3, damping_factor: 0.2}}
        query: {{dataset: tiny, split: "train[:2]", path: {root}/q_source, aggregation: sum}}
"""


def test_bergson_lissa_and_approxunrolling_steps_plan_to_our_flags(tmp_path):
    lissa, source = plan(read_document(_doc(tmp_path, LISSA_AND_UNROLLING)), COMMANDS)
    c = lissa.config
    assert lissa.command == "lissa"
    # lissa_cfg.batch_size is LiSSA's batch; score_cfg.batch_size (1024) lands nowhere
    assert (c.lissa.batch_size, c.lissa.micro_batch_size) == (4, 2)
    assert (c.lissa.depth, c.lissa.scale, c.lissa.seed) == (30, 300.0, 3)
    assert c.score.query_path == str(tmp_path / "q_lissa")  # query.path -> --query_path
    assert c.query_aggregation == "mean" and c.query.split == "train[:2]"
    assert c.data.split == "train[:16]" and c.data.truncation
    s = source.config
    assert source.command == "approxunrolling"
    assert s.query_path == str(tmp_path / "q_source") and s.aggregation == "sum"
    assert s.checkpoints == [str(tmp_path / "ckpt_a"), str(tmp_path / "ckpt_b")]
    assert (s.segments, s.apply_batch_size, s.damping_factor) == (2, 3, 0.2)
    # drop_columns stays a real flag where the command has one
    (build,) = plan(read_document(_doc(tmp_path, """
steps:
  - build: {{index_cfg: {{run_path: {root}/b, drop_columns: true}}}}
""")), COMMANDS)  # fmt: skip
    assert build.config.drop_columns is True


@pytest.mark.parametrize(
    "body,match",
    [  # options bergson would act on and these commands lack are refused, not dropped
        ("lissa: {score_cfg: {candidates: {top_k: 5, scores: x}}}", "top_k=5"),
        ("lissa: {preprocess_cfg: {hessian_path: h}}", "hessian_path='h'"),
        ("ekfac: {hessian_pipeline_cfg: {query: {path: q}}}", "path='q'"),
    ],
)
def test_untranslatable_bergson_keys_are_refused(tmp_path, body, match):
    path = tmp_path / "p.yaml"
    path.write_text(f"steps:\n  - {body}\n")
    with pytest.raises(BadInputError, match=match):
        plan(read_document(path), COMMANDS)


DUMP = """
import yaml
from bergson.cli.commands import ApproxUnrolling, Lissa
from bergson.config.config import (ApproxUnrollingConfig, DataConfig, HessianConfig,
    IndexConfig, LissaConfig, PreprocessConfig, QuerySetConfig, ScoreConfig)
idx = IndexConfig(run_path="R", model="tiny", data=DataConfig(dataset="tiny"))
q = QuerySetConfig(dataset="tiny", split="train[:2]", path="Q", aggregation="mean")
print(yaml.safe_dump({"steps": [
    {"lissa": Lissa(idx, ScoreConfig(), PreprocessConfig(),
                    LissaConfig(query=q, batch_size=8)).to_dict()},
    {"approxunrolling": ApproxUnrolling(idx, HessianConfig(method="kfac", ev_correction=True),
        ApproxUnrollingConfig(checkpoints=["a", "b"], segments=2, query=q)).to_dict()},
]}))
"""


@anchor.needs_venv
def test_bergsons_own_lissa_and_approxunrolling_configs_plan(tmp_path):
    """bergson writes every field of its configs (config.yaml of its runs): all of its
    lissa and approxunrolling fields translate."""
    proc = anchor.run(["python", "-c", DUMP])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    path = tmp_path / "bergson.yaml"
    path.write_text(out)
    lissa, source = plan(read_document(path), COMMANDS)
    assert lissa.config.lissa.batch_size == 8 and lissa.config.score.query_path == "Q"
    assert lissa.config.query_aggregation == "mean"
    assert source.config.query_path == "Q" and source.config.aggregation == "mean"
