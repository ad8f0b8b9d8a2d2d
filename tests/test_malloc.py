"""``utils/malloc.py``: freed memory stays mapped, so a repeated step faults no pages.

Each case runs in a fresh interpreter: ``mallopt`` changes the whole process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import subprocess_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

STEPS = """
import resource, sys, torch
from bergson_ray.utils.malloc import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "tuned" else False

def step():
    xs = [torch.ones(2 << 20) for _ in range(3)]  # three 8 MiB tensors, freed together
    del xs

for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""

RUNNER = """
import resource
import numpy as np
from bergson_ray.data.batching import collate
from bergson_ray.runners.gradient_runner import GradientRunner
from tests.helpers import tiny_runner_spec

runner = GradientRunner(tiny_runner_spec(token_batch_size=512))
batch = collate(runner.tokenize(np.arange(4)))
for _ in range(2):
    runner.engine.compute(batch)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    runner.engine.compute(batch)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _run(script: str, *args: str, **env: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", script, *args], env=subprocess_env(**env), capture_output=True,
        text=True, timeout=300, check=True,
    )
    return out.stdout.split()


RETURNS_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
"""glibc's static default: every block past 128 KiB mapped and unmapped on its own, so a
step faults its pages in every time (the defaults' dynamic threshold does so only for
some heap layouts, which makes it no baseline)."""


def test_a_repeated_step_faults_no_pages_once_tuned():
    applied, faults = _run(STEPS, "tuned")
    plain_applied, plain = _run(STEPS, "tuned", **RETURNS_MEMORY)  # the user's setting wins
    assert (applied, plain_applied) == ("True", "False")
    assert float(plain) > 5000  # three 8 MiB blocks faulted in again every step
    assert float(faults) < float(plain) / 20  # an odd page of heap growth, no more


def test_bergson_ray_malloc_default_leaves_malloc_alone():
    applied, _ = _run(STEPS, "tuned", BERGSON_RAY_MALLOC="default")
    assert applied == "False"


def test_a_gradient_runner_step_faults_no_pages(tiny_assets):
    """The runner tunes its own process: a tiny step's logits and activations reuse memory."""
    (faults,) = _run(RUNNER)
    (plain,) = _run(RUNNER, **RETURNS_MEMORY)
    assert float(plain) > 500  # the tiny model's 2 MiB logits alone are 500 pages
    # what remains is Python's own 256 KiB object arenas, which bypass malloc
    assert float(faults) < float(plain) / 10
