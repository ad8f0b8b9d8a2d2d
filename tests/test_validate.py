"""``validate`` on Ray: oracle LDS, resume after a killed worker or driver, bad inputs.

Most tests use a stand-in retrainer (closed-form weighted ridge regression: a "retrain"
is exact and takes a configurable few milliseconds) so the pool, resume and bank logic
are tested in seconds; ``test_real_trainer_bank_round_trip`` runs the real trainer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray

from bergson_ray.errors import BadInputError
from bergson_ray.store.score_writer import ScoreWriter
from bergson_ray.testing.faults import FaultPlan

pytestmark = pytest.mark.ray
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

N_DOCS, N_QUERY, DIM = 24, 3, 4


@dataclass(frozen=True)
class ToySpec:
    """Picklable stand-in for ``RetrainSpec``: ``build()`` gives a ToyRetrainer."""

    seed: int = 0
    delay_s: float = 0.0
    n_docs: int = N_DOCS

    def build(self):
        return ToyRetrainer(self)

    def count_docs(self):
        return self.n_docs, N_QUERY


class ToyRetrainer:
    """Weighted ridge regression; query losses are squared errors of held-out points."""

    def __init__(self, spec: ToySpec):
        rng = np.random.default_rng(spec.seed)
        self.spec = spec
        self.x = rng.normal(size=(spec.n_docs, DIM))
        self.y = self.x @ rng.normal(size=DIM) + rng.normal(size=spec.n_docs)
        self.xq = rng.normal(size=(N_QUERY, DIM))
        self.yq = rng.normal(size=N_QUERY)

    def shape(self):
        from bergson_ray.validation.retrainer import DataShape

        return DataShape(self.spec.n_docs, N_QUERY, np.full(N_QUERY, 5, dtype=np.int64))

    def retrain(self, weights):
        w = np.ones(self.spec.n_docs) if weights is None else np.asarray(weights, np.float64)
        a = self.x.T @ (w[:, None] * self.x) + 0.1 * np.eye(DIM)
        time.sleep(self.spec.delay_s)
        return {"theta": np.linalg.solve(a, self.x.T @ (w * self.y))}

    def query_losses(self, params):
        return (self.xq @ params["theta"] - self.yq) ** 2

    def save(self, params, final: Path):
        from safetensors.numpy import save_file

        from bergson_ray.validation.bank import commit_model_dir

        tmp = final.with_name(f".{final.name}.tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text("{}")
        save_file({"theta": params["theta"]}, str(tmp / "model.safetensors"))
        commit_model_dir(tmp, final)

    def load(self, model_dir: Path):
        from safetensors.numpy import load_file

        return load_file(str(model_dir / "model.safetensors"))


def write_scores(path: Path, matrix: np.ndarray, higher_is_better: bool | None = None) -> Path:
    matrix = np.asarray(matrix, dtype=np.float32).reshape(len(matrix), -1)
    with ScoreWriter(path, len(matrix), matrix.shape[1]) as w:
        w.write(np.arange(len(matrix)), matrix)
    if higher_is_better is not None:
        doc = {"steps": [{"score": {"score_cfg": {"higher_is_better": higher_is_better}}}]}
        (path / "config.yaml").write_text(json.dumps(doc))
    return path


def run_validate(tmp_path, name, scores, *, spec=ToySpec(), faults=None, **kw):
    from bergson_ray.pipelines.validate import validate

    kw.setdefault("num_workers", 2)
    return validate(run_path=str(tmp_path / name), scores=str(scores), retrainer=spec,
                    faults=faults, **kw)


def summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def test_oracle_scores_give_lds_one(ray_session, tmp_path):
    toy = ToySpec().build()
    base = toy.query_losses(toy.retrain(None))
    oracle = np.zeros((N_DOCS, N_QUERY))
    for d in range(N_DOCS):  # each document's score = its actual leave-one-out loss change
        w = np.ones(N_DOCS)
        w[d] = 0
        oracle[d] = base - toy.query_losses(toy.retrain(w))
    scores = write_scores(tmp_path / "oracle", oracle)
    bank = run_validate(tmp_path, "bank", scores, count=N_DOCS, save_models=True)
    s = summary(bank)
    assert s["mean_lds"] == pytest.approx(1.0) and s["retrains_computed"] == N_DOCS + 1
    rows = (bank / "summary.csv").read_text().splitlines()
    assert rows[0] == "query,spearman_corr,spearman_p,pearson_corr,pearson_p,N,baseline_loss"
    assert len(rows) == 1 + N_QUERY
    assert sorted(sum(json.loads((bank / "subsets.json").read_text()), [])) == list(range(N_DOCS))
    # random scores on the saved bank: evaluated, not retrained, and no correlation to speak of
    noise = write_scores(tmp_path / "rand", np.random.default_rng(0).normal(size=(N_DOCS, N_QUERY)))
    out = run_validate(tmp_path, "noise", noise, subsets="bank", paths=[str(bank)])
    assert abs(summary(out)["mean_lds"]) < 0.5
    assert summary(out)["retrains_computed"] == N_DOCS + 1  # bank models evaluated


def test_score_signs_follow_the_store(tmp_path):
    from bergson_ray.validation.scores import load_loss_signed

    m = np.arange(6.0).reshape(3, 2)
    plain = load_loss_signed(write_scores(tmp_path / "magic", m))  # MAGIC: already loss-signed
    assert not plain.negated and np.array_equal(plain.matrix, m)
    flipped = load_loss_signed(write_scores(tmp_path / "grad", m, higher_is_better=True))
    assert flipped.negated and np.array_equal(flipped.matrix, -m)
    assert not load_loss_signed(tmp_path / "grad", higher_is_better=False).negated


@pytest.mark.slow
def test_real_trainer_bank_round_trip(ray_session, tmp_path):
    """Leave-one-out bank of the tiny model with the real trainer, then oracle scores."""
    from transformers import AutoModelForCausalLM

    n = 8
    common = dict(dataset="tiny", split=f"train[:{n}]", batch_size=4, lr=1e-3, num_workers=1,
                  executor="process",
                  **{"query.dataset": "tiny", "query.split": "train[40:42]"})
    placeholder = write_scores(tmp_path / "zero", np.random.default_rng(0).normal(size=(n, 2)))
    bank = run_validate(tmp_path, "bank", placeholder, spec=None, count=n, save_models=True, **common)
    assert summary(bank)["retrains_computed"] == n + 1
    subsets = json.loads((bank / "subsets.json").read_text())
    base = np.load(bank / "losses" / "base.npy")
    oracle = np.zeros((n, 2))
    for i, (doc,) in enumerate(subsets):
        oracle[doc] = base - np.load(bank / "losses" / f"subset_{i}.npy")
    assert np.all(oracle != 0)
    # what bergson does with a bank model: a plain Hugging Face from_pretrained
    AutoModelForCausalLM.from_pretrained(str(bank / "retrained" / "subset_0"))
    scores = write_scores(tmp_path / "oracle", oracle)
    out = run_validate(tmp_path, "eval", scores, spec=None, subsets="bank", paths=[str(bank)], **common)
    assert summary(out)["mean_lds"] == pytest.approx(1.0)


def test_killed_worker_costs_only_its_retrain(ray_session, tmp_path):
    scores = write_scores(tmp_path / "s", np.random.default_rng(1).normal(size=(N_DOCS, N_QUERY)))
    clean = run_validate(tmp_path, "clean", scores, count=8, num_workers=1)
    plan = FaultPlan(crash_worker_after_batches=3, crash_marker=str(tmp_path / "crashed"))
    out = run_validate(tmp_path, "crash", scores, count=8, faults=plan)
    s = summary(out)
    assert (tmp_path / "crashed").exists()
    assert s["retrains_lost"] == 1 and s["retrains_computed"] == 9
    for f in (clean / "losses").glob("*.npy"):  # same results as a run without the crash
        np.testing.assert_array_equal(np.load(f), np.load(out / "losses" / f.name))


def test_killed_driver_resumes_only_unfinished(ray_session, tmp_path):
    scores = write_scores(tmp_path / "s", np.random.default_rng(2).normal(size=(N_DOCS, N_QUERY)))
    run_path = tmp_path / "run"
    script = (
        "import sys, ray; sys.path.insert(0, sys.argv[1]); import test_validate as t; "
        "ray.cloudpickle.register_pickle_by_value(t); "
        "from bergson_ray.pipelines.validate import validate; "
        "validate(run_path=sys.argv[2], scores=sys.argv[3], count=12, num_workers=1, "
        "address=sys.argv[4], retrainer=t.ToySpec(delay_s=0.3))"
    )
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent),
                             str(run_path), str(scores), address], env=os.environ.copy())
    losses = Path(f"{run_path}.part") / "losses"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(losses.glob("subset_*.npy"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(losses.glob("*.npy")))  # base + finished subsets; nothing half-written
    total = 1 + 12  # base + 12 subsets of 2 documents
    assert 3 <= done < total and not run_path.exists()
    out = run_validate(tmp_path, "run", scores, count=12, resume=True)
    s = summary(out)
    assert s["retrains_computed"] == total - done and s["retrains_reused"] == done
    assert len(list((out / "losses").glob("*.npy"))) == total


def test_filter_and_weight_step(ray_session, tmp_path):
    scores = write_scores(tmp_path / "s", np.random.default_rng(3).normal(size=(N_DOCS, N_QUERY)))
    out = run_validate(tmp_path, "f", scores, method="filter", direction="detractors",
                       **{"filter.fraction": 0.25, "filter.controls.count": 2})
    rows = (out / "filter_detractors.csv").read_text().splitlines()
    assert rows[0] == "query,n_removed,baseline_loss,filtered_loss,loss_change"
    assert len(rows) == 1 + N_QUERY and all(r.split(",")[1] == "6" for r in rows[1:])
    assert (out / "filter_summary.csv").is_file() and summary(out)["retrains_computed"] == 1 + 3 + 2
    one = write_scores(tmp_path / "one", np.random.default_rng(4).normal(size=(N_DOCS, 1)))
    out = run_validate(tmp_path, "w", one, method="weight_step", lrs=[0.1, 0.5])
    rows = (out / "weight_step.csv").read_text().splitlines()
    assert rows[0] == "lr,diff,predicted_diff" and len(rows) == 1 + 2  # one aggregated query
    assert summary(out)["multi_query"] is False


def fake_bank(path: Path, subsets: list[list[int]]) -> Path:
    for i in range(len(subsets)):
        ToyRetrainer(ToySpec()).save({"theta": np.zeros(DIM)}, path / "retrained" / f"subset_{i}")
    (path / "subsets.json").write_text(json.dumps(subsets))
    return path


def test_bad_inputs_fail_before_any_worker(tmp_path):
    """Each bad input is one clear sentence, raised before Ray or a run dir exists."""
    from bergson_ray.config.coerce import as_config
    from bergson_ray.config.validation import ValidateConfig
    from bergson_ray.pipelines.validate import precheck
    from bergson_ray.validation.retrainer import RetrainSpec

    good = write_scores(tmp_path / "good", np.zeros((N_DOCS, N_QUERY)))
    short = write_scores(tmp_path / "short", np.zeros((N_DOCS - 1, N_QUERY)))
    with pytest.raises(BadInputError, match="has 23 rows but the training set has 24"):
        run_validate(tmp_path, "a", short)
    cols = write_scores(tmp_path / "cols", np.zeros((N_DOCS, 2)))
    with pytest.raises(BadInputError, match="2 query columns but the query set has 3"):
        run_validate(tmp_path, "b", cols)
    with pytest.raises(BadInputError, match="--count 25 is larger than the 24 documents"):
        run_validate(tmp_path, "c", good, count=25)
    for bad in (-0.5, 1.5):
        with pytest.raises(BadInputError, match=r"--fraction must be 0 .* or in \(0, 1\]"):
            run_validate(tmp_path, "d", good, fraction=bad)
    bank_a = fake_bank(tmp_path / "bank_a", [[0, 1], [2, 3]])
    bank_b = fake_bank(tmp_path / "bank_b", [[0, 2], [1, 3]])
    with pytest.raises(BadInputError, match="subsets.json disagrees"):
        run_validate(tmp_path, "e", good, subsets="bank", paths=[str(bank_a), str(bank_b)])
    other = tmp_path / "other.json"
    other.write_text(json.dumps([[0], [1], [2], [3]]))
    with pytest.raises(BadInputError, match="subsets.json disagrees with the subsets of --manifest"):
        run_validate(tmp_path, "f", good, subsets="bank", paths=[str(bank_a)], manifest=str(other))
    # the real retrainer: a query set without its text column
    cfg = as_config(ValidateConfig, scores=str(good), run_path=str(tmp_path / "g"),
                    **{"query.dataset": "tiny", "query.prompt_column": "nope"})
    with pytest.raises(BadInputError, match="nope"):
        precheck(cfg, RetrainSpec(cfg.model, cfg.data, cfg.query_data(), cfg.training))
    runs = {n + sfx for n in "abcdefg" for sfx in ("", ".part")}
    assert not [p.name for p in tmp_path.iterdir() if p.name in runs]
