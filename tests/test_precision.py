"""Mixed precision (invariscope.precision) on the CPU: bf16 autocast gives the first training step
of every stage within a stated tolerance of float32, and what must stay float32 does."""

from __future__ import annotations

import pytest
import torch
from _denoise_data import small_denoisers, smooth_noisy_dataset
from conftest import TINY_PIPELINE, TINY_SPATIAL

from invariscope.config.params import ParamsError, load_params
from invariscope.models.denoisers import WGANVGGCritic
from invariscope.models.spatial import ConvolutionalINN
from invariscope.models.vae import gradient_penalty, kl_divergence
from invariscope.precision import Float32Sequential, Precision
from invariscope.stages import cinn_training, denoiser_training, vae_training
from invariscope.stages.denoiser_training import gradient_penalty as denoiser_gp

pytestmark = pytest.mark.usefixtures("one_thread")

#: Relative tolerance of a first-step loss in bf16 against float32 (bfloat16 keeps 8 significant
#: bits, a relative rounding of 2**-9 per operation).
TOLERANCE = 0.03
#: Terms computed in float32 from a bf16 network's output that square a small difference: the
#: KL (near log σ² = 0 its terms exp(l) - 1 - l ≈ l²/2) and the WGAN-GP (λ (‖∇D‖ - 1)², at fakes
#: of the bf16 VAE) double the relative rounding of what they square.
SQUARED_TOLERANCE = 0.10

_DENOISERS = small_denoisers(iterations=1, batch_size=2)
_SPATIAL = {**TINY_SPATIAL, "vae.crop_size": 32, "vae.spatial.iterations": 1, "vae.spatial.batch_size": 4,
            "cinn.iterations": 1, "cinn.checkpoint_every": 1, "cinn.validate_every": 1}
#: The global VAE at 64² crops and a batch of 8: at 32² and 2 its ResNet's last BatchNorm
#: normalizes 8 values, which turns bf16 rounding into a 40 % change of the encoder's output.
_GLOBAL = {**TINY_PIPELINE, "vae.crop_size": 64, "vae.batch_size": 8}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return smooth_noisy_dataset(tmp_path_factory.mktemp("toy") / "ds")


def _first_logs(path):
    return torch.load(path / "last.pt", weights_only=False)["history"][0]


def _compare(fp32, bf16, keys, rel=TOLERANCE):
    for k in keys:
        assert bf16[k] == pytest.approx(fp32[k], rel=rel, abs=1e-4), (k, fp32[k], bf16[k])


@pytest.mark.parametrize("name, keys", [("cnn10", ["mse"]), ("redcnn", ["mse"]),
                                        ("wganvgg", ["d", "gp", "g_adv", "g_perc"]),
                                        ("dugan", ["g", "pix", "grad", "d_img", "d_grad"])])
def test_first_denoiser_step_in_bf16_matches_fp32(toy, tmp_path, name, keys):
    logs = {}
    for prec in ("fp32", "bf16"):
        params = load_params("smoke", {**_DENOISERS, "precision": prec})
        denoiser_training.train_denoiser(name, params, toy, tmp_path / prec, progress=False)
        logs[prec] = _first_logs(tmp_path / prec / name)
    _compare(logs["fp32"], logs["bf16"], keys)


def test_first_vae_and_cinn_steps_in_bf16_match_fp32(toy, tmp_path):
    """The spatial cVAE (ELBO), the global unconditional VAE (adversarial, perceptual, free-bits
    KL) and the convolutional cINN (NLL on the same cVAE)."""
    logs = {}
    for prec in ("fp32", "bf16"):
        root = tmp_path / prec
        spatial = load_params("smoke", {**_SPATIAL, "precision": prec})
        vae_training.train_vae("gaussri", spatial, toy, root / "vae", progress=False)
        cinn_training.train_cinn("gaussri", spatial, toy, root / "cinn", progress=False,
                                 vae_dir=tmp_path / "fp32" / "vae", denoiser_dir=root / "den")
        vae_training.train_vae("unconditional", load_params("smoke", {**_GLOBAL, "precision": prec}),
                               toy, root / "vae", progress=False)
        logs[prec] = {"vae": _first_logs(root / "vae" / "gaussri"),
                      "global": _first_logs(root / "vae" / "unconditional"),
                      "cinn": _first_logs(root / "cinn" / "gaussri")}
    _compare(logs["fp32"]["vae"], logs["bf16"]["vae"], ["loss", "rec", "kl"])
    # (not d_w, the critic's mean D(fake) - mean D(real): a difference of nearly equal numbers)
    _compare(logs["fp32"]["global"], logs["bf16"]["global"], ["loss", "l1"])
    _compare(logs["fp32"]["global"], logs["bf16"]["global"], ["kl", "gp"], rel=SQUARED_TOLERANCE)
    _compare(logs["fp32"]["cinn"], logs["bf16"]["cinn"], ["nll"])


def test_cinn_log_determinant_and_nll_stay_float32_under_autocast():
    torch.manual_seed(0)
    model = ConvolutionalINN((4, 8, 8), downsample=4, n_blocks=2, subnet_width=8, cond_width=8,
                             cond_channels=4)
    for m in model.modules():  # nonzero couplings (each subnet's last layer starts at 0)
        if isinstance(m, Float32Sequential):
            for p in m.parameters():
                p.data.add_(0.05 * torch.randn_like(p))
    z, y_hat = torch.randn(3, 4, 8, 8), torch.randn(3, 1, 32, 32)
    v32, ld32 = model(z, y_hat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v16, ld16 = model(z, y_hat)
        nll = model.nll_loss(z, y_hat)
        back = model.inverse(v16, y_hat)
    assert v16.dtype == ld16.dtype == nll.dtype == torch.float32
    torch.testing.assert_close(ld16, ld32, rtol=0.02, atol=0.05)
    torch.testing.assert_close(v16, v32, rtol=0.02, atol=0.02)
    torch.testing.assert_close(back.float(), z, rtol=0.05, atol=0.05)  # still invertible


@pytest.mark.parametrize("which", ["vae", "denoiser"])
def test_gradient_penalties_are_computed_in_float32(which):
    """The critic's forward and double backward of the WGAN-GP ignore an enclosing autocast: the
    value and its gradients are those of float32, bit for bit."""
    torch.manual_seed(0)
    critic = WGANVGGCritic(patch_size=32)
    real, fake = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    gp = (lambda: gradient_penalty(critic, real, fake)) if which == "vae" else \
        (lambda: denoiser_gp(critic, real, fake))

    def run(autocast):
        critic.zero_grad()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = gp()
        value.backward()
        return value.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                for p in critic.parameters()]

    (v32, g32), (v16, g16) = run(False), run(True)
    assert v16.dtype == torch.float32 and torch.equal(v16, v32)
    assert all(torch.equal(a, b) for a, b in zip(g32, g16))


def test_kl_is_float32_for_half_inputs():
    mu, logvar = torch.randn(4, 8), torch.randn(4, 8)
    ref = kl_divergence(mu, logvar)
    half = kl_divergence(mu.bfloat16(), logvar.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, rtol=0.02, atol=0.02)


def test_precision_setting_is_validated_and_left_out_of_fp32_dumps():
    assert "precision" not in load_params("smoke").model_dump(mode="json")  # stamps of fp32 runs unchanged
    assert load_params("smoke", {"precision": "bf16"}).model_dump(mode="json")["precision"] == "bf16"
    with pytest.raises(ParamsError, match=r"precision: .*'fp32', 'bf16' or 'fp16'"):
        load_params("smoke", {"precision": "half"})
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        Precision("tf32")
    assert not Precision("fp32").enabled and Precision("bf16").register({"a": None}) == {"a": None}


def test_first_embedding_step_in_bf16_matches_fp32(tmp_path):
    """The DML embedding: the triplet loss of the first step (same semi-hard triplets mined)."""
    import numpy as np

    from invariscope.config.params import EmbeddingParams
    from invariscope.data.loader import Normalizer
    from invariscope.stages import embedding as emb

    rng = np.random.default_rng(0)
    x = rng.normal(-500, 300, (16, 32, 32)).astype(np.float32)
    data = emb.EmbeddingData(x, (x[:, None] + rng.normal(0, 200, (16, 4, 32, 32))).astype(np.float16))
    cfg = EmbeddingParams(backbone="resnet-small", width=8, embed_dim=8, margin=0.2, n_train_crops=16,
                          n_invariances=4, crops_per_batch=16, invariances_per_crop=4, lr=1e-3,
                          iterations=1, checkpoint_every=1, validate_every=1, n_val_crops=16, seed=0)
    logs = {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = emb.Embedder("resnet-small", 8, width=8)
        emb.fit_embedding(model, data, None, cfg, Normalizer(-500.0, 300.0), tmp_path / prec, "toy",
                          progress=False, precision=prec)
        logs[prec] = _first_logs(tmp_path / prec)
    _compare(logs["fp32"], logs["bf16"], ["loss"])
