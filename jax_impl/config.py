"""The training configuration of ``jax_impl.train``.

It is framework-free and shared with ``torch_ref.train``, so it lives in
``agp_common.config``; this module re-exports it under the JAX package.
"""

from agp_common.config import DEFAULT_EPOCHS, TrainConfig, build_parser, parse_config, validate_config

__all__ = ["DEFAULT_EPOCHS", "TrainConfig", "build_parser", "parse_config", "validate_config"]
