"""Saccades: hard attention that really skips compute.

A cheap policy looks at a downsampled image and picks, per block, skip / 3x3 / 5x5; the expensive
convs then run only on the chosen blocks (`BlockSparseConv2d`: gather, dense conv, scatter).
"""

from frugal.saccade.sparse_conv import BlockSparseConv2d, coordinate_channels, dense_reference

__all__ = ["BlockSparseConv2d", "coordinate_channels", "dense_reference"]
