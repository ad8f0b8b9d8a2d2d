"""One LDS table over one shared leave-k-out bank, bergson_ray and bergson side by side.

Recipe (``_lds_recipe.py``): the embedded tiny model fine-tuned with ``bergson-ray train``
(bergson's trainer semantics) on a few hundred short pydoc paragraphs; a handful of
held-out paragraphs are the queries. Then:

1. scores, one column per query, on the fine-tuned model: gradient dot product (``build``
   of the queries, ``score`` of the training set, p=16), gradient cosine (the same with
   ``--unit_normalize``), EK-FAC (``ekfac --query_aggregation none``, full gradients),
   MAGIC (``magic --aggregation none``, metagradients through the whole training run),
   TRAK (``trak``, one global projection of p=64), TrackStar (``trackstar``, p=16,
   cosine), LiSSA (``lissa``, settings in ``_lds_recipe.LISSA``) and SOURCE
   (``approxunrolling --use_adam_preconditioner``, 2 segments of the fine-tune's saved
   states: the fine-tune saves about 4 states after step 0, with their AdamW moments);
2. ``validate --method lds --save_models true`` once: the bank of leave-k-out retrains
   (``--count`` subsets of ``--fraction`` of the documents, plus the full-data model);
3. ``validate --subsets bank --paths BANK`` for every score directory, so each method is
   correlated with the same retrained models' query losses;
4. bergson (the anchor venv, ``../shared/tools/anchor``) computes its own scores for the
   same model, data and flags (``score`` with and without ``--unit_normalize``, ``ekfac``,
   ``magic``, ``trak``, ``trackstar``, ``lissa``, ``approxunrolling``); OUR validate
   evaluates them on the same bank. A bergson command that fails here puts its reason in
   the table instead of a number. bergson's ``approxunrolling`` reads HF dirs (or its own
   trainer's DCP states, which ours are not): it gets our saved states exported as HF
   dirs with their ``optimizer.pt`` (the same export ours makes), and the learning rates
   as ``--lr_list``/``--step_size_list`` from the fine-tune's ``log_history.json``;
5. retrains per minute: ``validate`` on a handful of subsets (plus the full-data model)
   with 1 and 2 workers, and bergson's ``validate`` on the same subsets. "loop" is the
   retrain loop (ours: the pool's job loop, timed once the first actor is up; bergson:
   its "Validating" bar); "end to end" is the whole call (Ray/actor or process start-up,
   model loading and tokenizing included). Few retrains make these figures noisy: on a
   shared 2-core machine compare ratios taken in the same invocation.

LDS = mean over queries of the Spearman correlation between a subset's summed scores
and the change of the query's loss when the subset is left out (signs taken from each
score directory's config, so higher = better for every method: the gradient, EK-FAC,
TRAK, TrackStar and LiSSA stores say ``higher_is_better: true``, MAGIC's and SOURCE's are
loss-signed, ``false``). Prints figures; asserts nothing. Our pipelines run in this
process (Python API) on one local Ray; bergson runs as subprocesses with one torch
thread, as our workers do.

    .venv/bin/python benchmarks/lds.py --quick --out /tmp/lds_quick   # ~40 minutes
    .venv/bin/python benchmarks/lds.py --out /tmp/lds                 # ~1 hour
    .venv/bin/python benchmarks/lds.py --reuse /tmp/lds --methods trak,lissa \\
        --no-timing --out /tmp/lds_more                               # new rows only

(wall times on the 2-core machine shared with other jobs, load average 7-30: ``--quick``
with every row took 37 minutes; the full recipe's bank 10.5 minutes, bergson's ``magic``
~4-9 minutes, each of the other methods 1-5 minutes per program.)
``--skip-bergson-magic`` drops bergson's ``magic``, ``--bergson-magic-from DIR`` reuses the
scores of an earlier run of it; ``--skip-magic``, ``--skip-trak``, ``--skip-trackstar``,
``--skip-lissa``, ``--skip-approxunrolling`` and ``--methods`` choose the rows;
``--reuse DIR`` takes an earlier run's bank (same recipe, data and subsets, checked) and
copies its figures into the rows not computed here, with a note under the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import bergson_cli, cpu_busy_percent, run_timed, tqdm_seconds  # noqa: E402
from _lds_recipe import (  # noqa: E402
    LISSA,
    PROJECTION_DIM,
    SOURCE_SEGMENTS,
    TOKEN_BATCH,
    TRAK_PROJECTION_DIM,
    Recipe,
    prepare_data,
    source_save_interval,
)

from bergson_ray.utils.ray_env import LOOPBACK_ENV  # noqa: E402

ENV = {**LOOPBACK_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore",
       "WANDB_MODE": "disabled"}  # fmt: skip
BERGSON_ENV = {**ENV, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
METHODS = ("gradient dot", "gradient cosine", "EK-FAC", "MAGIC", "TRAK", "TrackStar", "LiSSA",
           "SOURCE")  # fmt: skip
KEYS = dict(zip(METHODS, ("dot", "cosine", "ekfac", "magic", "trak", "trackstar", "lissa",
                          "approxunrolling")))  # fmt: skip
"""Each row's name in ``--methods``."""
SKIP_FLAGS = {"TRAK": "skip_trak", "TrackStar": "skip_trackstar", "LiSSA": "skip_lissa",
              "SOURCE": "skip_approxunrolling"}  # fmt: skip
"""The newer rows' ``--skip-*`` flags (each skips ours and bergson's)."""

log = logging.getLogger("lds")


class Bench:
    """Paths, the recipe and every figure collected (``figures`` becomes the JSON)."""

    def __init__(self, args: argparse.Namespace, recipe: Recipe):
        self.args, self.recipe = args, recipe
        self.out = Path(args.out).resolve()
        self.figures: dict = {"recipe": vars(recipe) | recipe.training_kwargs(),
                              "scores": {}, "lds": {}, "timing": {}}  # fmt: skip
        self.train_dir = self.query_dir = self.model_dir = self.base_model = ""
        self.train_run: Path | None = None

    def wanted(self, name: str) -> bool:
        """Whether this invocation computes the row (``--methods``, ``--skip-*``)."""
        flag = SKIP_FLAGS.get(name)
        chosen = KEYS[name] in getattr(self.args, "methods", KEYS.values())
        return chosen and not (flag and getattr(self.args, flag, False))

    # ------------------------------------------------------------------ SOURCE's trajectory
    def source_states(self) -> list[Path]:
        """The fine-tune's saved states after step 0, the first dropped until their number
        is a multiple of the segments (a segment ends at its last state)."""
        from bergson_ray.unrolling.segments import checkpoint_step

        ckdir = self.train_run / "checkpoints"
        states = sorted((p for p in ckdir.glob("step_*.ckpt") if checkpoint_step(p.name)),
                        key=lambda p: checkpoint_step(p.name))  # fmt: skip
        keep = len(states) - len(states) % SOURCE_SEGMENTS
        if keep == 0:
            raise Unavailable(f"the fine-tune saved {len(states)} states after step 0, "
                              f"fewer than {SOURCE_SEGMENTS} segments")  # fmt: skip
        return states[len(states) - keep:]

    def source_lr_lists(self, states: list[Path]) -> tuple[list[float], list[int]]:
        """Per-segment mean learning rate and step count from the fine-tune's
        ``log_history.json`` (what our ``approxunrolling`` reads from the run itself),
        spelled as bergson's ``--lr_list`` / ``--step_size_list``."""
        from bergson_ray.unrolling.segments import (
            checkpoint_step,
            lr_times_steps,
            segment_boundaries,
            step_to_lr,
        )

        history = json.loads((self.train_run / "checkpoints" / "log_history.json").read_text())
        bounds = segment_boundaries([checkpoint_step(p.name) for p in states], SOURCE_SEGMENTS)
        sums = lr_times_steps(bounds, step_to_lr(history), 0.0)
        counts = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
        return [t / k for t, k in zip(sums, counts)], counts

    # ------------------------------------------------------------------ common settings
    def data_kw(self) -> dict:
        return {"dataset": self.train_dir, "truncation": True,
                "query.dataset": self.query_dir, "query.truncation": True}  # fmt: skip

    def grad_kw(self, model: str) -> dict:
        return {"model": model, "dataset": self.train_dir, "truncation": True,
                "token_batch_size": TOKEN_BATCH, "num_workers": self.args.workers,
                "overwrite": True}  # fmt: skip

    def validate(self, name: str, scores: str, *, higher_is_better: bool | None = None,
                 workers: int | None = None, save_models: bool = False,
                 **lds) -> Path:  # fmt: skip
        from bergson_ray.pipelines.validate import validate

        kw = {f"lds.{k}": v for k, v in lds.items()}
        return validate(
            run_path=str(self.out / "validate" / name), overwrite=True, scores=scores,
            higher_is_better=higher_is_better, model=self.base_model, **self.data_kw(),
            **self.recipe.training_kwargs(), method="lds",
            num_workers=workers or self.args.workers, save_models=save_models, **kw,
        )  # fmt: skip

    # ------------------------------------------------------------------ our methods
    def ours_scores(self) -> dict[str, dict]:
        """Our four methods' score dirs (``{"scores": path}`` or ``{"error": text}``)."""
        from bergson_ray.pipelines.build import build
        from bergson_ray.pipelines.ekfac import ekfac
        from bergson_ray.pipelines.score import score

        root = self.out / "ours"
        m = self.model_dir
        p = {"projection_dim": PROJECTION_DIM}
        cache: dict[str, str] = {}

        def query_store() -> str:
            kw = {**self.grad_kw(m), "dataset": self.query_dir, **p}
            return str(build(run_path=str(root / "query_p16"), aggregation="none", **kw))

        def dot(unit: bool):
            def go() -> str:
                if "query" not in cache:  # one query store for dot and cosine
                    cache["query"] = query_store()
                q = cache["query"]
                return str(score(run_path=str(root / ("cosine" if unit else "dot")),
                                 query_path=q, score="individual", unit_normalize=unit,
                                 **self.grad_kw(m), **p))  # fmt: skip

            return go

        def ek() -> str:
            kw = {**self.grad_kw(m), "query.dataset": self.query_dir, "query.truncation": True}
            return str(ekfac(run_path=str(root / "ekfac"), query_aggregation="none", **kw))

        def magic() -> str:
            if self.args.skip_magic:
                raise Unavailable("skipped (--skip-magic)")
            try:
                from bergson_ray.pipelines.magic import magic as run_magic
            except ImportError as exc:
                raise Unavailable(f"not available ({exc.__class__.__name__})") from None
            out = run_magic(run_path=str(root / "magic"), overwrite=True,
                            model=self.base_model, **self.data_kw(),
                            **self.recipe.training_kwargs(), aggregation="none",
                            skip_validation=True, num_workers=self.args.workers)  # fmt: skip
            return str(Path(out) / "scores")

        qkw = {"query.dataset": self.query_dir, "query.truncation": True}

        def trak_() -> str:
            from bergson_ray.pipelines.trak import trak

            return str(trak(run_path=str(root / "trak"), **self.grad_kw(m), **qkw,
                            projection_dim=TRAK_PROJECTION_DIM))  # fmt: skip

        def trackstar_() -> str:
            from bergson_ray.pipelines.trackstar import trackstar

            return str(trackstar(run_path=str(root / "trackstar"), **self.grad_kw(m), **qkw,
                                 projection_dim=PROJECTION_DIM, unit_normalize=True))  # fmt: skip

        def lissa_() -> str:
            from bergson_ray.pipelines.lissa import lissa

            return str(lissa(run_path=str(root / "lissa"), **self.grad_kw(m), **qkw,
                             projection_dim=0, **LISSA))  # fmt: skip

        def source() -> str:
            from bergson_ray.pipelines.approxunrolling import approxunrolling

            states = self.source_states()
            return str(approxunrolling(run_path=str(root / "approxunrolling"),
                                       **self.grad_kw(m), **qkw,
                                       checkpoints=[str(p) for p in states],
                                       segments=SOURCE_SEGMENTS,
                                       use_adam_preconditioner=True))  # fmt: skip

        fns = (dot(False), dot(True), ek, magic, trak_, trackstar_, lissa_, source)
        results: dict[str, dict] = {}
        for name, fn in zip(METHODS, fns):
            results[name] = attempt(fn) if self.wanted(name) else skipped(name)
            say(f"ours {name}: {brief(results[name])}")
        return results

    # ------------------------------------------------------------------ bergson
    def bergson(self, cmd: list[str], label: str) -> dict:
        exe = bergson_cli()
        r = run_timed([str(exe), *cmd], BERGSON_ENV, cwd=str(self.out))
        (self.out / "logs").mkdir(exist_ok=True)
        (self.out / "logs" / f"bergson_{label}.log").write_text(r["output"])
        return r

    def bergson_scores(self) -> dict[str, dict]:
        root = self.out / "bergson"
        m = self.model_dir
        common = ["--model", m, "--truncation", "true", "--token_batch_size", str(TOKEN_BATCH),
                  "--projection_dim", str(PROJECTION_DIM), "--overwrite", "true"]  # fmt: skip
        data2 = ["--data.dataset", self.train_dir, "--data.truncation", "true",
                 "--query.dataset", self.query_dir, "--query.truncation", "true"]  # fmt: skip
        results: dict[str, dict] = {}
        dots = [(n, u) for n, u in (("gradient dot", False), ("gradient cosine", True))
                if self.wanted(n)]  # fmt: skip
        q = {"rc": 0}
        if dots:
            q = self.bergson(["build", str(root / "query_p16"), "--dataset", self.query_dir,
                              *common], "build_query")  # fmt: skip
        for name in ("gradient dot", "gradient cosine"):
            if (name, name == "gradient cosine") not in dots:
                results[name] = skipped(name)
        for name, unit in dots:
            if q["rc"]:
                results[name] = {"error": failure("bergson build (queries)", q)}
            else:
                out = root / ("cosine" if unit else "dot")
                r = self.bergson(["score", str(out), "--dataset", self.train_dir, *common,
                                  "--query_path", str(root / "query_p16"), "--score", "individual",
                                  "--unit_normalize", str(unit).lower()], out.name)  # fmt: skip
                results[name] = ({"scores": str(out), "seconds": r["wall"]} if r["rc"] == 0
                                 else {"error": failure("bergson score", r)})  # fmt: skip
            say(f"bergson {name}: {brief(results[name])}")
        r = {"rc": 0, "wall": None} if not self.wanted("EK-FAC") else self.bergson(
            [
                "ekfac",
                str(root / "ekfac"),
                "--model",
                m,
                *data2,
                "--query.aggregation",
                "none",
                "--method",
                "kfac",
                "--hessian_cfg.ev_correction",
                "true",
                "--token_batch_size",
                str(TOKEN_BATCH),
                "--overwrite",
                "true",
            ],
            "ekfac",
        )
        results["EK-FAC"] = ({"scores": str(root / "ekfac" / "scores"), "seconds": r["wall"]}
                             if r["rc"] == 0 else {"error": failure("bergson ekfac", r)})  # fmt: skip
        if not self.wanted("EK-FAC"):
            results["EK-FAC"] = skipped("EK-FAC")
        say(f"bergson EK-FAC: {brief(results['EK-FAC'])}")
        if not self.wanted("MAGIC"):
            results["MAGIC"] = skipped("MAGIC")
        elif self.args.bergson_magic_from:
            src = Path(self.args.bergson_magic_from)
            results["MAGIC"] = {"scores": str(src), "higher_is_better": False, "seconds": None,
                                "note": f"scores of an earlier bergson magic run: {src}"}  # fmt: skip
        elif self.args.skip_bergson_magic:
            results["MAGIC"] = {"error": "skipped (--skip-bergson-magic)"}
        else:
            r = self.bergson(["magic", str(root / "magic"), "--model", self.base_model, *data2,
                              "--aggregation", "none", *self.recipe.bergson_training_flags(),
                              "--skip_validation", "true", "--overwrite", "true"], "magic")  # fmt: skip
            results["MAGIC"] = ({"scores": str(root / "magic" / "scores"), "seconds": r["wall"],
                                 "higher_is_better": False}
                                if r["rc"] == 0 else {"error": failure("bergson magic", r)})  # fmt: skip
        say(f"bergson MAGIC: {brief(results['MAGIC'])}")
        newer = (("TRAK", self.bergson_trak), ("TrackStar", self.bergson_trackstar),
                 ("LiSSA", self.bergson_lissa), ("SOURCE", self.bergson_source))
        for name, fn in newer:
            results[name] = fn(root, m, data2) if self.wanted(name) else skipped(name)
            say(f"bergson {name}: {brief(results[name])}")
        return results

    def bergson_run(self, cmd: list[str], out: Path, label: str, **extra) -> dict:
        """One bergson pipeline whose scores land in ``out/scores``."""
        r = self.bergson([cmd[0], str(out), *cmd[1:], "--overwrite", "true"], label)
        if r["rc"]:
            return {"error": failure(f"bergson {cmd[0]}", r)}
        return {"scores": str(out / "scores"), "seconds": r["wall"], **extra}

    def bergson_trak(self, root: Path, m: str, data2: list[str]) -> dict:
        return self.bergson_run(
            ["trak", "--model", m, *data2, "--projection_dim", str(TRAK_PROJECTION_DIM),
             "--loss_fn", "log_odds", "--projection_target", "global",
             "--token_batch_size", str(TOKEN_BATCH)], root / "trak", "trak",
        )  # fmt: skip

    def bergson_trackstar(self, root: Path, m: str, data2: list[str]) -> dict:
        return self.bergson_run(
            ["trackstar", "--model", m, *data2, "--projection_dim", str(PROJECTION_DIM),
             "--unit_normalize", "true", "--token_batch_size", str(TOKEN_BATCH)],
            root / "trackstar", "trackstar",
        )  # fmt: skip

    def bergson_lissa(self, root: Path, m: str, data2: list[str]) -> dict:
        flags = [f"--{'lissa_cfg.batch_size' if k == 'batch_size' else k}" for k in LISSA]
        pairs = [x for flag, v in zip(flags, LISSA.values()) for x in (flag, str(v))]
        return self.bergson_run(
            ["lissa", "--model", m, *data2, "--projection_dim", "0", *pairs,
             "--token_batch_size", str(TOKEN_BATCH)], root / "lissa", "lissa",
        )  # fmt: skip

    def bergson_source(self, root: Path, m: str, data2: list[str]) -> dict:
        """bergson's ``approxunrolling`` on the same states. It reads HF dirs (or its own
        trainer's DCP states, which ours are not), so our states are exported as HF dirs
        with their ``optimizer.pt`` (bergson's layout, written by our trainer with
        ``--save_optimizer_state all``) under ``out/source_checkpoints/checkpoint-<N>``,
        a directory with no run ``config.yaml`` one or two levels up (bergson would read
        one as the training run). The learning rates come as ``--lr_list`` /
        ``--step_size_list`` from the fine-tune's ``log_history.json``."""
        from bergson_ray.unrolling.checkpoints import export_train_state, find_checkpoints

        try:
            states = self.source_states()
            lrs, counts = self.source_lr_lists(states)
            dirs = []
            for ck in find_checkpoints([str(p) for p in states]):
                dest = self.out / "source_checkpoints" / f"checkpoint-{ck.step}"
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    export_train_state(ck, self.base_model, dest)
                dirs.append(str(dest))
        except Exception as exc:  # noqa: BLE001 - a table entry
            return {"error": f"export for bergson failed: {exc.__class__.__name__}: {exc}"}
        return self.bergson_run(
            ["approxunrolling", "--model", dirs[-1], *data2, "--checkpoints", *dirs,
             "--segments", str(SOURCE_SEGMENTS), "--lr_list", *map(repr, lrs),
             "--step_size_list", *map(str, counts), "--momentum", "0.0",
             "--use_adam_preconditioner", "true", "--method", "kfac",
             "--ev_correction", "true", "--token_batch_size", str(TOKEN_BATCH)],
            root / "approxunrolling", "approxunrolling",
        )  # fmt: skip

    # ------------------------------------------------------------------ retrain timing
    def timing(self, scores: str) -> None:
        """Retrains per minute: ours with 1 and 2 workers, bergson's validate, same subsets."""
        n, t = self.args.timing_subsets, self.figures["timing"]
        t["machine_busy_percent_before"] = cpu_busy_percent()
        lds = {"count": self.args.count, "fraction": self.args.fraction, "stop": n}
        for workers in (1, 2):
            t0 = time.perf_counter()
            path = self.validate(f"timing_w{workers}", scores, workers=workers, **lds)
            wall = time.perf_counter() - t0
            s = json.loads((path / "summary.json").read_text())
            t[f"ours_w{workers}"] = {
                "retrains": s["retrains_computed"], "loop_s": s["seconds"], "wall_s": wall,
                "per_min_loop": 60 * s["retrains_computed"] / s["seconds"],
                "per_min_wall": 60 * s["retrains_computed"] / wall,
            }  # fmt: skip
            say(f"ours {workers} worker(s): {t[f'ours_w{workers}']}")
        w1, w2 = t["ours_w1"], t["ours_w2"]
        t["speedup_2_vs_1"] = w2["per_min_loop"] / w1["per_min_loop"]
        if bergson_cli() is None or self.args.no_bergson:
            return
        cmd = ["validate", str(self.out / "bergson" / "timing"), "--model", self.base_model,
               "--data.dataset", self.train_dir, "--data.truncation", "true",
               "--query.dataset", self.query_dir, "--query.truncation", "true",
               "--scores", scores, "--method", "lds", "--count", str(self.args.count),
               "--fraction", str(self.args.fraction), "--stop", str(n),
               *self.recipe.bergson_training_flags(), "--overwrite", "true"]  # fmt: skip
        r = self.bergson(cmd, "validate_timing")
        if r["rc"]:
            t["bergson"] = {"error": failure("bergson validate", r)}
        else:
            # end to end: the subsets and the full-data model; loop: its "Validating" bar,
            # which times the subsets' retrains (the full-data model is trained before it)
            loop = tqdm_seconds(r, "Validating")
            t["bergson"] = {"retrains": n + 1, "wall_s": r["wall"], "loop_s": loop,
                            "per_min_wall": 60 * (n + 1) / r["wall"],
                            "per_min_loop": 60 * n / loop if loop else None}  # fmt: skip
        say(f"bergson validate: {t['bergson']}")


class Unavailable(RuntimeError):
    """A method this checkout does not have."""


def attempt(fn) -> dict:
    t0 = time.perf_counter()
    try:
        path = fn()
    except Unavailable as exc:
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a failed method is a table entry, not a crash
        log.debug("%s", traceback.format_exc())
        return {"error": f"failed: {exc.__class__.__name__}: {str(exc)[:160]}"}
    return {"scores": path, "seconds": time.perf_counter() - t0}


def skipped(name: str) -> dict:
    flag = SKIP_FLAGS.get(name)
    return {"error": f"skipped (--{flag.replace('_', '-')})" if flag else "not run (--methods)",
            "skipped": True}  # fmt: skip


def failure(what: str, r: dict) -> str:
    """The last informative line of a failed subprocess."""
    lines = [x.strip() for x in r["output"].replace("\r", "\n").split("\n") if x.strip()]
    errs = [x for x in lines if re.search(r"Error|error:|Exception", x)]
    last = (errs or lines or ["no output"])[-1]
    return f"{what} failed (rc {r['rc']}): {last[:160]}"


def brief(res: dict) -> str:
    if "error" in res:
        return res["error"]
    return f"{res['scores']} ({fmt(res['seconds'], '.1f')} s)"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def table(b: Bench) -> str:
    f, lines = b.figures, []
    bank = f.get("bank", {})
    lines.append(
        f"LDS (mean Spearman over {f['data']['query_docs']} held-out queries) on one bank of "
        f"{bank.get('subsets', '?')} leave-{bank.get('removed', '?')}-out retrains of "
        f"{f['data']['train_docs']} documents"
    )
    lines.append("")
    lines.append(
        "| method | bergson_ray LDS | bergson LDS | bergson_ray scores s | bergson scores s |"
    )
    lines.append("|---|---|---|---|---|")
    for name in METHODS:
        row = [name]
        for prog in ("bergson_ray", "bergson"):
            res = f["lds"].get(prog, {}).get(name)
            row.append("-" if res is None else res.get("error") or fmt(res["lds"]))
        for prog in ("bergson_ray", "bergson"):
            res = f["scores"].get(prog, {}).get(name)
            row.append(fmt(res.get("seconds") if res else None, ".1f"))
        lines.append("| " + " | ".join(row) + " |")
    notes = [r["note"] for p in f["scores"].values() for r in p.values() if r.get("note")]
    lines += [f"note: {n}" for n in notes]
    t = f["timing"]
    if "ours_w1" in t:
        lines.append("")
        lines.append("| retrains per minute | retrains | loop | end to end |")
        lines.append("|---|---|---|---|")
        for key, label in (("ours_w1", "bergson_ray, 1 worker"), ("ours_w2", "bergson_ray, 2 workers"),
                           ("bergson", "bergson validate")):  # fmt: skip
            r = t.get(key)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {label} | {r['error']} | | |")
                continue
            lines.append(f"| {label} | {r['retrains']} | {fmt(r.get('per_min_loop'), '.1f')} | "
                         f"{fmt(r['per_min_wall'], '.1f')} |")  # fmt: skip
        lines.append("")
        ratio = f"2 vs 1 worker: {t['speedup_2_vs_1']:.2f}x (target >= 1.8x)"
        if "machine_busy_percent_before" in t:
            ratio += f"; machine {t['machine_busy_percent_before']:.0f}% busy before timing"
        if "bergson" in t and "error" not in t["bergson"]:
            b_loop = t["bergson"].get("per_min_loop")
            ours = t["ours_w2"]["per_min_loop"]
            ratio += f"; 2 workers vs bergson: {ours / b_loop:.2f}x (loop)" if b_loop else ""
            ratio += (f", {t['ours_w2']['per_min_wall'] / t['bergson']['per_min_wall']:.2f}x "
                      "(end to end)")  # fmt: skip
        lines.append(ratio)
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="96 documents, 4 queries, 16 subsets, 3 timed subsets, no bergson MAGIC",
    )
    ap.add_argument("--out", default="", help="output dir (default: a new temp dir)")
    ap.add_argument("--docs", type=int, default=None, help="training documents (256; quick 96)")
    ap.add_argument("--queries", type=int, default=None, help="held-out queries (8; quick 4)")
    ap.add_argument("--count", type=int, default=None, help="leave-k-out subsets (64; quick 16)")
    ap.add_argument(
        "--fraction", type=float, default=0.01,
        help="documents left out per subset (bergson's compare_wikitext bank: 1%%)",
    )  # fmt: skip
    ap.add_argument("--workers", type=int, default=2, help="Ray workers of every pipeline")
    ap.add_argument(
        "--timing-subsets",
        type=int,
        default=None,
        help="subsets retrained for the retrains/minute figures (6; quick 3)",
    )
    ap.add_argument("--lr", type=float, default=Recipe.lr, help="peak learning rate")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-bergson", action="store_true", help="skip every bergson command")
    ap.add_argument(
        "--skip-bergson-magic",
        action="store_true",
        help="skip bergson's magic (minutes on 2 cores; always skipped with --quick)",
    )
    ap.add_argument(
        "--bergson-magic-from",
        default="",
        help="reuse the scores dir of an earlier `bergson magic` run of the same recipe and data",
    )
    ap.add_argument("--skip-magic", action="store_true", help="skip our MAGIC too")
    for name, flag in SKIP_FLAGS.items():
        ap.add_argument(f"--{flag.replace('_', '-')}", action="store_true",
                        help=f"skip the {name} rows (ours and bergson's)")  # fmt: skip
    ap.add_argument(
        "--methods", default=",".join(KEYS.values()),
        help=f"comma-separated rows to compute (default: all of {', '.join(KEYS.values())})",
    )  # fmt: skip
    ap.add_argument(
        "--reuse", default="",
        help="an earlier run's --out with the same recipe and data (checked): reuse its bank "
        "instead of retraining it, and copy its figures into the rows not computed here",
    )  # fmt: skip
    ap.add_argument("--no-timing", action="store_true", help="skip the retrains/minute figures")
    args = ap.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(KEYS.values()))
    if unknown:
        ap.error(f"unknown --methods {unknown}; choose from {', '.join(KEYS.values())}")
    q = args.quick
    args.docs = args.docs or (96 if q else 256)
    args.queries = args.queries or (4 if q else 8)
    args.count = args.count or (16 if q else 64)
    args.timing_subsets = args.timing_subsets or (3 if q else 6)
    args.skip_bergson_magic = args.skip_bergson_magic or q
    if not args.out:
        import tempfile

        args.out = tempfile.mkdtemp(prefix="lds_bench_")
    os.environ.update(ENV)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    recipe = Recipe(docs=args.docs, queries=args.queries, lr=args.lr, epochs=args.epochs,
                    batch_size=args.batch_size)  # fmt: skip
    b = Bench(args, recipe)
    b.out.mkdir(parents=True, exist_ok=True)
    have_bergson = bergson_cli() is not None and not args.no_bergson
    t_start = time.perf_counter()
    say(f"out {b.out}; machine busy {cpu_busy_percent():.0f}%; bergson "
        f"{'found' if have_bergson else 'absent/skipped'}")  # fmt: skip

    from bergson_ray.config.training import TrainRunConfig  # noqa: F401 - fail early
    from bergson_ray.defaults.tiny import ensure_tiny_assets
    from bergson_ray.pipelines.train import train
    from bergson_ray.utils.ray_env import init_ray

    b.base_model = str(ensure_tiny_assets().model_dir)
    train_dir, query_dir, info = prepare_data(b.out / "data", recipe)
    b.train_dir, b.query_dir = str(train_dir), str(query_dir)
    b.figures["data"] = info
    say(f"data: {info['train_docs']} train docs ({info['train_tokens']} tokens), "
        f"{info['query_docs']} held-out queries (corpus rows {info['query_rows']})")  # fmt: skip
    earlier = reusable(args, b) if args.reuse else None

    t0 = time.perf_counter()
    run = train(_train_cfg(b))
    b.train_run = Path(run)
    b.model_dir = str(Path(run) / "model")
    s = json.loads((Path(run) / "summary.json").read_text())
    b.figures["train"] = {**s, "wall_s": time.perf_counter() - t0}
    say(f"fine-tuned: {s['steps']} steps, loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} "
        f"({s['seconds']:.1f} s)")  # fmt: skip

    init_ray("local")
    ours = b.ours_scores()
    b.figures["scores"]["bergson_ray"] = ours
    first = next((r["scores"] for r in ours.values() if "scores" in r), None)
    if first is None and earlier is None:
        raise SystemExit(f"no scores, nothing to build the bank with: {ours}")

    if earlier is not None:  # the earlier run's bank: the same recipe, data and subsets
        bank = Path(earlier["bank"]["path"])
        b.figures["bank"] = {**earlier["bank"], "reused_from": args.reuse}
    else:  # the bank: one leave-k-out family, retrained once, saved for every method
        t0 = time.perf_counter()
        bank = b.validate("bank", first, count=args.count, fraction=args.fraction,
                          save_models=True)  # fmt: skip
        s = json.loads((bank / "summary.json").read_text())
        subsets = json.loads((bank / "subsets.json").read_text())
        removed = sorted({len(x) for x in subsets})
        b.figures["bank"] = {"path": str(bank), "subsets": args.count,
                             "removed": "/".join(map(str, removed)),
                             "retrains": s["retrains_computed"], "loop_s": s["seconds"],
                             "wall_s": time.perf_counter() - t0,
                             "per_min_loop": 60 * s["retrains_computed"] / s["seconds"],
                             }  # fmt: skip
    say(f"bank: {b.figures['bank']}")

    if have_bergson:
        b.figures["scores"]["bergson"] = b.bergson_scores()

    for prog, results in b.figures["scores"].items():
        for name, res in results.items():
            old = (earlier or {}).get("lds", {}).get(prog, {}).get(name)
            if res.get("skipped") and old and "lds" in old:
                results[name] = {**earlier["scores"][prog][name],
                                 "note": f"{prog} {name}: from the earlier run {args.reuse}"}
                b.figures["lds"].setdefault(prog, {})[name] = old
                continue
            if "error" in res:
                b.figures["lds"].setdefault(prog, {})[name] = {"error": res["error"]}
                continue
            try:
                v = b.validate(f"{prog}_{name.replace(' ', '_')}", res["scores"],
                               higher_is_better=res.get("higher_is_better"),
                               subsets="bank", paths=[str(bank)])  # fmt: skip
                vs = json.loads((v / "summary.json").read_text())
                entry = {"lds": vs["mean_lds"], "validate": str(v),
                         "per_query": per_query_lds(v)}  # fmt: skip
            except Exception as exc:  # noqa: BLE001
                entry = {"error": f"validate failed: {exc.__class__.__name__}: {str(exc)[:160]}"}
            b.figures["lds"].setdefault(prog, {})[name] = entry
            say(f"LDS {prog} {name}: {entry.get('lds', entry.get('error'))}")

    if not args.no_timing and first is not None:
        b.timing(first)
    b.figures["total_s"] = time.perf_counter() - t_start
    text = table(b)
    print("\n" + text + f"\n\ntotal {b.figures['total_s']:.0f} s; recipe {b.figures['recipe']}")
    (b.out / "lds_table.md").write_text(text + "\n")
    (b.out / "lds_figures.json").write_text(json.dumps(b.figures, indent=2, default=str))
    say(f"wrote {b.out / 'lds_table.md'} and {b.out / 'lds_figures.json'}")
    return 0


def reusable(args: argparse.Namespace, b: Bench) -> dict:
    """The figures of the earlier run ``--reuse`` names, once its recipe, data draw and
    bank size are checked to be this run's (else the run stops with the difference)."""
    path = Path(args.reuse) / "lds_figures.json"
    if not path.is_file():
        raise SystemExit(f"--reuse {args.reuse}: no lds_figures.json there")
    old = json.loads(path.read_text())
    mine = {"recipe": b.figures["recipe"], "data": b.figures["data"],
            "subsets": args.count}  # fmt: skip
    theirs = {"recipe": old.get("recipe"), "data": old.get("data"),
              "subsets": old.get("bank", {}).get("subsets")}  # fmt: skip
    if json.loads(json.dumps(mine)) != theirs:
        raise SystemExit(f"--reuse {args.reuse}: another recipe, data draw or bank size "
                         f"({theirs} here {mine})")  # fmt: skip
    if not (Path(old["bank"]["path"]) / "subsets.json").is_file():
        raise SystemExit(f"--reuse {args.reuse}: its bank {old['bank']['path']} is gone")
    return old


def _train_cfg(b: Bench):
    from bergson_ray.config.coerce import as_config
    from bergson_ray.config.training import TrainRunConfig

    # the recipe's training; the saved states are SOURCE's trajectory (the schedule of
    # saves and the optimizer states written change nothing in the trained model)
    kw = {**b.recipe.training_kwargs(), "save_mode": "interval",
          "save_interval": source_save_interval(b.recipe, b.args.docs),
          "save_optimizer_state": "all"}  # fmt: skip
    return as_config(TrainRunConfig, run_path=str(b.out / "ours" / "train"), overwrite=True,
                     model=b.base_model, dataset=b.train_dir, truncation=True, **kw)  # fmt: skip


def per_query_lds(run: Path) -> list[float] | None:
    """Per-query Spearman correlations from validate's summary CSV, if present."""
    import csv

    for f in sorted(run.glob("*summary*.csv")):
        with open(f) as fh:
            rows = list(csv.DictReader(fh))
        col = next((c for c in (rows[0] if rows else {}) if "spearman" in c.lower()), None)
        if col:
            return [float(r[col]) for r in rows if r.get(col) not in (None, "")]
    return None


if __name__ == "__main__":
    sys.exit(main())
