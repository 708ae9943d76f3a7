"""The converter's names and flatten order: ``name_map`` prefixes, and what ``example_input`` finds.

``name_map`` renames module paths (whole path components, the longest match wins) and names the
key or the clashing tensors when it cannot; ``example_input`` runs the model once to find the
order in which a map is flattened into a ``Linear`` (and leaves the module as it was), and says
so when that run fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn as tnn

import torch_ref
from parity_tests.convert_twins import BatchNormTorch, WideTorch
from parity_tests.harness import to_numpy
from torch_ref.convert import linear_kernel_to_flax


class Trunk(tnn.Module):
    def __init__(self):
        super().__init__()
        self.features = tnn.Sequential(tnn.Conv2d(1, 2, 3), tnn.ReLU(), tnn.Conv2d(2, 2, 3))
        self.features2 = tnn.Sequential(tnn.Conv2d(2, 2, 1))


def test_name_map_keys_are_path_prefixes_and_the_longest_match_wins():
    name_map = {"features": "backbone", "features.2": "last/conv", "features2": ""}
    params = torch_ref.export_flax_params(Trunk(), name_map=name_map)
    # "features" renames its subtree but not "features2" (whole path components); the exact path
    # "features.2" beats the prefix; "" maps "features2"'s subtree to the root.
    assert set(traverse_util.flatten_dict(params, sep="/")) == {
        "backbone/0/kernel", "backbone/0/bias", "last/conv/kernel", "last/conv/bias", "0/kernel", "0/bias",
    }


class PermutedFlatten(tnn.Module):
    def __init__(self, permute: bool):
        super().__init__()
        self.permute = permute
        self.conv = tnn.Conv2d(2, 3, 3, padding=1)
        self.fc = tnn.Linear(72, 4)

    def forward(self, x):  # (B, 2, 4, 6)
        h = self.conv(x)  # (B, 3, 4, 6)
        if self.permute:
            h = h.permute(0, 2, 3, 1).contiguous()  # (B, 4, 6, 3): flattened (h, w, c), as Flax does
        return self.fc(torch.flatten(h, 1))


@pytest.mark.parametrize("permute", [False, True])
def test_example_input_finds_the_flatten_order_of_a_non_square_map(permute):
    model = PermutedFlatten(permute)
    kernel = torch_ref.export_flax_params(model, example_input=torch.zeros(1, 2, 4, 6))["fc"]["kernel"]
    weight = to_numpy(model.fc.weight)
    expected = weight.T if permute else linear_kernel_to_flax(weight, (3, 4, 6))
    np.testing.assert_array_equal(kernel, expected)


def test_example_input_run_leaves_the_module_as_it_was():
    model = BatchNormTorch().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch_ref.export_flax_variables(model, example_input=torch.ones(4, 2, 5, 5))
    assert all(m.training for m in model.modules())  # restored after the eval-mode run
    for key, value in model.state_dict().items():  # train mode would have moved the running statistics
        assert torch.equal(value, before[key]), key


def test_name_map_errors_name_the_key_or_the_clashing_tensors():
    with pytest.raises(ValueError, match=r"name_map key 'featurs' is not a module path of Trunk"):
        torch_ref.export_flax_params(Trunk(), name_map={"featurs": "backbone"})
    with pytest.raises(ValueError, match=r"features\.0\.weight and features\.2\.weight both map to "
                                         r"params\['conv'\]\['kernel'\]"):
        torch_ref.export_flax_params(Trunk(), name_map={"features.0": "conv", "features.2": "conv"})


def test_failing_example_input_says_so():
    with pytest.raises(ValueError, match=r"example_input: running WideTorch on it failed"):
        torch_ref.export_flax_params(WideTorch(), example_input=torch.zeros(1, 2, 5, 5))
