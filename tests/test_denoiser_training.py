"""Denoiser training: every method trains and checkpoints, resumes exactly, stops on NaN,
refuses foreign checkpoints, learns a toy problem; loading and full-slice inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _denoise_data import smooth_noisy_dataset

from invariscope.config.params import load_params
from invariscope.data.loader import Normalizer
from invariscope.models.denoisers import CNN10, GaussRI, WGANVGGGenerator
from invariscope.names import TRAINED_METHODS
from invariscope.stages import denoiser_training as dt
from invariscope.stages.training import CheckpointMismatchError, NonFiniteLossError

# Small and fast: 32x32 crops, tiny batches; DU-GAN with tiny discriminators, CutMix always on.
_SMALL = {
    "denoisers.checkpoint_every": 2,
    "denoisers.validate_every": 2,
    "denoisers.val_slices": 2,
    "denoisers.vgg_weights": None,
    "denoisers.cnn10": {"iterations": 4, "batch_size": 2, "patch_size": 32, "lr": 1e-3},
    "denoisers.redcnn": {"iterations": 2, "batch_size": 2, "patch_size": 32, "lr": 1e-4},
    "denoisers.wganvgg": {"iterations": 2, "batch_size": 2, "patch_size": 32, "lr": 1e-4,
                          "lambda_perceptual": 0.1, "critic_steps": 2},
    "denoisers.dugan": {"iterations": 2, "batch_size": 2, "patch_size": 24, "lr": 1e-4,
                        "lambda_adv": 0.1, "lambda_px_grad": 20.0, "lambda_cutmix": 2.65,
                        "cutmix_prob": 1.0, "cutmix_warmup": 1, "disc_channels": 8,
                        "disc_depth": 3},
}


def _params(**overrides):
    return load_params("smoke", overrides={**_SMALL, **overrides})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return smooth_noisy_dataset(tmp_path_factory.mktemp("toy") / "ds")


class _Interrupted(RuntimeError):
    pass


def _patch_stream(monkeypatch, from_step, action):
    """Make the training batches of steps >= from_step NaN ('nan') or raise ('stop')."""

    class Stream(dt.BatchStream):
        def iterate_from(self, step):
            for s, (x, y) in enumerate(super().iterate_from(step), start=step):
                if s >= from_step:
                    if action == "stop":
                        raise _Interrupted(f"interrupted before step {s}")
                    x = torch.full_like(x, float("nan"))
                yield x, y

    monkeypatch.setattr(dt, "BatchStream", Stream)


@pytest.mark.parametrize("name", TRAINED_METHODS)
def test_each_method_trains_and_writes_checkpoints(name, toy, tmp_path):
    params = _params()
    res = dt.train_denoiser(name, params, toy, tmp_path, progress=False)
    assert (tmp_path / name / "last.pt").is_file() and (tmp_path / name / "best.pt").is_file()
    assert res.steps == getattr(params.denoisers, name).iterations
    assert res.best_step is not None and 10.0 < res.best_val < 60.0  # PSNR (dB): select_by psnr
    assert not res.model.training
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    if name == "wganvgg":
        assert res.vgg_pretrained is False  # vgg_weights: null -> documented fallback


def test_finished_run_is_reused_and_force_retrains(toy, tmp_path):
    params = _params()
    first = dt.train_denoiser("cnn10", params, toy, tmp_path, progress=False)
    again = dt.train_denoiser("cnn10", params, toy, tmp_path, progress=False)
    assert again.best_step == first.best_step and again.best_val == first.best_val
    forced = dt.train_denoiser("cnn10", params, toy, tmp_path, force=True, progress=False)
    assert forced.steps == 4
    for a, b in zip(first.model.parameters(), forced.model.parameters()):
        assert torch.equal(a, b)  # same seed -> same run


def _last(path):
    return torch.load(path / "last.pt", weights_only=False)


def _assert_same_state(a, b):
    """Same step and bit-identical weights of every network (generator and discriminators)."""
    assert a["step"] == b["step"]
    assert a["modules"].keys() == b["modules"].keys()
    for m, state in a["modules"].items():
        for k, v in state.items():
            assert torch.equal(v, b["modules"][m][k]), f"{m}.{k}"


@pytest.mark.parametrize("name", ["cnn10", "dugan"])
def test_resumed_run_equals_straight_run(name, toy, tmp_path, monkeypatch):
    n = 2
    small = {"denoisers.checkpoint_every": 1, "denoisers.val_slices": 1}
    params = _params(**small, **{f"denoisers.{name}.iterations": n})
    dt.train_denoiser(name, params, toy, tmp_path / "a", progress=False)
    straight = _last(tmp_path / "a" / name)
    assert straight["step"] == n

    # (1) half a run, then extended to n steps (iterations is not part of the fingerprint)
    half = _params(**small, **{f"denoisers.{name}.iterations": n // 2})
    dt.train_denoiser(name, half, toy, tmp_path / "b", progress=False)
    dt.train_denoiser(name, params, toy, tmp_path / "b", progress=False)
    _assert_same_state(_last(tmp_path / "b" / name), straight)

    # (2) an interrupted run (killed before step n/2) resumed in a fresh call
    with monkeypatch.context() as m:
        _patch_stream(m, n // 2, "stop")
        with pytest.raises(_Interrupted):
            dt.train_denoiser(name, params, toy, tmp_path / "c", progress=False)
    assert _last(tmp_path / "c" / name)["step"] == n // 2
    dt.train_denoiser(name, params, toy, tmp_path / "c", progress=False)
    _assert_same_state(_last(tmp_path / "c" / name), straight)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(toy, tmp_path, monkeypatch):
    params = _params(**{"denoisers.cnn10.iterations": 6})
    _patch_stream(monkeypatch, 3, "nan")
    with pytest.raises(NonFiniteLossError, match=r"mse became nan at step 3.*last.pt \(step 2\)"):
        dt.train_denoiser("cnn10", params, toy, tmp_path, progress=False)
    ckpt = torch.load(tmp_path / "cnn10" / "last.pt", weights_only=False)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["modules"]["model"].values())
    monkeypatch.undo()  # clean data again: the run resumes from the good checkpoint
    res = dt.train_denoiser("cnn10", params, toy, tmp_path, progress=False)
    assert res.steps == 6 and all(torch.isfinite(p).all() for p in res.model.parameters())


def test_checkpoint_of_other_configuration_is_refused(toy, tmp_path):
    dt.train_denoiser("cnn10", _params(), toy, tmp_path, progress=False)
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        dt.train_denoiser("cnn10", _params(**{"denoisers.cnn10.lr": 5e-4}), toy, tmp_path,
                          progress=False)
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        dt.load_denoiser("cnn10", _params(**{"denoisers.cnn10.lr": 5e-4}), toy, tmp_path)
    with pytest.raises(CheckpointMismatchError, match="more than the 2 iterations"):
        dt.train_denoiser("cnn10", _params(**{"denoisers.cnn10.iterations": 2}), toy, tmp_path,
                          progress=False)


def test_cnn10_beats_low_dose_on_toy_problem(toy, tmp_path):
    params = _params(**{
        "denoisers.cnn10": {"iterations": 40, "batch_size": 4, "patch_size": 32, "lr": 3e-3},
        "denoisers.checkpoint_every": 20, "denoisers.validate_every": 20,
        "denoisers.val_slices": 3, "denoisers.select_by": "ssim",
    })
    res = dt.train_denoiser("cnn10", params, toy, tmp_path, progress=False)
    low, full = dt.validation_slices(toy, 3)
    ld_ssim = dt.mean_ssim(low, full)
    assert res.best_val > ld_ssim + 0.2, (res.best_val, ld_ssim)  # SSIM ~0.9 vs ~0.37
    # the returned model is the best checkpoint and reproduces its validation SSIM
    out = dt.denoise_hu(res.model, low, Normalizer.of(toy))
    assert dt.mean_ssim(out, full) == pytest.approx(res.best_val, abs=1e-6)


def test_load_denoiser_and_denoise_hu_shapes(toy, tmp_path):
    params = _params()
    with pytest.raises(FileNotFoundError, match="train this stage first"):
        dt.load_denoiser("cnn10", params, toy, tmp_path)
    dt.train_denoiser("cnn10", params, toy, tmp_path, progress=False)
    model = dt.load_denoiser("cnn10", params, toy, tmp_path)
    assert isinstance(model, CNN10) and not model.training
    norm = Normalizer.of(toy)
    low, _ = dt.validation_slices(toy, 3)
    out = dt.denoise_hu(model, low, norm, batch_size=2)
    assert out.shape == low.shape and out.dtype == np.float32 and np.isfinite(out).all()
    assert dt.denoise_hu(model, low[0], norm).shape == low[0].shape

    # GaussRI: nothing to train, no checkpoint needed; the centred square is constant
    g = dt.train_denoiser("gaussri", params, toy, tmp_path / "none", progress=False)
    assert isinstance(g.model, GaussRI) and g.steps == 0 and not (tmp_path / "none").exists()
    gm = dt.load_denoiser("gaussri", params, toy, tmp_path / "none")
    out = dt.denoise_hu(gm, low, norm)
    s = slice(17, 47)
    assert out.shape == low.shape
    assert np.allclose(out[:, s, s], norm.mean_hu, atol=1e-3)


def test_missing_vgg_weights_file_says_how_to_get_it(toy, tmp_path):
    params = _params(**{"denoisers.vgg_weights": "data/weights/no-such-vgg19.pth"})
    with pytest.raises(FileNotFoundError, match=r"vgg19-dcbb9e9d\.pth.*download\.pytorch\.org"):
        dt.train_denoiser("wganvgg", params, toy, tmp_path, progress=False)
    assert not (tmp_path / "wganvgg" / "last.pt").exists()


def test_wganvgg_loads_given_vgg_weights(toy, tmp_path):
    from invariscope.models.backbones import vgg19_features

    torch.manual_seed(3)
    f = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(vgg19_features().state_dict(), f)  # a stand-in file in torchvision's layout
    params = _params(**{"denoisers.vgg_weights": str(f)})
    res = dt.train_denoiser("wganvgg", params, toy, tmp_path / "run", progress=False)
    assert res.vgg_pretrained is True and isinstance(res.model, WGANVGGGenerator)


def test_cutmix_mask_is_a_box():
    torch.manual_seed(0)
    for _ in range(20):
        m = dt.cutmix_mask((2, 1, 16, 16))
        assert m.shape == (2, 1, 16, 16) and set(m.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(m[0], m[1])
        zeros = (m[0, 0] == 0).nonzero()
        if len(zeros):
            (r0, c0), (r1, c1) = zeros.min(0).values, zeros.max(0).values
            assert (m[0, 0, r0:r1 + 1, c0:c1 + 1] == 0).all()
