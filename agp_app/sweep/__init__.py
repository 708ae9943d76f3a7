"""``python -m jax_impl.sweep``: what the penalty does, as an experiment over layers, weights and seeds.

For every seed, every penalised layer set (``--layers``: ``input`` is the
input-gradient penalty of double backpropagation, ``relu1``, ``relu2``, and
``relu1+relu2`` the answer's), every normalisation and every weight > 0 it
trains the seed CNN with the JAX trainer (``agp_app.jax_train``) (digits by
default, CIFAR-10 with ``--data-dir DIR``); weight 0, the unpenalised model,
is trained once per seed and is the w = 0 point of every curve. With the
final weights it measures on the test split:

* ``test_accuracy``; ``test_accuracy/<attack>@<eps>``: the accuracy under FGSM
  and PGD (L-infinity, ``agp_common.attack_spec``: PGD 10 steps of eps / 4,
  no random start, inputs clipped to the data's valid range, [0, 1] for
  images), computed by the trainer's final evaluation (``--eval-attacks``);
* ``noisy_accuracy@<sigma>``: accuracy with Gaussian noise of standard
  deviation sigma added (one fixed draw shared by all runs, not clipped);
* ``test_grad_norm/<layer>``: the mean over test examples of each example's
  own activation-gradient norm ``||d CE_i / d a_{l,i}||`` (``input``: the
  input gradient that FGSM follows; ``test_grad_median/input`` is their median,
  which a few badly classified examples do not dominate); ``test_grad_rms/<layer>``:
  ``sqrt(mean_i ||d CE_i / d a_{l,i}||^2)``, the square root of the
  per-example penalty's term; ``train_...``: the same on the training split;
* ``test_loss``, ``train_loss``, and ``wall_s`` (the run's training and measuring).

It writes to ``OUT``: ``results.json`` (the sweep's settings, one row per run,
and the summary over seeds), ``results.csv`` (one row per run), ``results.md``
(mean +- standard deviation over seeds per grid point),
``robustness_vs_weight.png`` (clean, attacked and noisy accuracy and the
input-gradient RMS, mean and median against w, one line per layer set,
shaded from the lowest to the highest seed), ``grad_norm_vs_weight.png`` (per-layer gradient sizes), and
``convention.json`` (the size of the seed's batch-mean penalty next to the
loss, at initialisation and after unpenalised training). Each run's own
folder (metrics, config) is ``OUT/runs/<layers>_<normalization>_w<weight>_s<seed>`` (``weight_label``:
``:g``, or the exact ``repr`` where ``:g`` would merge two weights); ``--weights`` (and ``--noise``,
``--eval-eps``) must not repeat a value.

The default grid (3 seeds x (1 + 4 layer sets x 3 weights) = 39 runs of 6
epochs, about 25 s each) took 21.5 minutes on a 2-core CPU shared with other
jobs (load 2.5-4.6); its step times at the quietest moments put it at about
13-14 minutes on that machine alone. Its result: docs/robustness.md.

Modules: ``grid`` (``SweepConfig``, labels, each run's ``TrainConfig``), ``measures`` (JAX),
``runner`` (``run_sweep``), ``tables``, ``figures``, ``cli`` (flags, ``main``).
"""

from agp_app.sweep.cli import build_parser, main, parse_sweep, prepare_out
from agp_app.sweep.figures import plot_results
from agp_app.sweep.grid import (
    ATTACKED_PREFIX,
    DEFAULT_EPOCHS,
    DEFAULT_LAYER_SETS,
    DEFAULT_NOISE,
    DEFAULT_NORMALIZATIONS,
    DEFAULT_SEEDS,
    DEFAULT_WEIGHTS,
    MEASURED_LAYERS,
    NOISE_SEED,
    NONE,
    SweepConfig,
    layers_label,
    run_label,
    train_config,
    weight_label,
)
from agp_app.sweep.measures import convention_numbers, measure, noise_draws
from agp_app.sweep.runner import run_sweep
from agp_app.sweep.tables import COLUMN_NAMES, GROUP_KEYS, INPUT_GRADIENT_MEASURES, summarize, write_tables

__all__ = [
    "ATTACKED_PREFIX",
    "COLUMN_NAMES",
    "DEFAULT_EPOCHS",
    "DEFAULT_LAYER_SETS",
    "DEFAULT_NOISE",
    "DEFAULT_NORMALIZATIONS",
    "DEFAULT_SEEDS",
    "DEFAULT_WEIGHTS",
    "GROUP_KEYS",
    "INPUT_GRADIENT_MEASURES",
    "MEASURED_LAYERS",
    "NOISE_SEED",
    "NONE",
    "SweepConfig",
    "build_parser",
    "convention_numbers",
    "layers_label",
    "main",
    "measure",
    "noise_draws",
    "parse_sweep",
    "plot_results",
    "prepare_out",
    "run_label",
    "run_sweep",
    "summarize",
    "train_config",
    "weight_label",
    "write_tables",
]
