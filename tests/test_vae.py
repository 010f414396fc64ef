"""Conditional VAE: shapes, conditioning, KL, clamping, critic/GP, ImageNet encoder weights, losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from invariscope.models import backbones
from invariscope.models.vae import (LOGVAR_MAX, LOGVAR_MIN, ConditionalVAE, Critic, ResNetEncoder, VAEConfig,
                                    VAELossWeights, active_dimensions, adapt_rgb_conv, count_parameters,
                                    critic_loss_terms, gradient_penalty, kl_divergence, mode_seeking_term,
                                    vae_loss_terms)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(conditional: bool = True, crop: int = 32, **kw) -> VAEConfig:
    base = dict(conditional=conditional, latent_dim=16, crop_size=crop, encoder="resnet-small",
                encoder_width=4, decoder_channels=4, attention_resolution=min(16, crop), z_chunk=3,
                z_embed_classes=8, z_embed_dim=4, critic_width=4, critic_max_width=16)
    base.update(kw)
    return VAEConfig(**base)


def images(b: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, s, s, generator=g), torch.randn(b, 1, s, s, generator=g)


# ---------------------------------------------------------------- shapes and structure
@pytest.mark.parametrize("crop", [32, 64])
@pytest.mark.parametrize("conditional", [True, False])
def test_forward_shapes(crop: int, conditional: bool) -> None:
    torch.manual_seed(0)
    cfg = tiny(conditional, crop)
    vae = ConditionalVAE(cfg)
    x, y = images(3, crop)
    y = y if conditional else None
    x_rec, mu, logvar = vae(x, y)
    assert x_rec.shape == (3, 1, crop, crop)
    assert mu.shape == logvar.shape == (3, cfg.latent_dim)
    assert torch.isfinite(x_rec).all()
    critic = Critic.from_config(cfg)
    assert critic(x_rec, y).shape == (3,)
    assert sum(vae.decoder.split_sizes) == cfg.latent_dim
    assert len(vae.decoder.blocks) == int(math.log2(crop)) - 2


def test_forward_128_tiny_width() -> None:
    torch.manual_seed(0)
    cfg = tiny(True, 128, decoder_channels=2, attention_resolution=64)
    vae = ConditionalVAE(cfg)
    x, y = images(2, 128)
    x_rec, mu, _ = vae(x, y)
    assert x_rec.shape == (2, 1, 128, 128) and mu.shape == (2, 16)
    assert len(vae.decoder.blocks) == 5 and vae.decoder.attention_index == 4  # attention at 64x64
    assert Critic.from_config(cfg)(x_rec, y).shape == (2,)


def test_paper_architecture_sizes() -> None:
    cfg = VAEConfig.paper()
    assert cfg.n_blocks == 5 and cfg.latent_dim == 256 and cfg.decoder_channels == 96
    enc = ResNetEncoder(cfg)
    assert enc.backbone.conv1.weight.shape == (64, 2, 7, 7)
    # ResNet-50 without fc (23,508,032 with an RGB conv1) + the 2048 -> 2*256 head
    assert count_parameters(enc)["total"] == 23_508_032 - 64 * 7 * 7 + 2048 * 512 + 512
    assert ResNetEncoder(VAEConfig.paper(False)).backbone.conv1.weight.shape == (64, 1, 7, 7)
    critic = Critic.from_config(cfg)
    assert critic.head.in_features == 16  # five stride-2 convs: 128 -> 4x4


def test_conditioning_errors_and_ychannel() -> None:
    torch.manual_seed(0)
    cond, uncond = ConditionalVAE(tiny(True)), ConditionalVAE(tiny(False))
    x, y = images(2, 32)
    z = torch.randn(2, 16)
    with pytest.raises(ValueError, match="needs y_hat"):
        cond(x)
    with pytest.raises(ValueError, match="needs y_hat"):
        cond.decode(z)
    with pytest.raises(ValueError, match="takes no y_hat"):
        uncond(x, y)
    with pytest.raises(ValueError, match="takes no y_hat"):
        uncond.decode(z, y)
    with pytest.raises(ValueError, match="shape"):
        cond.decode(z, y[:, :, :16, :16])
    with pytest.raises(ValueError):
        Critic(conditional=False, crop_size=32)(x, y)
    # ŷ enters every up-block and the output conv as one extra channel
    for blk_c, blk_u in zip(cond.decoder.blocks, uncond.decoder.blocks):
        assert blk_c.norm0.bn.num_features == blk_u.norm0.bn.num_features + 1
    assert cond.decoder.out_conv.in_channels == uncond.decoder.out_conv.in_channels + 1


def test_decoder_depends_on_y_hat() -> None:
    torch.manual_seed(0)
    vae = ConditionalVAE(tiny(True)).eval()
    _, y1 = images(2, 32, seed=1)
    _, y2 = images(2, 32, seed=2)
    z = torch.randn(2, 16)
    with torch.no_grad():
        a, b, a2 = vae.decode(z, y1), vae.decode(z, y2), vae.decode(z, y1)
    assert torch.equal(a, a2)
    assert (a - b).abs().max() > 1e-4
    # a smooth (constant) change of ŷ, kept by every resized copy, changes the output as well
    with torch.no_grad():
        c = vae.decode(z, y1 + 1.0)
    assert (a - c).abs().max() > 1e-4


def test_decoder_depends_on_z() -> None:
    torch.manual_seed(0)
    vae = ConditionalVAE(tiny(False)).eval()
    with torch.no_grad():
        a = vae.decode(torch.zeros(2, 16))
        b = vae.decode(torch.ones(2, 16))
    assert (a - b).abs().max() > 1e-4


def test_identity_decoder_init_starts_from_y_hat() -> None:
    """decoder_init='identity': the untrained decoder returns about ŷ (the paper's init does not)."""
    _, y = images(4, 32, seed=3)
    z = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    out = {}
    for init in ("default", "identity"):
        torch.manual_seed(0)
        vae = ConditionalVAE(tiny(True, decoder_init=init)).eval()
        with torch.no_grad():
            out[init] = vae.decode(z, y)
    w = vae.decoder.out_conv.weight[0, -1]
    assert torch.equal(w, torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    err = {k: float((v - y).abs().mean() / y.abs().mean()) for k, v in out.items()}
    assert err["identity"] < 0.5 < err["default"], err
    corr = torch.corrcoef(torch.stack([out["identity"].flatten(), y.flatten()]))[0, 1]
    assert corr > 0.9
    # an unconditional VAE has no ŷ channel: the setting leaves it alone
    torch.manual_seed(0)
    a = ConditionalVAE(tiny(False)).decoder.out_conv.weight
    torch.manual_seed(0)
    b = ConditionalVAE(tiny(False, decoder_init="identity")).decoder.out_conv.weight
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="decoder_init must be 'default' or 'identity'"):
        tiny(True, decoder_init="zero")


def test_mode_seeking_term() -> None:
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    z1, z2 = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    expected = ((z1 - z2).abs().mean(1) / ((x1 - x2).abs().flatten(1).mean(1) + 1e-5)).mean()
    assert torch.allclose(mode_seeking_term(x1, x2, z1, z2), expected)
    # more different outputs for the same latents: a smaller term (what the decoder is pushed to)
    assert mode_seeking_term(x1, 3 * x2, z1, z2) < mode_seeking_term(x1, x1 + 0.1 * x2, z1, z2)


# ---------------------------------------------------------------- KL and encoder
def test_kl_closed_form_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    ref = torch_kl(Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    out = kl_divergence(mu, logvar)
    assert out.shape == (5,)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)), torch.zeros(3))


def test_kl_monte_carlo() -> None:
    g = torch.Generator().manual_seed(1)
    mu, logvar = 0.7 * torch.randn(2, 6, generator=g, dtype=torch.float64), \
        0.5 * torch.randn(2, 6, generator=g, dtype=torch.float64)
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(200_000, 2, 6, generator=g, dtype=torch.float64)
    log_q = Normal(mu, std).log_prob(z).sum(-1)
    log_p = Normal(0.0, 1.0).log_prob(z).sum(-1)
    mc = (log_q - log_p).mean(0)
    se = (log_q - log_p).std(0) / math.sqrt(z.shape[0])
    exact = kl_divergence(mu, logvar)
    assert ((mc - exact).abs() < 5 * se + 1e-6).all()


def test_logvar_clamped() -> None:
    enc = ResNetEncoder(tiny(False))
    d = 16
    with torch.no_grad():
        enc.head.weight.zero_()
        enc.head.bias[:d] = 3.0
        enc.head.bias[d:d + 8] = 50.0
        enc.head.bias[d + 8:] = -80.0
    mu, logvar = enc(torch.randn(2, 1, 32, 32))
    assert torch.allclose(mu, torch.full_like(mu, 3.0))
    assert (logvar[:, :8] == LOGVAR_MAX).all() and (logvar[:, 8:] == LOGVAR_MIN).all()


def test_imagenet_weights_into_resnet50_encoder(tmp_path) -> None:
    torch.manual_seed(3)
    ref = backbones.resnet50()
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(ref.state_dict(), path)
    enc = ResNetEncoder(VAEConfig(conditional=True, latent_dim=16, crop_size=32, decoder_channels=2,
                              attention_resolution=None))
    head_before = enc.head.weight.detach().clone()
    assert enc.load_imagenet_weights(path)
    w = enc.backbone.conv1.weight
    assert w.shape == (64, 2, 7, 7)
    torch.testing.assert_close(w, ref.conv1.weight.sum(1, keepdim=True).repeat(1, 2, 1, 1) / 2)
    for key in ("layer1.0.conv1.weight", "layer4.2.bn3.running_var", "bn1.bias"):
        assert torch.equal(enc.backbone.state_dict()[key], ref.state_dict()[key])
    assert torch.equal(enc.head.weight, head_before)
    # grey input duplicated to [x, ŷ] sees exactly the pretrained RGB conv of (g, g, g)
    g = torch.randn(1, 1, 32, 32)
    torch.testing.assert_close(enc.backbone.conv1(g.repeat(1, 2, 1, 1)), ref.conv1(g.repeat(1, 3, 1, 1)),
                               rtol=1e-4, atol=1e-4)
    # unconditional: 1 channel; conv1_init="random" keeps the fresh conv; None loads nothing
    enc1 = ResNetEncoder(VAEConfig(conditional=False, latent_dim=16, crop_size=32, decoder_channels=2,
                                   attention_resolution=None,
                                   conv1_init="random"))
    before = enc1.backbone.conv1.weight.detach().clone()
    assert enc1.load_imagenet_weights(path)
    assert enc1.backbone.conv1.weight.shape == (64, 1, 7, 7)
    assert torch.equal(enc1.backbone.conv1.weight, before)
    assert torch.equal(enc1.backbone.layer2[0].conv2.weight, ref.layer2[0].conv2.weight)
    assert enc1.load_imagenet_weights(None) is False
    with pytest.raises(FileNotFoundError):
        enc1.load_imagenet_weights(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="resnet50"):
        ResNetEncoder(tiny()).load_imagenet_weights(path)
    mu, logvar = enc(torch.randn(2, 1, 32, 32).repeat(1, 2, 1, 1))
    assert mu.shape == (2, 16) and torch.isfinite(logvar).all()


def test_adapt_rgb_conv() -> None:
    w = torch.randn(8, 3, 3, 3)
    assert torch.allclose(adapt_rgb_conv(w, 1), w.sum(1, keepdim=True))
    assert adapt_rgb_conv(w, 2).shape == (8, 2, 3, 3)
    with pytest.raises(ValueError):
        adapt_rgb_conv(torch.randn(8, 2, 3, 3), 2)


# ---------------------------------------------------------------- critic and gradient penalty
class _LinearCritic(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        w = torch.randn(*shape)
        self.w = nn.Parameter(w / w.norm())

    def forward(self, image: torch.Tensor, y_hat: torch.Tensor | None = None) -> torch.Tensor:
        return (image * self.w).flatten(1).sum(1)


def test_gradient_penalty_zero_for_unit_lipschitz_linear_critic() -> None:
    torch.manual_seed(0)
    critic = _LinearCritic((1, 8, 8))
    real, fake = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    gp = gradient_penalty(critic, real, fake, torch.randn(4, 1, 8, 8))
    assert gp.item() == pytest.approx(0.0, abs=1e-9)
    with torch.no_grad():
        critic.w.mul_(3.0)  # gradient norm 3 -> lam * (3 - 1)^2
    assert gradient_penalty(critic, real, fake, None, lam=10.0).item() == pytest.approx(40.0, rel=1e-5)


def test_gradient_penalty_real_critic_positive_and_differentiable() -> None:
    torch.manual_seed(0)
    critic = Critic(conditional=True, crop_size=32, width=8, max_width=32)
    real, fake = images(4, 32)
    y = torch.randn(4, 1, 32, 32)
    gp = gradient_penalty(critic, real, fake.requires_grad_(True), y)
    assert torch.isfinite(gp) and gp.item() > 0
    gp.backward()
    grads = [p.grad for p in critic.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert fake.grad is None  # real/fake are detached inside
    gp_img = gradient_penalty(critic, real, fake.detach(), y, include_cond=False)
    assert torch.isfinite(gp_img)
    terms = critic_loss_terms(critic, real, fake, y)
    torch.testing.assert_close(terms["total"], terms["wasserstein"] + terms["gp"])


# ---------------------------------------------------------------- losses
def test_vae_loss_terms_weights_and_reduction() -> None:
    torch.manual_seed(0)
    cfg = tiny(True, 32)
    vae, critic = ConditionalVAE(cfg), Critic.from_config(cfg)
    x, y = images(3, 32)
    x_rec, mu, logvar = vae(x, y)
    perceptual = lambda a, b: (a - b).pow(2).mean()  # noqa: E731 - stand-in for VGG
    w = {"l1": 0.5, "kl": 2.0, "perceptual": 3.0, "adversarial": 0.25}
    t = vae_loss_terms(x, x_rec, mu, logvar, y_hat=y, critic=critic, perceptual=perceptual, weights=w)
    torch.testing.assert_close(t["l1"], (x_rec - x).abs().mean() * 128 * 128)
    torch.testing.assert_close(t["kl"], kl_divergence(mu, logvar).mean())
    torch.testing.assert_close(t["adversarial"], -critic(x_rec, y).mean())
    torch.testing.assert_close(t["total"], 0.5 * t["l1"] + 2 * t["kl"] + 3 * t["perceptual"] + 0.25 * t["adversarial"])
    t["total"].backward()
    assert vae.encoder.head.weight.grad is not None and vae.decoder.out_conv.weight.grad is not None
    # "sum": literal pixel sum per sample (authors); equals scaled_mean at 128x128 only
    s = vae_loss_terms(x, x_rec.detach(), mu.detach(), logvar.detach(), weights={"l1_reduction": "sum"})
    torch.testing.assert_close(s["l1"], (x_rec.detach() - x).abs().sum() / 3)
    big = torch.randn(2, 1, 128, 128)
    a = vae_loss_terms(big, torch.zeros_like(big), mu[:2].detach(), logvar[:2].detach())
    b = vae_loss_terms(big, torch.zeros_like(big), mu[:2].detach(), logvar[:2].detach(),
                       weights=VAELossWeights(l1_reduction="sum"))
    torch.testing.assert_close(a["l1"], b["l1"])
    assert a["perceptual"].item() == 0 and a["adversarial"].item() == 0
    with pytest.raises(ValueError, match="unknown"):
        vae_loss_terms(x, x_rec, mu, logvar, weights={"l2": 1.0})
    d = VAELossWeights()
    assert (d.l1, d.kl, d.perceptual, d.adversarial) == pytest.approx((0.0011852, 0.57504, 0.12102, 1.0), rel=1e-4)


# ---------------------------------------------------------------- analysis helpers
def test_active_dimensions() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 500, 12
    mu = 1e-3 * torch.randn(n, d, generator=g)
    mu[:, [1, 4, 7, 8, 10]] += torch.randn(n, 5, generator=g)  # 5 varying dims
    mu[:, 2] += 5.0  # constant offset: not active
    assert active_dimensions(mu) == 5
    assert active_dimensions(mu, threshold=10.0) == 0
    with pytest.raises(ValueError):
        active_dimensions(torch.randn(1, 3))


def test_count_parameters() -> None:
    vae = ConditionalVAE(tiny())
    c = count_parameters(vae)
    assert set(c) == {"encoder", "decoder", "total"} and c["encoder"] + c["decoder"] == c["total"]
    assert c["total"] == sum(p.numel() for p in vae.parameters())


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        VAEConfig(crop_size=48)
    with pytest.raises(ValueError):
        VAEConfig(attention_resolution=24)
    with pytest.raises(ValueError):
        VAEConfig(latent_dim=3)
    with pytest.raises(ValueError):
        VAEConfig(encoder="resnet18")  # type: ignore[arg-type]
    small = VAEConfig.small()
    assert small.crop_size == 64 and small.encoder == "resnet-small"
