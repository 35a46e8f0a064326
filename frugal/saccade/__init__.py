"""Saccades: hard attention that really skips compute.

A cheap policy looks at a downsampled image and picks, per block, skip / 3x3 / 5x5; the expensive
convs then run only on the chosen blocks (`BlockSparseConv2d`: gather, dense conv, scatter).
Then glimpse trajectories: `TrajectoryCNN`, windows of blocks one after another until the prediction
is confident, and `RecurrentAttentionModel` (Mnih et al. 2014). Importing this package registers
the models `saccadic`, `blockcnn` (its dense twin), `trajectory` and `ram`.
"""

from frugal.saccade.glimpse import GlimpseSensor, RecurrentAttentionModel, glimpse_boxes
from frugal.saccade.model import SaccadicCNN, auto_block_size
from frugal.saccade.policy import Attention, AttentionPolicy, choose_levels
from frugal.layers.sparse_conv import BlockSet, BlockSparseConv2d, coordinate_channels, dense_reference
from frugal.saccade.teacher import TwinTeacher, block_evidence
from frugal.saccade.temporal import GlimpseTeacher, Trajectory, TrajectoryCNN

__all__ = ["Attention", "AttentionPolicy", "BlockSet", "BlockSparseConv2d", "GlimpseSensor", "RecurrentAttentionModel",
           "SaccadicCNN", "auto_block_size", "choose_levels", "coordinate_channels", "dense_reference",
           "TwinTeacher", "block_evidence", "glimpse_boxes", "GlimpseTeacher", "Trajectory", "TrajectoryCNN"]

from frugal.saccade import bench as _bench  # noqa: E402,F401  registers the bench method `saccade`

from frugal.models import register_transform  # noqa: E402
from frugal.saccade.sparsify import GatedConv2d, SaccadeGate, gate_of, gateable, sparsify  # noqa: E402

register_transform("sparsify", sparsify)
__all__ += ["GatedConv2d", "SaccadeGate", "gate_of", "gateable", "sparsify"]
