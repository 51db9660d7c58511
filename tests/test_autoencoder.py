"""The latent-diffusion autoencoder (nets/autoencoder.py) and its losses
(losses/autoencoder.py): the posterior's KL against its closed form and a Monte Carlo estimate,
SSIM's identities, the adaptive GAN weight against its definition, slicing and tiling."""

import math

import pytest
import torch
from helpers import randomize
from hypothesis import given, settings
from hypothesis import strategies as st

from losses import (
    adaptive_gan_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    psnr,
    reconstruction_loss,
    ssim,
)
from nets import AutoencoderKL, DiagonalGaussian, PatchDiscriminator, blend_ramp, tile_starts
from nets.autoencoder import LOGVAR_MAX, LOGVAR_MIN, tiled_apply


def small_autoencoder(attention=True, seed=0, mult=(1, 2)):
    torch.manual_seed(seed)
    return AutoencoderKL(3, 4, 8, mult, 1, attention).eval()


# ---- posterior ----

def test_kl_matches_closed_form_per_element():
    """KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2, summed over the latent."""
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    s = torch.exp(0.5 * logvar)
    expected = (torch.log(1 / s) + (s**2 + mean**2) / 2 - 0.5).flatten(1).sum(1)
    torch.testing.assert_close(DiagonalGaussian(mean, logvar).kl(), expected)


def test_kl_matches_monte_carlo():
    """E_q[log q(z) - log p(z)] estimated from 200k samples agrees with kl() within 4 standard
    errors of the estimate."""
    mean = torch.tensor([[0.7, -1.2, 0.1]]).reshape(1, 3, 1, 1)
    logvar = torch.tensor([[-0.5, 0.4, -1.5]]).reshape(1, 3, 1, 1)
    q = DiagonalGaussian(mean, logvar)
    g = torch.Generator().manual_seed(1)
    n = 200_000
    z = mean + q.std * torch.randn(n, 3, 1, 1, generator=g, dtype=torch.float32)
    log_q = (-0.5 * ((z - mean) / q.std) ** 2 - 0.5 * logvar - 0.5 * math.log(2 * math.pi))
    log_p = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    terms = (log_q - log_p).flatten(1).sum(1).double()
    estimate, stderr = terms.mean().item(), terms.std().item() / n**0.5
    assert abs(estimate - q.kl().item()) < 4 * stderr


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.equal(DiagonalGaussian(zeros, zeros).kl(), torch.zeros(2))
    assert (DiagonalGaussian(zeros + 0.1, zeros).kl() > 0).all()


def test_posterior_sample_statistics_and_generator():
    mean, logvar = torch.full((1, 1, 100, 100), 2.0), torch.full((1, 1, 100, 100), math.log(0.25))
    q = DiagonalGaussian(mean, logvar)
    z = q.sample(torch.Generator().manual_seed(3))
    assert abs(z.mean().item() - 2.0) < 0.02 and abs(z.std().item() - 0.5) < 0.02
    assert torch.equal(z, q.sample(torch.Generator().manual_seed(3)))
    assert torch.equal(q.mode(), mean)


def test_logvar_is_clamped():
    q = DiagonalGaussian(torch.zeros(1, 1, 1, 2), torch.tensor([[[[-100.0, 100.0]]]]))
    assert q.logvar.flatten().tolist() == [LOGVAR_MIN, LOGVAR_MAX]
    assert torch.isfinite(q.kl()).all()


def test_posterior_shapes_must_agree():
    with pytest.raises(ValueError, match="same shape"):
        DiagonalGaussian(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 4))


# ---- the network ----

@pytest.mark.parametrize("mult,f", [((1,), 1), ((1, 2), 2), ((1, 2, 2), 4)])
def test_shapes_and_downsampling_factor(mult, f):
    ae = small_autoencoder(mult=mult)
    assert ae.downsampling_factor == f
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = ae.encode(x)
    assert posterior.mean.shape == (2, 4, 16 // f, 16 // f)
    assert ae.decode(posterior.mean).shape == x.shape
    out, q = ae(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and q.kl().shape == (2,)


def test_from_config_reads_the_ae_fields():
    from diffusion import DiffusionConfig
    config = DiffusionConfig(stage="autoencoder", latent_channels=3, ae_channels=8,
                             ae_channel_mult=(1, 2, 2), ae_num_res_blocks=2, ae_attention=False)
    ae = AutoencoderKL.from_config(config)
    assert (ae.latent_channels, ae.downsampling_factor, ae.in_channels) == (3, 4, 3)
    assert len(ae.decoder.up) == 3 * 3 + 2  # (num_res_blocks + 1) per level, 2 upsamplings
    assert not any(type(m).__name__ == "AttentionBlock" for m in ae.modules())


def test_norm_groups_cap_every_group_norm():
    """ae_norm_groups and the UNet's norm_groups reach every GroupNorm (gcd with the width)."""
    from diffusion import DiffusionConfig
    from nets import AdvancedUNet
    ae = AutoencoderKL.from_config(DiffusionConfig(stage="autoencoder", ae_channels=16,
                                                   ae_norm_groups=4))
    small = dict(model_channels=32, channel_mult=(1, 2), context_dim=64, sample_size=16,
                 attention_resolutions=(8,), gradient_checkpointing=False)
    unet = AdvancedUNet(DiffusionConfig(**small, norm_groups=4))
    default = AdvancedUNet(DiffusionConfig(**small))
    for model, groups in ((ae, {4}), (unet, {4}), (default, {32})):
        found = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
        assert found == groups, (type(model).__name__, found)


@pytest.mark.parametrize("bad, match", [
    (dict(latent_channels=0), "latent_channels=0"),
    (dict(norm_groups=0), "norm_groups=0"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(num_res_blocks=True), "num_res_blocks=True"),
])
def test_constructor_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderKL(**bad)


def test_encode_and_decode_check_their_inputs():
    ae = small_autoencoder()
    with pytest.raises(ValueError, match=r"x must be a \(B, 3, H, W\)"):
        ae.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of the downsampling factor 2"):
        ae.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"z must be a \(B, 4, H, W\)"):
        ae.decode(torch.zeros(1, 3, 8, 8))


def test_slicing_gives_the_batch_decode():
    ae = small_autoencoder()
    randomize(ae, seed=2)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        whole, whole_moments = ae.decode(z), ae.encode(x).mean
        ae.enable_slicing()
        sliced, sliced_moments = ae.decode(z), ae.encode(x).mean
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sliced_moments, whole_moments, rtol=1e-5, atol=1e-5)


# ---- tiling ----

@given(size=st.integers(1, 200), tile=st.integers(2, 64), overlap=st.integers(0, 63))
@settings(max_examples=200, deadline=None)
def test_tile_starts_cover_with_the_overlap(size, tile, overlap):
    if overlap >= tile:
        overlap = tile - 1
    starts = tile_starts(size, tile, overlap)
    tile = min(tile, size)
    covered = torch.zeros(size, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + tile == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # shares >= overlap


def test_blend_weights_are_a_partition_of_unity():
    """The summed weights normalise every pixel: with fn = identity the tiled result is the
    input, whatever the tiling."""
    x = torch.randn(2, 3, 37, 50, generator=torch.Generator().manual_seed(0))
    out = tiled_apply(lambda piece: piece, x, tile=16, overlap=6, scale=1)
    torch.testing.assert_close(out, x)
    ramp = blend_ramp(16, 6, first=False, last=False)
    assert (ramp > 0).all() and ramp.max() == 1 and ramp[0] < ramp[3] < ramp[8]


def test_tiling_matches_a_local_function_exactly():
    """A function that commutes with cropping (nearest upsampling) gives the untiled result."""
    x = torch.randn(1, 2, 24, 40, generator=torch.Generator().manual_seed(1))

    def upsample(t):
        return torch.nn.functional.interpolate(t, scale_factor=4, mode="nearest")

    torch.testing.assert_close(tiled_apply(upsample, x, 8, 4, 4), upsample(x))


def test_tiled_decode_equals_untiled_when_the_image_fits_one_tile():
    ae = small_autoencoder()
    randomize(ae, seed=3)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        whole, moments = ae.decode(z), ae.encode(x).mean
        ae.enable_tiling(tile_size=16, overlap=4)
        assert torch.equal(ae.decode(z), whole)
        assert torch.equal(ae.encode(x).mean, moments)


def test_tiled_decode_seams_are_bounded():
    """Across tiles the decode differs from the untiled one only where the network is not
    local (GroupNorm statistics, attention, the receptive field near tile borders). The bound:
    at every pixel the blended value lies between the smallest and largest of the tile decodes
    covering it (a convex combination), so |tiled - untiled| <= max over those tiles of
    |tile decode - untiled|; and the jump between neighbouring pixels at a seam is no larger
    than the largest jump inside the untiled decode plus twice that disagreement."""
    ae = small_autoencoder(attention=False, mult=(1, 2))
    randomize(ae, seed=4)
    z = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = ae.decode(z)  # (1, 3, 40, 40)
        ae.enable_tiling(tile_size=16, overlap=8)
        tiled = ae.decode(z)
        starts = tile_starts(20, 8, 4)
        disagreement = torch.zeros_like(whole)
        for y in starts:
            for x in starts:
                piece = ae.decoder(z[..., y:y + 8, x:x + 8])
                region = whole[..., 2 * y:2 * y + 16, 2 * x:2 * x + 16]
                d = disagreement[..., 2 * y:2 * y + 16, 2 * x:2 * x + 16]
                torch.maximum(d, (piece - region).abs(), out=d)
    error = (tiled - whole).abs()
    assert (error <= disagreement + 1e-5).all()
    assert error.max() > 0  # the decoder is not local: the bound is doing work
    jumps = (tiled[..., 1:] - tiled[..., :-1]).abs()
    whole_jumps = (whole[..., 1:] - whole[..., :-1]).abs()
    assert jumps.max() <= whole_jumps.max() + 2 * disagreement.max() + 1e-5


def test_enable_tiling_checks_its_arguments():
    ae = small_autoencoder()
    with pytest.raises(ValueError, match="tile_size=15 must be a positive multiple of the "
                                         "autoencoder's downsampling factor 2"):
        ae.enable_tiling(15, 4)
    with pytest.raises(ValueError, match="tile_size=0 must be a positive multiple"):
        ae.enable_tiling(0, 0)
    with pytest.raises(ValueError, match="overlap=3 must be a non-negative multiple"):
        ae.enable_tiling(16, 3)
    with pytest.raises(ValueError, match="overlap=16 must be smaller than tile_size=16"):
        ae.enable_tiling(16, 16)


# ---- losses ----

images = st.integers(0, 2**31 - 1).map(
    lambda seed: torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1)


@given(x=images, y=images)
@settings(max_examples=30, deadline=None)
def test_ssim_identities(x, y):
    torch.testing.assert_close(ssim(x, x), torch.ones(2))
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    value = ssim(x, y)
    assert (value <= 1 + 1e-6).all() and (value >= -1 - 1e-6).all()


def test_ssim_falls_as_noise_grows():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(1, 3, 32, 32, generator=g)
    values = [ssim(x, (x + sigma * noise).clamp(-1, 1)).item() for sigma in (0.0, 0.05, 0.2, 0.8)]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(1.0)


def test_ssim_of_a_constant_shift_is_the_luminance_term():
    """Constant images: SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) exactly."""
    x, y = torch.full((1, 1, 12, 12), 0.2), torch.full((1, 1, 12, 12), -0.3)
    c1 = (0.01 * 2) ** 2
    expected = (2 * 0.2 * -0.3 + c1) / (0.2**2 + 0.3**2 + c1)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-4)


def test_ssim_needs_matching_shapes():
    with pytest.raises(ValueError, match="ssim needs two"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_psnr_and_reconstruction_loss():
    x = torch.zeros(2, 3, 4, 4)
    y = x + torch.tensor([0.2, 0.02]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(psnr(y, x), 10 * torch.log10(4 / torch.tensor([0.04, 0.0004])))
    loss = reconstruction_loss(y, x, l1_weight=2.0, l2_weight=3.0, ssim_weight=0.0)
    torch.testing.assert_close(loss, 2 * torch.tensor([0.2, 0.02]) + 3 * torch.tensor([0.04, 4e-4]))
    with_ssim = reconstruction_loss(y, x, l1_weight=0, ssim_weight=1.0)
    torch.testing.assert_close(with_ssim, 1 - ssim(y, x))


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # relu(1 - real) = [0, .5], relu(1 + fake) = [0, 1]
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_generator_loss(fake).item() == pytest.approx(1.5)


def test_adaptive_weight_matches_its_definition():
    """||d rec / d W|| / (||d gan / d W|| + 1e-4) at the last layer W, computed by hand for a
    linear 'decoder' whose gradients are known in closed form."""
    W = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    h = torch.tensor([0.3, -0.7])
    out = W @ h
    rec = (out ** 2).sum()        # d/dW = 2 out h^T
    gan = -(3.0 * out).sum()      # d/dW = -3 * 1 h^T
    weight = adaptive_gan_weight(rec, gan, W)
    out_value = (W @ h).detach()
    rec_norm = torch.outer(2 * out_value, h).norm()
    gan_norm = torch.outer(torch.full((2,), -3.0), h).norm()
    assert weight.item() == pytest.approx((rec_norm / (gan_norm + 1e-4)).item(), rel=1e-6)
    assert not weight.requires_grad
    rec.backward()  # the graphs were kept for the real backward
    assert W.grad is not None


def test_adaptive_weight_is_clamped():
    W = torch.ones(2, requires_grad=True)
    rec = (W * 1e9).sum()
    gan = (W * 0.0).sum()
    assert adaptive_gan_weight(rec, gan, W).item() == pytest.approx(1e4)


def test_patch_discriminator_gives_a_logit_map():
    d = PatchDiscriminator(3, 8, 2)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)
