"""Saccades: hard attention that really skips compute.

A cheap policy looks at a downsampled image and picks, per block, skip / 3x3 / 5x5; the expensive
convs then run only on the chosen blocks (`BlockSparseConv2d`: gather, dense conv, scatter).
Importing this package registers the models `saccadic` and `blockcnn` (its dense twin).
"""

from frugal.saccade.model import SaccadicCNN, auto_block_size
from frugal.saccade.policy import Attention, AttentionPolicy, choose_levels
from frugal.saccade.sparse_conv import BlockSparseConv2d, coordinate_channels, dense_reference

__all__ = ["Attention", "AttentionPolicy", "BlockSparseConv2d", "SaccadicCNN", "auto_block_size",
           "choose_levels", "coordinate_channels", "dense_reference"]
