"""The UNet's levels (nets/unet.py assembles them): DownBlock, MidBlock and UpBlock, each a
sequence of ResBlocks and attention layers at one resolution, with optional gradient
checkpointing (Chen et al. 2016) of every sub-module."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _Checkpointed(nn.Module):
    """Runs its sub-modules through torch.utils.checkpoint when `gradient_checkpointing` is set
    and autograd is recording (non-reentrant; dropout RNG state is replayed)."""

    gradient_checkpointing = False

    def _call(self, module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)


class DownBlock(_Checkpointed):
    """One encoder level: resnets[k] then attentions[k] (if any) for each k, then downsample.

    forward(x: (B, C_in, H, W), emb, context, mask) -> (h, skips), h: (B, C, H/2, W/2) (or
    (B, C, H, W) without downsample); skips holds every intermediate output.
    """

    def __init__(self, resnets, attentions, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty: no attention at this level
        self.downsample = downsample

    def forward(self, x, emb, context=None, key_padding_mask=None):
        skips = []
        for k, resnet in enumerate(self.resnets):
            x = self._call(resnet, x, emb)
            if self.attentions:
                x = self._call(self.attentions[k], x, context, key_padding_mask)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)  # a single conv: checkpointing it would save nothing
            skips.append(x)
        return x, skips


class MidBlock(_Checkpointed):
    """ResBlock, attention, ResBlock at the lowest resolution. x: (B, C, h, w) -> same."""

    def __init__(self, resnet_1, attention, resnet_2):
        super().__init__()
        self.resnets = nn.ModuleList([resnet_1, resnet_2])
        self.attention = attention

    def forward(self, x, emb, context=None, key_padding_mask=None):
        x = self._call(self.resnets[0], x, emb)
        x = self._call(self.attention, x, context, key_padding_mask)
        return self._call(self.resnets[1], x, emb)


class UpBlock(_Checkpointed):
    """One decoder level: for each k, resnets[k] on [h, skip] concatenated along channels,
    then attentions[k] (if any); then upsample. Consumes len(resnets) skips, last first."""

    def __init__(self, resnets, attentions, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.upsample = upsample

    def forward(self, x, skips, emb, context=None, key_padding_mask=None):
        for k, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = self._call(resnet, x, emb)
            if self.attentions:
                x = self._call(self.attentions[k], x, context, key_padding_mask)
        if self.upsample is not None:
            x = self.upsample(x)
        return x
