import pytest
import torch
import torch.nn.functional as F

from frugal.measure import count_macs
from frugal.saccade import BlockSparseConv2d, coordinate_channels, dense_reference


def random_levels(b, gh, gw, n_levels, gen):
    return torch.randint(0, n_levels + 1, (b, gh, gw), generator=gen)


@pytest.mark.parametrize("coords", [True, False])
@pytest.mark.parametrize("block, size, kernels", [(4, (12, 16), (3, 5)), (8, (16, 24), (1, 3, 5)), (5, (10, 10), (7,))])
def test_sparse_conv_equals_a_dense_conv_on_the_chosen_blocks(coords, block, size, kernels):
    gen = torch.Generator().manual_seed(0)
    conv = BlockSparseConv2d(3, 6, block_size=block, kernel_sizes=kernels, coords=coords)
    x = torch.randn(4, 3, *size, generator=gen)
    levels = random_levels(4, size[0] // block, size[1] // block, len(kernels), gen)
    out = conv(x, levels)
    # independent oracle: F.conv2d over the whole map (with coordinate channels), per level
    xin = torch.cat([x, coordinate_channels(*size).expand(4, 2, *size)], 1) if coords else x
    expected = torch.zeros(4, 6, *size)
    mask = levels.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, None]
    for lvl, k in enumerate(kernels, start=1):
        full = F.conv2d(xin, conv.weight[lvl - 1], conv.bias[lvl - 1], padding=k // 2)
        expected = torch.where(mask == lvl, full, expected)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_reference(conv, x, levels), expected, atol=1e-5, rtol=1e-5)


def test_border_blocks_see_zero_padding_not_the_other_side():
    conv = BlockSparseConv2d(1, 1, block_size=4, kernel_sizes=(5,), coords=False, bias=False)
    with torch.no_grad():
        conv.weight[0].fill_(1.0)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, :, -1] = 1.0  # a bright right-most column
    levels = torch.tensor([[[1, 0], [0, 0]]])  # only the top-left block
    assert conv(x, levels).abs().sum() == 0  # the column is 4+ pixels away from that block


def test_gradients_match_the_dense_reference():
    gen = torch.Generator().manual_seed(1)
    conv = BlockSparseConv2d(2, 3, block_size=4, kernel_sizes=(3, 5))
    x = torch.randn(2, 2, 8, 12, generator=gen, requires_grad=True)
    levels = random_levels(2, 2, 3, 2, gen)
    g = torch.randn(2, 3, 8, 12, generator=gen)
    (conv(x, levels) * g).sum().backward()
    sparse_grads = [x.grad.clone()] + [p.grad.clone() for p in conv.parameters()]
    x.grad = None
    conv.zero_grad()
    (dense_reference(conv, x, levels) * g).sum().backward()
    dense_grads = [x.grad] + [p.grad for p in conv.parameters()]
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gradcheck_in_double_precision():
    gen = torch.Generator().manual_seed(2)
    conv = BlockSparseConv2d(1, 2, block_size=2, kernel_sizes=(3,), dtype=torch.float64)
    x = torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    levels = torch.tensor([[[1, 0], [1, 1]]])
    assert torch.autograd.gradcheck(lambda inp: conv(inp, levels), (x,))


def test_work_is_proportional_to_the_chosen_blocks_and_zero_when_all_skip():
    conv = BlockSparseConv2d(4, 8, block_size=4, kernel_sizes=(3, 5), coords=True)
    x = torch.randn(2, 4, 16, 16)

    class Wrap(torch.nn.Module):  # count_macs takes a module of one input
        def __init__(self, levels):
            super().__init__()
            self.levels = levels

        def forward(self, inp):
            return conv(inp, self.levels)

    none = torch.zeros(2, 4, 4, dtype=torch.long)
    assert count_macs(Wrap(none), x) == 0
    assert conv(x, none).abs().sum() == 0
    some = none.clone()
    some[0, 0, 0] = 1  # one 3x3 block in example 0
    some[1, 2, 3] = 2  # one 5x5 block in example 1
    per_block_3 = 8 * 4 * 4 * (4 + 2) * 3 * 3  # out x s x s x (in + 2 coordinates) x k x k
    per_block_5 = 8 * 4 * 4 * (4 + 2) * 5 * 5
    assert count_macs(Wrap(some), x) == (per_block_3 + per_block_5) / 2  # per example


@pytest.mark.parametrize("levels_shape, size, msg", [
    ((2, 3, 3), (16, 16), r"levels must have shape \(B, H/s, W/s\) = \(2, 4, 4\)"),
    ((2, 4, 4), (18, 16), "block size 4 does not divide the 18x16 map"),
])
def test_bad_shapes_are_named(levels_shape, size, msg):
    conv = BlockSparseConv2d(1, 1, block_size=4)
    with pytest.raises(ValueError, match=msg):
        conv(torch.zeros(2, 1, *size), torch.zeros(levels_shape, dtype=torch.long))


def test_bad_level_values_and_kernels():
    conv = BlockSparseConv2d(1, 1, block_size=4, kernel_sizes=(3, 5))
    with pytest.raises(ValueError, match=r"levels must be in 0..2 \(0 = skip\), got values 0..3"):
        conv(torch.zeros(1, 1, 8, 8), torch.tensor([[[0, 3], [1, 2]]]))
    with pytest.raises(ValueError, match="integer tensor"):
        conv(torch.zeros(1, 1, 8, 8), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="odd"):
        BlockSparseConv2d(1, 1, kernel_sizes=(4,))
