"""VAE training: checkpoints, exact resume, foreign checkpoints, NaN guard, the reconstruction
report, the GaussRI cVAE end to end, the denoiser checkpoint in the fingerprint, Figure 4."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from conftest import TINY_PIPELINE, TINY_SPATIAL, make_dataset

from invariscope import figures, handoffs, pipeline, provenance
from invariscope.config.params import load_params
from invariscope.evaluation.denoising import pick_examples
from invariscope.models.denoisers import build_denoiser
from invariscope.models.vae import kl_divergence
from invariscope.names import vae_name
from invariscope.stages import vae_training as vt
from invariscope.stages.training import CheckpointMismatchError, NonFiniteLossError, save_checkpoint

# The smoke vae section with the global design, shrunk further: 32x32 crops, batch 2, a handful
# of steps.
_SMALL = {
    **{k: v for k, v in TINY_PIPELINE.items() if k.startswith(("cinn.", "vae.latent", "vae.spatial",
                                                                "layerwise"))},
    "vae.latent_dim": 8,
    "vae.z_chunk": 2,
    "vae.encoder_width": 4,
    "vae.decoder_channels": 4,
    "vae.z_embed_classes": 8,
    "vae.z_embed_dim": 4,
    "vae.critic_width": 4,
    "vae.critic_max_width": 16,
    "vae.crop_size": 32,
    "vae.attention_resolution": 16,
    "vae.batch_size": 2,
    "vae.iterations": 4,
    "vae.checkpoint_every": 2,
    "vae.validate_every": 2,
    "vae.n_val_crops": 3,
    "vae.n_test_crops": 4,
    "vae.vgg16_weights": None,
}


def _params(**overrides):
    return load_params("smoke", overrides={**_SMALL, **overrides})


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("vae") / "ds", size=64)


def _state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["step"], ckpt["modules"]


def _assert_same_modules(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}.{k} differs"


def test_unconditional_trains_writes_checkpoints_and_reports(ds, tmp_path):
    params = _params()
    res = vt.train_vae(None, params, ds, tmp_path, progress=False)
    folder = tmp_path / "unconditional"
    assert (folder / "last.pt").is_file() and (folder / "best.pt").is_file()
    assert res.name == "unconditional" and res.denoiser is None and res.steps == 4
    assert res.best_step in (2, 4) and np.isfinite(res.best_val_mae_hu) and res.best_val_mae_hu > 0
    assert not res.model.training and res.vgg_pretrained is False
    assert all(torch.isfinite(p).all() for p in res.model.parameters())

    report = vt.reconstruction_report(res.model, None, ds, params)
    assert set(report) == set(vt.REPORT_COLUMNS)
    assert report["vae"] == "unconditional" and report["latent_dims"] == 8
    assert isinstance(report["active_dims"], int) and 0 <= report["active_dims"] <= 8
    for key in ("mae_hu", "ssim", "kl_nats"):
        assert isinstance(report[key], float) and np.isfinite(report[key])
    assert report["mae_hu"] > 0 and -1 <= report["ssim"] <= 1 and report["kl_nats"] >= 0
    handoffs.write_vae_report(report, tmp_path)
    assert handoffs.read_vae_report(None, tmp_path) == report
    table = vt.reconstruction_table([report])
    assert list(table.columns) == list(vt.REPORT_COLUMNS) and len(table) == 1

    # a finished run is reused (no step taken), and load_vae gives the best checkpoint
    again = vt.train_vae(None, params, ds, tmp_path, progress=False)
    assert again.steps == 4 and again.best_step == res.best_step
    loaded = vt.load_vae(None, params, ds, tmp_path)
    assert not loaded.training
    _assert_same_modules({"m": loaded.state_dict()}, {"m": res.model.state_dict()})
    # a longer finished run cannot be shortened silently
    with pytest.raises(CheckpointMismatchError, match="more than"):
        vt.train_vae(None, _params(**{"vae.iterations": 2}), ds, tmp_path, progress=False)


def test_resume_equals_uninterrupted_run(ds, tmp_path):
    vt.train_vae("gaussri", _params(), ds, tmp_path / "full", progress=False)
    vt.train_vae("gaussri", _params(**{"vae.iterations": 2}), ds, tmp_path / "split", progress=False)
    res = vt.train_vae("gaussri", _params(), ds, tmp_path / "split", progress=False)
    assert res.steps == 4
    step_a, a = _state(tmp_path / "full" / "gaussri" / "last.pt")
    step_b, b = _state(tmp_path / "split" / "gaussri" / "last.pt")
    assert step_a == step_b == 4
    _assert_same_modules(a, b)


def test_checkpoint_of_another_configuration_is_refused(ds, tmp_path):
    vt.train_vae(None, _params(**{"vae.iterations": 2}), ds, tmp_path, progress=False)
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        vt.train_vae(None, _params(**{"vae.lr": 5e-4}), ds, tmp_path, progress=False)
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        vt.load_vae(None, _params(**{"vae.weights.kl": 0.1}), ds, tmp_path)
    # force=True starts over
    res = vt.train_vae(None, _params(**{"vae.lr": 5e-4}), ds, tmp_path, force=True, progress=False)
    assert res.steps == 4


def test_nan_guard_keeps_last_good_checkpoint(ds, tmp_path, monkeypatch):
    class Stream(vt.BatchStream):
        def iterate_from(self, step):
            for s, (x, y) in enumerate(super().iterate_from(step), start=step):
                yield (torch.full_like(x, float("nan")) if s >= 2 else x), y

    monkeypatch.setattr(vt, "BatchStream", Stream)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        vt.train_vae(None, _params(), ds, tmp_path, progress=False)
    step, _ = _state(tmp_path / "unconditional" / "last.pt")
    assert step == 2


def test_gaussri_cvae_end_to_end_and_figure4(ds, tmp_path):
    params = _params()
    cvae = vt.train_vae("gaussri", params, ds, tmp_path, progress=False)
    assert cvae.model.config.conditional and cvae.denoiser is not None
    report = vt.reconstruction_report(cvae.model, cvae.denoiser, ds, params, name="gaussri")
    assert report["vae"] == "gaussri" and set(report) == set(vt.REPORT_COLUMNS)
    with pytest.raises(ValueError, match="denoiser"):
        vt.reconstruction_report(cvae.model, None, ds, params)

    # ŷ reaches the decoder: the reconstruction changes when ŷ does
    x = torch.randn(2, 1, 32, 32)
    z = torch.zeros(2, 8)
    with torch.no_grad():
        a = cvae.model.decode(z, cvae.denoiser(x))
        b = cvae.model.decode(z, cvae.denoiser(x + 1.0))
    assert not torch.allclose(a, b)

    uvae = vt.train_vae(None, params, ds, tmp_path, progress=False)
    examples = pick_examples(ds, crop=16, seed=params.seed)
    crops = figures.figure4_crops(ds, examples, 32)
    for ex, c in zip(examples, crops):
        assert c["low"].shape == c["full"].shape == (32, 32)
        cy, cx = ex["top"] + ex["size"] // 2, ex["left"] + ex["size"] // 2
        assert c["top"] <= cy < c["top"] + 32 and c["left"] <= cx < c["left"] + 32
    fig = figures.figure4(ds, examples, {"cVAE (Gauss+RI)": (cvae.model, cvae.denoiser),
                                    "VAE": (uvae.model, None)})
    assert len(fig.axes) == 4 * len(examples)
    fig.savefig(tmp_path / "figure4.png")


def test_spatial_cvae_trains_and_reports(ds, tmp_path):
    """The spatial design: a pool of ŷ computed once, a checkpoint of another schedule refused,
    both unconditional VAEs, and Figure 4 with VAEs of both designs."""
    params = load_params("smoke", {**TINY_SPATIAL, "vae.crop_size": 32, "vae.spatial.iterations": 4})
    assert vt.is_spatial("gaussri", params) and vt.is_spatial("unconditional_spatial", params)
    assert not vt.is_spatial("unconditional", params)
    assert vt.extra_vaes(params) == ("unconditional", "unconditional_spatial")
    full = vt.train_vae("gaussri", params, ds, tmp_path / "full", progress=False)
    assert full.steps == 4 and full.model.latent_shape == (2, 8, 8)
    half = load_params("smoke", {**TINY_SPATIAL, "vae.crop_size": 32, "vae.spatial.iterations": 4})
    vt.train_vae("gaussri", half.model_copy(update={"vae": half.vae.model_copy(update={
        "spatial": half.vae.spatial.model_copy(update={"iterations": 2})})}), ds, tmp_path / "split",
        progress=False)
    # iterations are part of the spatial fingerprint (the cosine schedule depends on them)
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        vt.train_vae("gaussri", params, ds, tmp_path / "split", progress=False)
    assert len(list((tmp_path / "pools").glob("gaussri_8_*.pt"))) == 1, "the ŷ pool is cached"
    report = vt.reconstruction_report(full.model, full.denoiser, ds, params, name="gaussri")
    assert report["latent_dims"] == 2 * 8 * 8 and 0 <= report["active_dims"] <= 128
    u_sp = vt.train_vae("unconditional_spatial", params, ds, tmp_path / "full", progress=False)
    assert u_sp.denoiser is None and not u_sp.model.config.conditional
    u_gl = vt.train_vae(None, params, ds, tmp_path / "full", progress=False)
    assert u_gl.model.latent_shape == (params.vae.latent_dim,)
    assert isinstance(vt.load_vae("unconditional_spatial", params, ds, tmp_path / "full"),
                      type(u_sp.model))
    examples = pick_examples(ds, crop=16, seed=params.seed)
    fig = figures.figure4(ds, examples, {"cVAE": (full.model, full.denoiser), "sp": (u_sp.model, None),
                                    "gl": (u_gl.model, None)})
    assert len(fig.axes) == 5 * len(examples)


def test_denoiser_checkpoint_is_part_of_the_fingerprint(ds, tmp_path):
    """A cVAE is refused once its denoiser's checkpoint changes (retrained denoiser)."""
    params = _params(**{"vae.iterations": 2})
    den_dir = tmp_path / "denoisers"

    def write_cnn10(seed):
        torch.manual_seed(seed)
        model = build_denoiser("cnn10")
        save_checkpoint(den_dir / "cnn10" / "best.pt", {"model": model}, {},
                        provenance.denoiser_fingerprint("cnn10", params, ds), step=1)

    with pytest.raises(FileNotFoundError):
        vt.train_vae("cnn10", params, ds, tmp_path / "vae", progress=False, denoiser_dir=den_dir)
    write_cnn10(0)
    res = vt.train_vae("cnn10", params, ds, tmp_path / "vae", progress=False, denoiser_dir=den_dir)
    assert res.name == "cnn10" and (tmp_path / "vae" / "cnn10" / "best.pt").is_file()
    vt.load_vae("cnn10", params, ds, tmp_path / "vae", denoiser_dir=den_dir)
    write_cnn10(1)
    with pytest.raises(CheckpointMismatchError):
        vt.load_vae("cnn10", params, ds, tmp_path / "vae", denoiser_dir=den_dir)


def test_mode_seeking_and_identity_init_train(ds, tmp_path):
    """The two CPU options: the cVAE step adds the mode-seeking term (logged as ``ms``) and stays
    finite; off, they leave the params dump (stamps, fingerprints) as it was."""
    off = _params()
    dump = off.model_dump(mode="json")["vae"]
    assert "mode_seeking" not in dump and "decoder_init" not in dump
    on = _params(**{"vae.mode_seeking": 1.0, "vae.decoder_init": "identity"})
    assert on.model_dump(mode="json")["vae"]["mode_seeking"] == 1.0
    assert provenance.vae_fingerprint("gaussri", on, ds) != provenance.vae_fingerprint("gaussri", off, ds)
    res = vt.train_vae("gaussri", on, ds, tmp_path, progress=False)
    logged = [h for h in res.history if "ms" in h]
    assert logged and all(np.isfinite(h["ms"]) and h["ms"] > 0 for h in logged)
    w = res.model.decoder.out_conv.weight
    assert w.shape[1] > 1  # conditional: the ŷ channel exists (its init is tested in test_vae)
    uncond = vt.train_vae(None, on, ds, tmp_path, progress=False)  # no ŷ: no mode-seeking term
    assert not any("ms" in h for h in uncond.history)


def test_free_bits_kl_matches_closed_form():
    mu, logvar = torch.randn(5, 6), torch.randn(5, 6)
    assert torch.allclose(vt.free_bits_kl(mu, logvar, 0.0), kl_divergence(mu, logvar).mean(), atol=1e-5)
    per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(0)
    assert torch.allclose(vt.free_bits_kl(mu, logvar, 0.5), per_dim.clamp(min=0.5).sum())


@pytest.mark.parametrize("profile", ["smoke", "default", "paper"])
def test_profiles_build_their_vae(profile):
    params = load_params(profile)
    cfg = params.vae.config(conditional=True)
    assert cfg.crop_size == params.vae.crop_size and cfg.latent_dim == params.vae.latent_dim
    if profile != "paper":  # the paper's ResNet-50 / BigGAN-128 is tested in test_vae.py
        vae = vt.build_vae(True, params)
        x = torch.randn(2, 1, cfg.crop_size, cfg.crop_size)
        rec, mu, logvar = vae(x, x)
        assert rec.shape == x.shape and mu.shape == logvar.shape == (2, cfg.latent_dim)
    w = params.vae.weights
    assert (w.l1, w.kl, w.perceptual, w.adversarial) == pytest.approx((0.0011852, 0.57504, 0.12102, 1.0),
                                                                      rel=1e-4)


def test_vae_name_and_bad_denoiser():
    assert vae_name(None) == vae_name("unconditional") == "unconditional"
    assert vae_name("RedCNN") == "redcnn"
    with pytest.raises(ValueError, match="unknown denoiser"):
        vae_name("unet")


def test_pipeline_runs_the_vae_stage_unconditionally_and_per_denoiser():
    jobs = [j for j in pipeline.plan("smoke", None, "vae", None, ["cnn10", "gaussri"])]
    assert [j.denoiser for j in jobs] == ["unconditional", "cnn10", "gaussri"]
    assert jobs[0].output_name == "02_vae_unconditional.ipynb"
    names = [s.name for s in pipeline.STAGES]
    assert names.index("table1") < names.index("vae") == names.index("figure4") - 1
