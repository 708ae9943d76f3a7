"""Example model pairs: a PyTorch module and its Flax twin, for ``python -m parity_tests.verify``.

``lenet_torch.LeNet`` (pure PyTorch, no project imports) and
``lenet_flax.LeNet`` (Flax Linen, capture points marked with
``jax_impl.capture``) are the same LeNet-5. Check them against each other,
from the repository root::

    python -m parity_tests.verify examples.lenet_torch:LeNet examples.lenet_flax:LeNet \\
        --input-shape 8,1,28,28 --num-classes 10 --captures tanh1=act1,tanh2=act2
"""
