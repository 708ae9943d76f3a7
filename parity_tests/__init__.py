"""Parity suite: jax_impl against torch_ref on identical weights.

Cross-framework code (it imports both JAX and PyTorch) lives here and only here.
"""
