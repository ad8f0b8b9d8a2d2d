"""Gradient stores written while a model trains (HF ``Trainer``, also inside Ray Train).

``collator.py`` threads each example's dataset index through the data pipeline;
``hf_callback.py`` is the ``TrainerCallback`` that turns every training step into
per-example gradient rows with the engine's own math (``gradients/``);
``train_store.py`` lays them out on disk in ``build``'s format, atomically.
"""
