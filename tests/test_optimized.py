"""Invariances by optimization and natural ones (talk 003): distances against reference
implementations, the optimization against known null spaces, resume, caching, the generator, the
comparison's measures and controls, and the params and plan of the new stages."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import structural_similarity
from torch import nn

from invariscope.config.params import ParamsError, load_params
from invariscope.evaluation import distances as D
from invariscope.models.backbones import VGGPerceptualLoss
from invariscope.models.denoisers import GaussRI
from invariscope.models.natural import NaturalGenerator, PatchCritic
from invariscope.stages import methods, optimized
from invariscope.stages.invariances import region_masks

pytestmark = pytest.mark.usefixtures("one_thread")


class Masked(nn.Module):
    """A linear denoiser with a known null space: it zeros the centred ``square`` (and keeps
    every other pixel), so changes inside the square are invisible and nothing else is."""

    def __init__(self, size: int, square: int) -> None:
        super().__init__()
        inside = torch.zeros(1, 1, size, size)
        a = (size - square) // 2
        inside[..., a:a + square, a:a + square] = 1.0
        self.register_buffer("keep", 1.0 - inside)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep


def _images(n=3, size=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.stack([torch.cos(3 * (k + 1) * xx) * torch.sin(2 * yy) for k in range(n)])[:, None]
    return (base + 0.2 * torch.randn(n, 1, size, size, generator=g)).to(dtype)


# --------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,data_range", [((36, 36), 3.0), ((40, 29), 1.0), ((7, 7), 2.5)])
def test_ssim_equals_scikit_image(shape, data_range):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 1, *shape, generator=g, dtype=torch.float64)
    b = a + 0.5 * torch.randn(4, 1, *shape, generator=g, dtype=torch.float64)
    ours = D.ssim(a, b, data_range).numpy()
    ref = [structural_similarity(a[i, 0].numpy(), b[i, 0].numpy(), data_range=data_range)
           for i in range(4)]
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)
    diss = D.ssim_dissimilarity(a, b, data_range)
    assert torch.all((diss >= 0) & (diss <= 1))
    assert torch.allclose(D.ssim_dissimilarity(a, a, data_range), torch.zeros(4, dtype=torch.float64))


def test_mse_and_vgg_distances_are_per_image():
    a, b = _images(3), _images(3, seed=5)
    np.testing.assert_allclose(D.mse(a, b).numpy(), ((a - b) ** 2).mean(dim=(1, 2, 3)).numpy(), rtol=1e-6)
    vgg = D.VGGDistance(["relu1_2", "relu2_2"])
    per = vgg(a, b)
    assert per.shape == (3,) and not vgg.pretrained
    for i in range(3):  # the per-image values are the perceptual loss of each pair, layers averaged
        ref = VGGPerceptualLoss(["relu1_2", "relu2_2"], kind="vgg16")(a[i:i + 1], b[i:i + 1]) / 2
        assert per[i].item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(vgg(a, a), torch.zeros(3))
    with pytest.raises(ValueError, match="allowed: mse, ssim, vgg"):
        D.distance("l1")
    with pytest.raises(ValueError, match="VGGDistance"):
        D.distance("vgg")


# --------------------------------------------------------------------------------------
# The optimization
# --------------------------------------------------------------------------------------
def _optimize(f, x, tmp_path, dist=D.mse, iterations=60, **kw):
    args = dict(alpha=1e-3, bound=1.0, init_sd=0.01, iterations=iterations, lr=1e-2, restarts=1,
                seed=0, ckpt_dir=tmp_path / "ckpt", fingerprint="test", checkpoint_every=10,
                progress=False) | kw
    return optimized.optimize_inputs(f, x, dist, **args)


def test_the_optimization_lowers_its_objective(tmp_path):
    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))
    x = _images(2, 24)
    x_inv, history = _optimize(f, x, tmp_path, iterations=40, restarts=2)
    assert x_inv.shape == (4, 1, 24, 24)
    j = [h["objective"] for h in history]
    assert j[-1] < j[0]
    with torch.no_grad():
        start = optimized.initial_inputs(x, 2, 0.01, 0)
        rep = x.repeat_interleave(2, 0)
        j0, _, _ = optimized.objective(f, rep, f(rep), start, D.mse, 1e-3, 1.0)
        j1, _, _ = optimized.objective(f, rep, f(rep), x_inv, D.mse, 1e-3, 1.0)
    assert torch.all(j1 < j0), "every crop and restart lowers its own objective"
    assert all(p.requires_grad for p in f.parameters()), "the denoiser's flags are restored"


@pytest.mark.parametrize("name", ["mse", "ssim"])
def test_a_linear_denoiser_with_a_known_null_space_gives_invariances_inside_it(tmp_path, name):
    size, square = 32, 12
    f = Masked(size, square)
    x = _images(2, size)
    dist = D.distance(name, data_range=3.0)
    x_inv, _ = _optimize(f, x, tmp_path, dist=dist, iterations=150, lr=1e-2)
    change = (x_inv - x).abs()[:, 0]
    inside = f.keep[0, 0] == 0
    assert change[:, inside].mean() > 0.5, "the input changes where f is blind"
    assert change[:, ~inside].mean() < 0.02 * change[:, inside].mean()
    with torch.no_grad():
        out = (f(x_inv) - f(x)).abs().mean()
    assert out < 0.01 * change.mean(), "the output stays (the null space is f's)"


def test_gauss_ri_invariances_change_its_square(tmp_path):
    f = GaussRI()
    x = _images(2, 64)
    x_inv, _ = _optimize(f, x, tmp_path, iterations=150, lr=1e-3)
    from scipy.ndimage import gaussian_filter

    d = np.abs(gaussian_filter((x_inv - x)[:, 0].numpy(), (0, 1, 1)))
    inside, outside = region_masks(64)
    assert d[:, inside].mean() > 10 * d[:, outside].mean()


def test_resume_gives_the_uninterrupted_result(tmp_path):
    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 1, 3, padding=1))
    x = _images(2, 20)
    straight, _ = _optimize(f, x, tmp_path / "a", iterations=30)
    _optimize(f, x, tmp_path / "b", iterations=10)  # "interrupted" after its checkpoint at 10
    resumed, _ = _optimize(f, x, tmp_path / "b", iterations=30)
    assert torch.equal(straight, resumed)
    from invariscope.stages.training import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        _optimize(f, x, tmp_path / "b", iterations=30, fingerprint="other settings")


def test_starting_points_do_not_depend_on_the_batching():
    x = _images(3, 16)
    whole = optimized.initial_inputs(x, 2, 0.1, seed=7)
    part = optimized.initial_inputs(x[1:], 2, 0.1, seed=7, first=1)
    assert torch.equal(whole[2:], part)
    assert not torch.equal(whole[0], whole[1]), "restarts differ"
    assert (whole[0] - x[0]).std().item() == pytest.approx(0.1, rel=0.1)


def test_stored_sets_are_reused_and_redone_when_settings_change(small_dataset, tmp_path):
    from invariscope.data.loader import fixed_crops

    crops = fixed_crops(small_dataset, "test", 32, 3, 0)
    f = GaussRI()
    kw = dict(alpha=1e-3, bound=1.0, init_sd=0.01, iterations=6, lr=1e-3, restarts=2, seed=0,
              batch_crops=2, checkpoint_every=3, progress=False, mode="opt_mse")
    path = tmp_path / "gaussri_opt_mse.npz"
    a = optimized.optimized_invariances(path, f, small_dataset, crops, 32, D.mse, **kw)
    assert a["x_tilde"].shape == (3, 2, 32, 32) and a["f_x_tilde"].shape == (3, 2, 32, 32)
    assert a["crops"].tolist() == [list(c) for c in crops]
    assert a["history_objective"].shape == (2, 2)  # two batches of crops, logged at steps 3 and 6
    assert not path.with_name("gaussri_opt_mse.work").exists()
    stamp = path.stat().st_mtime_ns
    b = optimized.optimized_invariances(path, f, small_dataset, crops, 32, D.mse, **kw)
    assert path.stat().st_mtime_ns == stamp and np.array_equal(a["x_tilde"], b["x_tilde"])
    c = optimized.optimized_invariances(path, f, small_dataset, crops, 32, D.mse, **(kw | {"lr": 1e-2}))
    assert str(c["key"]) != str(a["key"])


# --------------------------------------------------------------------------------------
# Natural invariances
# --------------------------------------------------------------------------------------
def test_generator_and_critic_shapes():
    gen, critic = NaturalGenerator(width=4, noise_channels=2), PatchCritic(width=4)
    x = _images(2, 32)
    z = gen.noise(x, torch.Generator().manual_seed(0))
    out = gen(x, z)
    assert out.shape == x.shape and z.shape == (2, 2, 32, 32)
    assert 0 < (out - x).abs().mean() < 0.5, "a small perturbation at the start"
    assert torch.equal(gen(x, z), out), "deterministic given z"
    assert critic(x).shape == (2, 1) and critic(_images(2, 48)).shape == (2, 1)
    with pytest.raises(ValueError, match="even H and W"):
        gen(_images(1, 31))


def test_natural_training_lowers_the_objective_and_resumes(small_dataset, tmp_path):
    from invariscope.stages import natural

    over = {"natural.iterations": 8, "natural.batch_size": 2, "natural.patch_size": 32,
            "natural.width": 4, "natural.critic_width": 4, "natural.n_val_crops": 2,
            "natural.checkpoint_every": 4, "natural.validate_every": 4, "natural.lr": 1e-2,
            "natural.alpha": 1.0}
    params = load_params("smoke", over)
    f = Masked(32, 12)
    a = natural.train_natural("masked", f, params, small_dataset, tmp_path / "nat", progress=False)
    vals = [h["val"] for h in a.history if "val" in h]
    assert len(vals) == 2 and a.best_step in (4, 8)
    again = natural.train_natural("masked", f, params, small_dataset, tmp_path / "nat", progress=False)
    assert again.identity == a.identity  # finished: nothing retrained
    crops = [(0, 0, 0), (1, 8, 8)]
    res = natural.sample_natural(tmp_path / "nat.npz", a.generator, f, small_dataset, crops, 32, 3, 0,
                                 models=a.identity)
    assert res["x_tilde"].shape == (2, 3, 32, 32) and str(res["mode"]) == "natural"
    assert not np.array_equal(res["x_tilde"][0, 0], res["x_tilde"][0, 1]), "draws of z differ"


# --------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------
def _set(diff, size=64, n=2, m=3, out_scale=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(-500, 50, (n, size, size))
    xt = x[:, None] + diff[None, None]
    y_hat = x.copy()
    return {"x": x, "y": x, "y_hat": y_hat, "x_tilde": np.broadcast_to(xt, (n, m, size, size)),
            "f_x_tilde": np.broadcast_to(y_hat[:, None] + out_scale * diff, (n, m, size, size)),
            "crops": np.zeros((n, 3), dtype=np.int64)}


def test_change_measures_of_known_changes():
    size = 64
    inside, outside = region_masks(size)
    bump = np.zeros((size, size))
    bump[inside] = 40.0
    m = methods.change_measures(_set(bump, out_scale=0.005))
    assert m["input_change_hu"] == pytest.approx(40.0 * inside.mean())
    assert m["output_change_hu"] == pytest.approx(0.005 * m["input_change_hu"])
    assert m["change_ratio_smoothed"] > 100
    checker = 20.0 * (-1.0) ** np.add.outer(np.arange(size), np.arange(size))
    c = methods.change_measures(_set(checker))
    assert c["hf_share"] == pytest.approx(1.0)  # all power at Nyquist
    white = np.random.default_rng(3).normal(0, 10, (size, size))
    assert methods.change_measures(_set(white))["hf_share"] == pytest.approx(1 - math.pi / 16, abs=0.03)
    small = methods.change_measures(_set(np.ones((32, 32)), size=32))
    assert math.isnan(small["change_ratio_smoothed"])


def test_controls_of_the_optimized_rows():
    table = pd.DataFrame([
        ("gaussri", "cinn", 10.0, 5.0, 1.0, 0.5, 0.9),
        ("gaussri", "opt_mse", 40.0, 0.1, 50.0, 0.8, 0.9),
        ("gaussri", "opt_ssim", 40.0, 1.0, 50.0, 0.8, 0.9),
        ("cnn10", "opt_mse", 40.0, 3.0, 1.0, 0.8, 0.9),
        ("cnn10", "opt_vgg", 40.0, 5.0, 1.0, 0.8, 0.9),
    ], columns=methods.COLUMNS)
    c = methods.check_controls(table)
    got = {(r.denoiser, r.method, r.check): r.holds for r in c.itertuples()}
    assert got == {("gaussri", "opt_mse", "change_ratio_smoothed"): True,
                   ("gaussri", "opt_mse", "output / input change"): True,
                   ("gaussri", "opt_ssim", "change_ratio_smoothed"): True,
                   ("gaussri", "opt_ssim", "output / input change"): False,
                   ("cnn10", "opt_mse", "output / input change"): True,
                   ("cnn10", "opt_vgg", "output / input change"): False}


# --------------------------------------------------------------------------------------
# Params and plan
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,match", [
    ({"optimized.denoisers": ["cnn10", "mine"]}, "optimized.denoisers mine: unknown"),
    ({"optimized.n_crops": 999}, "must be <= invariances.n_crops"),
    ({"optimized.alpha.vgg": -1.0}, "alpha values must be > 0"),
    ({"optimized.distances": ["mse", "l2"]}, "optimized.distances"),
    ({"optimized": None}, "natural needs an optimized section"),
])
def test_params_errors_name_the_key(override, match):
    with pytest.raises(ParamsError, match=match):
        load_params("smoke", override)


def test_the_new_stages_run_for_the_listed_denoisers_only():
    from invariscope import pipeline

    params = load_params("smoke")
    methods_ = list(params.denoisers.methods)
    jobs = pipeline.plan("smoke", None, None, None, methods_, True, pipeline.subsets(params))
    assert [j.denoiser for j in jobs if j.stage.name == "optimized"] == ["cnn10", "wganvgg", "gaussri"]
    assert [j.label for j in jobs if j.stage.name == "methods"] == ["methods"]
    fewer = load_params("smoke", {"denoisers.methods": ["gaussri", "redcnn"],
                                  "analysis.reference": "redcnn"})
    jobs = pipeline.plan("smoke", None, None, None, ["gaussri", "redcnn"], True, pipeline.subsets(fewer))
    assert [j.denoiser for j in jobs if j.stage.name == "optimized"] == ["gaussri"]
    without = load_params("smoke", {"optimized": None, "natural": None})
    jobs = pipeline.plan("smoke", None, None, None, methods_, True, pipeline.subsets(without))
    assert not [j for j in jobs if j.stage.name in ("optimized", "methods")]
    # a retuned optimization reruns these stages only
    dump = params.model_dump(mode="json")
    full = pipeline.plan("smoke", None, None, None, methods_, True, pipeline.subsets(params))
    base = pipeline.stamps(full, dump)
    other = pipeline.stamps(full, load_params("smoke", {"optimized.lr": 1e-2}).model_dump(mode="json"))
    assert {k for k in base if base[k] != other[k]} == {
        "optimized[cnn10]", "optimized[wganvgg]", "optimized[gaussri]", "methods"}


def test_every_distance_needs_its_alpha():
    from invariscope.config.params import OptimizedParams

    base = load_params("smoke").optimized.model_dump()
    with pytest.raises(ValueError, match="alpha has no value for ssim, vgg"):
        OptimizedParams(**(base | {"alpha": {"mse": 1e-3}}))
    assert OptimizedParams(**(base | {"distances": ("mse",), "alpha": {"mse": 1e-3}})).distances == ("mse",)
