"""Hessian approximations in pure torch (no Ray): statistics, eigendecompositions, inverses.

One job per module:

* ``accumulator`` — additive running sums (``state_dict``/``merge``) shared by all methods
* ``kfac`` / ``tkfac`` / ``shampoo`` — Kronecker-factor statistics from ``(a, g, mask)``
* ``autocorrelation`` — dense Gram of the stored (processed) gradient rows
* ``ev_correction`` — EK-FAC eigenvalues: per-sequence gradients in the Kronecker eigenbasis
* ``fisher`` — the true-Fisher (sampled labels) / empirical-Fisher loss
* ``fitter`` — taps a model and feeds each batch to the accumulators
* ``eigen`` / ``factored`` — fp64 eigendecompositions, eigenvalue grids, recomposition
* ``inversion`` / ``preconditioner`` — regularised ``H^-1`` / ``H^-1/2`` applied to gradients
* ``factored_io`` — bergson's sharded safetensors layout (any shard count)
* ``assign`` / ``shard_state`` — module ownership and what one shard actor holds

Entry point for users of a fitted Hessian::

    from bergson_ray.hessians.preconditioner import load_preconditioner
    pre = load_preconditioner(path, inversion="damped_inverse", damping_factor=0.1,
                              ev_correction=False, modules=list(grad_sizes))
    rows = pre.apply_inverse(rows, power=-1.0, grad_sizes=grad_sizes)  # or {module: block}
"""
