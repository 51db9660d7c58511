"""The UNet with its text encoder as one module: what training optimises and sampling calls."""

from torch import nn


class TextConditionedDenoiser(nn.Module):
    """The UNet and the text encoder as one module, so one optimizer, one EMA and one
    DistributedDataParallel wrapper cover both. forward returns the UNet's prediction.
    A UNet without cross-attention (use_spatial_transformer=False) is unconditional: the
    text is not encoded, and the trainer freezes the text encoder."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.uses_text = getattr(unet, "has_cross_attention", True)

    def forward(self, x_t, timesteps, input_ids, attention_mask):
        if not self.uses_text:
            return self.unet(x_t, timesteps)["sample"]
        # (B, L, D), (B, L), L cut to the batch's longest prompt
        context, mask = self.text_encoder(input_ids, attention_mask, trim=True)
        return self.unet(x_t, timesteps, context, mask)["sample"]
