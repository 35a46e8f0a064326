"""Dream training: learning from the network's own DeepDream images.

`generator`: batched DeepDream (jitter, normalised gradient, octaves, clipping; seeded);
`rounds`: iterated dream training; `evaluate`: PGD attacks, dreams of another net, a shape-texture
cue conflict, and adversarial training as a control; `pictures`: image grids. Importing this
package registers the bench method `dream` and the command `frugal dream`.
"""

from frugal.dream.generator import DreamConfig, dream, objective_value
from frugal.dream.rounds import DreamTrainConfig, dream_split, dream_training, pixel_range

from frugal.dream import bench as _bench  # noqa: E402,F401  registers the bench method `dream`
from frugal.dream import cli as _cli  # noqa: E402,F401  registers `frugal dream`

__all__ = ["DreamConfig", "DreamTrainConfig", "dream", "dream_split", "dream_training", "objective_value", "pixel_range"]
