"""Layers that two ideas share (saccades' block-sparse convs also compute the specialists' features
only where a feature fires), kept in the spine so that no idea imports another.

`sparse_conv`: `BlockSparseConv2d`, a convolution computed only on the blocks that asked for it.
"""

from frugal.layers.sparse_conv import BlockSet, BlockSparseConv2d, coordinate_channels, dense_reference

__all__ = ["BlockSet", "BlockSparseConv2d", "coordinate_channels", "dense_reference"]
