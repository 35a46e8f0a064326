"""An unsupervised base: a conv autoencoder whose features are learnt without labels.

The encoder (conv-BN-ReLU-pool stages, like `convnet`) is trained only by the reconstruction
loss, returned to the training loop as the model's `extra_loss`. Its forward pass also gives class
logits from a linear probe on the detached code, so the ordinary loop can train and measure it;
the probe's gradient never reaches the encoder. The tree's clusters then come from the code.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from frugal.models import InputCheck, conv_pool_stages, register_model


class ConvAutoencoder(nn.Module):
    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, widths=(16, 32),
                 code: int = 64):
        super().__init__()
        self.check = InputCheck(in_channels, image_size)
        self.features = conv_pool_stages(in_channels, widths)  # the encoder: convnet's stages
        cin = widths[-1]
        h, w = image_size[0] // 2 ** len(widths), image_size[1] // 2 ** len(widths)
        self.map_shape = (cin, h, w)
        self.to_code = nn.Linear(cin * h * w, code)
        self.from_code = nn.Linear(code, cin * h * w)
        ups = []
        for i, wd in enumerate(reversed(widths)):
            cout = in_channels if i == len(widths) - 1 else list(reversed(widths))[i + 1]
            ups += [nn.Upsample(scale_factor=2), nn.Conv2d(wd, cout, 3, padding=1)]
            if i < len(widths) - 1:
                ups.append(nn.ReLU())
        self.decoder = nn.Sequential(*ups)
        self.image_size = image_size
        self.probe = nn.Linear(code, num_classes)  # the classifier; trained on the detached code
        self.recon: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.to_code(self.features(self.check(x)).flatten(1)))  # (B, code)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = self.encode(x)
        if self.training:
            m = self.from_code(code).view(-1, *self.map_shape)  # (B, C, h, w)
            self.recon = F.interpolate(self.decoder(m), size=self.image_size)  # (B, C_in, H, W)
        return self.probe(code.detach())

    def extra_loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Reconstruction error: what trains the encoder (labels never reach it)."""
        return F.mse_loss(self.recon, x) if self.recon is not None else None


@register_model
def convae(in_channels: int = 1, image_size: tuple[int, int] = (28, 28), num_classes: int = 10,
           code: int = 64) -> nn.Module:
    """Conv autoencoder (16-32 stages, a code of `code` units), trained by reconstruction only;
    a linear probe on the detached code gives its class logits."""
    return ConvAutoencoder(in_channels, image_size, num_classes, code=code)
