"""Simple kernels: fewer degrees of freedom per kernel, before, during and after training.

`constrained`: conv layers whose kernels are symmetric, separable or in a low-frequency DCT basis
by construction, or tied in channel orbits of rotations and mirrors (`group`), and the model
`constrained` that swaps every conv of a registered model for one kind. `penalty`: information
penalties during training (`KernelPenalty`: a loss term on any module). `snapping`: detect, snap
(`snap`) and freeze (`FreezeKernels`) near-simple kernels after training.
`pictures`: kernel grids. Importing this package registers the model `constrained` and the bench
method `kernels`.
"""

from __future__ import annotations

import torch.nn as nn

from frugal.kernels.constrained import (SYMMETRIES, SeparableKernel, SubspaceKernel, conv_free_parameters,
                                        constrain, constrain_conv, dct_basis, kind_names, parametrization_for,
                                        pixel_classes, symmetry_basis)
from frugal.kernels.penalty import KernelPenalty, PenaltyConfig, SharedValues
from frugal.kernels.snapping import FreezeKernels, SnapResult, snap
from frugal.models import create_model, register_model


@register_model
def constrained(in_channels: int = 1, image_size: tuple[int, int] = (28, 28), num_classes: int = 10,
                base: str = "lenet5", kind: str = "d4", **base_kw) -> nn.Module:
    """Any registered model with every conv of 2x2 or larger swapped for a constrained kind
    (lr, ud, lrud, c4, d4, radial, dct<m>, rank<r>, lsep<R>), or with every conv tied in channel
    orbits of a group (p4, p4m)."""
    if base == "constrained":
        raise ValueError("base must be a registered model other than 'constrained'")
    model = create_model(base, in_channels=in_channels, image_size=image_size, num_classes=num_classes, **base_kw)
    return constrain(model, kind, rescale=True)


from frugal.kernels import bench as _bench  # noqa: E402,F401  registers the bench method `kernels`

__all__ = ["SYMMETRIES", "FreezeKernels", "KernelPenalty", "PenaltyConfig", "SeparableKernel", "SharedValues",
           "SnapResult", "SubspaceKernel", "conv_free_parameters", "constrain", "constrain_conv", "constrained",
           "dct_basis", "kind_names", "parametrization_for", "pixel_classes", "snap", "symmetry_basis"]
