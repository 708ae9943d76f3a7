"""Parity suite: jax_impl against torch_ref on identical weights.

Cross-framework code (it imports both JAX and PyTorch) lives here and only here.
"""

#: The dtypes every parity comparison runs in, float64 first (the exact one). Defined here, not in
#: ``harness``, so that ``conftest.py`` can parametrise with it without importing JAX and PyTorch.
DTYPES = ("float64", "float32")
