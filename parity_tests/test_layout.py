"""torch_ref.Net accepts NCHW tensors of any strides, as a user's transposed NHWC array."""

import numpy as np
import torch

import torch_ref


def test_reference_accepts_a_bare_transpose_of_nhwc_data():
    torch.manual_seed(0)
    net = torch_ref.Net(in_channels=1).double()
    x_nhwc = np.random.default_rng(0).random((3, 32, 32, 1))
    strided = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)  # channels-last strides, like .view rejects
    contiguous = strided.contiguous()
    # Same arithmetic on the same values: only the memory layout differs.
    torch.testing.assert_close(net(strided), net(contiguous), rtol=1e-12, atol=1e-12)
