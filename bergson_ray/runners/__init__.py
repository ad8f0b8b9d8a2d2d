"""What turns row indices into gradients, sums, scores or statistics on one worker.

Between the math (``gradients/``, ``hessians/``: pure torch, no dataset rows) and the
Ray wrappers (``actors/``): a runner loads the model, reads and tokenizes the rows it
is given, packs them by token budget and feeds the engine or a fitter.

* ``model_loading`` — causal LM + tokenizer from a hub id, a local dir or ``tiny``
* ``preprocess`` — ``RowPreprocessor``: a config's Hessian and unit norm applied to rows
* ``gradient_runner`` — ``RunnerSpec``, ``GradientRunner`` (rows / partial sums / scores),
  ``OneProcess`` (the runner strategy "the model in this process")
* ``hessian_runner`` — ``HessianSpec``, ``HessianRunner`` (pre-summed factor statistics)
* ``fsdp`` — ``FsdpRank``: one rank of an FSDP group, a GradientRunner kept in lockstep
* ``sharded`` — ``GroupPlan`` (the runner strategy "an FSDP group"), ``ShardedRunner``:
  GradientRunner's interface fanned out over a group of ``FsdpRank`` actors

Only ``sharded`` (and ``FsdpRank.rendezvous``/``setup``) touch Ray.
"""
