"""First cross-framework check: the penalised loss and its weight gradients agree (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

import torch_ref
from jax_impl import Net, penalized_loss


def test_penalized_loss_and_weight_grads_match_reference_float64():
    with jax.enable_x64(True):
        torch.manual_seed(0)
        tnet = torch_ref.Net().double()
        params = jax.tree.map(jnp.asarray, torch_ref.export_flax_params(tnet))
        rng = np.random.default_rng(0)
        x = rng.random((7, 3, 32, 32))
        y = rng.integers(0, 10, 7)
        total_t, _ = torch_ref.penalized_loss(tnet, torch.tensor(x), torch.tensor(y), 10.0)
        total_t.backward()

        def f(p):
            return penalized_loss(p, Net(), jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(y),
                                  penalty_weight=10.0)[0]

        total_j, grads = jax.value_and_grad(f)(params)
        # float64 rounding only: 1e-10 is ~1e5 ulps of headroom.
        np.testing.assert_allclose(float(total_j), total_t.item(), rtol=1e-10, atol=0)
        grads_t = torch_ref.export_flax_params(tnet, grads=True)
        for layer in grads_t:
            for name in grads_t[layer]:
                np.testing.assert_allclose(np.asarray(grads[layer][name]), grads_t[layer][name],
                                           rtol=1e-10, atol=1e-14)

