"""SOURCE / approximate unrolling (Bae et al. 2024) as bergson 2.5.1 computes it.

Pure torch math and file reading, no Ray and no datasets (the pipeline,
``pipelines/approxunrolling.py``, wires the passes over data):

* ``segments.py`` — which checkpoints form which segment, each segment's ``η·K``
  (summed learning rates, momentum-scaled);
* ``eigenfunctions.py`` — ``F_backward`` and ``F_segment`` of a segment's eigenvalues;
* ``aggregation.py`` — per-checkpoint covariances and EK-FAC lambdas -> one segment
  Hessian (eigenbasis of the summed covariances, per-document mean lambdas);
* ``adam.py`` — the Adam variant's diagonal preconditioner and ``σ = P ⊙ diag(H)``;
* ``walk.py`` — the query walked back through the segments (phase 1) and each
  segment's transformed query (phase 2);
* ``checkpoints.py`` — finding checkpoints and the training run they came from, its
  learning-rate history and optimizer state, exporting ``step_<N>.ckpt`` as HF dirs.
"""
