import pytest
import torch
import torch.nn.functional as F

from frugal.measure import count_macs
from frugal.saccade import BlockSet, BlockSparseConv2d, coordinate_channels, dense_reference


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


@pytest.mark.parametrize("grad", [True, False])  # without autograd the gathers reuse a workspace
@pytest.mark.parametrize("coords", [True, False])
@pytest.mark.parametrize("block", [4, 2, 1])  # a 5x5 halo of 2 reaches two blocks away when s = 1
def test_a_stack_of_tile_layers_equals_the_stack_of_dense_map_layers(coords, block, grad):
    # tiles hand tiles on; the halo of each comes from neighbouring tiles or zeros (skipped
    # neighbours, the border): the result must match the dense-map form layer by layer
    gen = torch.Generator().manual_seed(3)
    first = BlockSparseConv2d(2, 5, block_size=block, kernel_sizes=(3, 5), coords=coords)
    second = BlockSparseConv2d(5, 4, block_size=block, kernel_sizes=(3, 5), coords=coords)
    x = torch.randn(3, 2, 3 * block, 4 * block, generator=gen)
    levels = random_levels(3, 3, 4, 2, gen)
    levels[0] = 0  # an example with nothing chosen
    levels[1, 0, 0] = levels[1, 2, 3] = 2  # 5x5 at corners: halos outside the map
    blocks = BlockSet(levels)
    with torch.set_grad_enabled(grad):
        t1 = F.relu(first.forward_tiles(x, blocks))  # from a dense map
        t2 = second.forward_tiles(t1, blocks)  # from tiles
        again = second.forward_tiles(t1 * 2, blocks)  # a second call must not disturb the first result
    assert t2.shape == (blocks.n, block, block, 4)
    d1 = F.relu(first(x, levels))
    d2 = second(d1, levels)
    torch.testing.assert_close(blocks.to_map(t1), d1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocks.to_map(t2), d2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blocks.to_map(again), second(d1 * 2, levels), atol=1e-5, rtol=1e-5)


def test_tile_gradients_match_the_dense_map_form():
    gen = torch.Generator().manual_seed(4)
    conv = BlockSparseConv2d(3, 2, block_size=4, kernel_sizes=(3, 5))
    levels = random_levels(2, 2, 3, 2, gen)
    blocks = BlockSet(levels)
    tiles = torch.randn(blocks.n, 4, 4, 3, generator=gen, requires_grad=True)
    g = torch.randn(blocks.n, 4, 4, 2, generator=gen)
    (conv.forward_tiles(tiles, blocks) * g).sum().backward()
    grads = [tiles.grad.clone()] + [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    x = blocks.to_map(tiles.detach()).requires_grad_(True)
    (conv(x, levels) * blocks.to_map(g)).sum().backward()
    per_tile = x.grad.permute(0, 2, 3, 1).reshape(2, 2, 4, 3, 4, 3).permute(0, 1, 3, 2, 4, 5)[
        blocks.bi, blocks.yi, blocks.xi]  # (n, 4, 4, 3): the map's gradient on the chosen blocks
    for a, b in zip(grads, [per_tile] + [p.grad for p in conv.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_tile_input_of_the_wrong_shape_is_named():
    conv = BlockSparseConv2d(3, 2, block_size=4)
    blocks = BlockSet(torch.ones(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected a map \(1, 3, 8, 8\) or tiles \(4, 4, 4, 3\)"):
        conv.forward_tiles(torch.zeros(4, 4, 4, 2), blocks)
