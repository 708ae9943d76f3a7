"""The applications: the training CLIs of both frameworks, the sweep and the plots (NumPy on top).

The libraries (``jax_impl``, ``torch_ref``, ``agp_common``) are the ground floor and import nothing
from here; this package sits on top and holds what does not depend on the framework once:

* ``config``, ``flags``: the frozen ``TrainConfig`` (its checks) and the flag parser both CLIs share;
* ``data``, ``dataset``, ``data_files``, ``batching``: datasets by name (digits, synthetic), the
  ``Dataset`` type and its checks, the file readers (CIFAR-10, npz), and the seeded batch order;
* ``run_folder``, ``runlog``, ``io``: the run folder (config.json, lock, resume checks) and its logs
  (metrics.jsonl, progress, TensorBoard);
* ``loop``, ``interrupts``: the outer loop (schedule, logging, finite checks, SIGTERM/Ctrl-C);
* ``trainer``: the trainer skeleton both frameworks share (validate, load, resume, loop, summary);
* ``optim``: the optimizers' rules, one definition for optax and ``torch.optim``;
* ``errors``: the CLIs' exceptions and their one-line reporter;
* ``plot``: the PNG plots of a run folder;
* ``jax_train``, ``torch_train``: what each framework supplies to the skeleton
  (``python -m jax_impl.train`` and ``python -m torch_ref.train`` are their entry points);
* ``sweep``: the JAX experiment runner behind ``python -m jax_impl.sweep``;
* the training recipe's pieces: ``schedules``, ``augment``, ``shared_init``, ``model_spec``,
  ``jax_models`` / ``torch_models``, ``jax_recipe`` / ``torch_recipe``.

Importing this package imports none of its modules: each is loaded when it is used.
"""
