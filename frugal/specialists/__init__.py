"""Conditional specialists: a trained net decides the conditional structure of new ones.

`nets`: taps into a frozen parent and the `Specialist` that reads them; `tree`: the feature-cluster
tree (routing, saving, loading); `build`: clustering and node training; `runner`: the node jobs on a
process pool (or Ray, or serially); `spatial`: features computed only where a base feature fires;
`autoencoder`: the unsupervised base `convae`.
"""

from frugal.specialists import autoencoder as _autoencoder  # noqa: F401  registers the model `convae`
from frugal.specialists.build import build_tree, train_node
from frugal.specialists.nets import Specialist, Tapped, default_taps
from frugal.specialists.runner import run_jobs
from frugal.specialists.spatial import SpatialSpecialist, choose_features
from frugal.specialists.tree import Tree, TreeConfig, load_tree, save_tree

from frugal.specialists import bench as _bench  # noqa: E402,F401  registers the bench method `specialists`

__all__ = ["SpatialSpecialist", "Specialist", "Tapped", "choose_features", "Tree", "TreeConfig", "build_tree", "default_taps", "load_tree", "run_jobs",
           "save_tree", "train_node"]
