"""The training loop behind ``mlx-distill train``, built on mlx-lm's tuner.

* ``data``: load and validate ``{train,valid}.jsonl``, tokenize once, batch
  (mlx-lm's ``iterate_batches`` signature, every example once per epoch).
* ``losses``: the loss protocol and the default masked cross-entropy that also
  returns token accuracy.
* ``checkpoint``: atomic checkpoints, resume state and ``adapter_config.json``.
* ``loop``: the compiled, data-parallel step, validation, metrics, NaN guard.

Swap points (as in mlx-lm's ``train(loss=..., iterate_batches=...)``): pass a
``loss`` or ``iterate_batches`` callable to :func:`mlx_distill.train.train`.
"""
