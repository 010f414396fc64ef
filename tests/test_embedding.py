"""Learned embedding φ for s_DML: retrieval score, batches, semi-hard triplet training on a toy
problem with a known answer, exact resume, ImageNet loading, and the end-to-end stage on a tiny
Gauss+RI cVAE/cINN (cached training set, refusal of foreign checkpoints, clear errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_PIPELINE, make_dataset, tiny_sampling_models
from scipy.ndimage import gaussian_filter

from invariscope import provenance
from invariscope.config.params import EmbeddingParams, ParamsError, load_params
from invariscope.data.loader import Normalizer, fixed_crops
from invariscope.models import backbones
from invariscope.stages import cinn_training as ct
from invariscope.stages import embedding as emb
from invariscope.stages import invariances as inv
from invariscope.stages import vae_training
from invariscope.stages.training import CheckpointMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ retrieval and batches
def test_retrieval_accuracy_known_answers():
    ex = np.eye(3)
    own = np.stack([np.stack([e, e + 0.1]) for e in ex])          # each crop's invariances near it
    assert emb.retrieval_accuracy(ex, own) == 1.0
    shifted = np.roll(own, 1, axis=0)                              # crop i's set belongs to crop i-1
    assert emb.retrieval_accuracy(ex, shifted) == 0.0
    half = own.copy()
    half[0] = -half[0]                                             # crop 0's invariances point away
    assert emb.retrieval_accuracy(ex, half) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="expected"):
        emb.retrieval_accuracy(ex, own[:2])


def test_map_at_r_known_answers():
    ex = np.eye(2)
    # each input's nearest invariance is its own, the second nearest another crop's:
    # top-1 retrieval is perfect, MAP@R = (1/R) (P@1 * 1 + P@2 * 0) = 0.5
    einv = np.array([[[1, 0], [0.6, 0.8]], [[0, 1], [0.8, 0.6]]])
    assert emb.retrieval_accuracy(ex, einv) == 1.0
    assert emb.map_at_r(ex, einv) == pytest.approx(0.5)
    # own invariances ranked first for both: 1
    assert emb.map_at_r(ex, np.array([[[1, 0], [0.9, 0.1]], [[0, 1], [0.1, 0.9]]])) == pytest.approx(1.0)
    # each crop's only relevant invariance in the top R is at rank 2: (1/2) (0 + 1/2) = 0.25
    einv2 = np.array([[[0.8, 0.6], [0, 1]], [[1, 0], [0.1, 0.9]]])
    assert emb.map_at_r(ex, einv2) == pytest.approx(0.25)


def test_batch_indices_depend_only_on_seed_and_step():
    a = emb.batch_indices(10, 6, 4, 3, seed=1, step=5)
    b = emb.batch_indices(10, 6, 4, 3, seed=1, step=5)
    c = emb.batch_indices(10, 6, 4, 3, seed=1, step=6)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1]) or not torch.equal(a[0], c[0])
    crops, invs = a
    assert crops.shape == (4,) and invs.shape == (4, 3)
    assert len(set(crops.tolist())) == 4 and crops.max() < 10
    assert all(len(set(r)) == 3 for r in invs.tolist()) and invs.max() < 6


# ------------------------------------------------------------------------ toy problem
def _toy(n, m, seed, size=16, content=300.0, noise=600.0):
    """Crops = a smooth random pattern (the crop's 'anatomy', 300 HU) + white noise of a random
    level (up to 600 HU); invariances = the same pattern + fresh noise. Known answer: the pattern
    identifies the crop, the noise does not; a random network sees mostly the noise."""
    rng = np.random.default_rng(seed)
    c = np.stack([gaussian_filter(rng.normal(0, 1, (size, size)), 2.0) for _ in range(n)])
    c = c / c.std(axis=(1, 2), keepdims=True) * content - 500.0

    def noisy(shape):
        return rng.normal(0, 1, shape) * rng.uniform(0.2, 1.0, shape[:-2] + (1, 1)) * noise

    x = c + noisy(c.shape)
    xt = c[:, None] + noisy((n, m, size, size))
    return emb.EmbeddingData(x.astype(np.float32), xt.astype(np.float16))


def _toy_cfg(**kw):
    base = dict(backbone="resnet-small", width=4, embed_dim=8, margin=0.2, n_train_crops=24,
                n_invariances=8, crops_per_batch=8, invariances_per_crop=4, lr=1e-2, iterations=200,
                checkpoint_every=100, validate_every=50, n_val_crops=24, seed=0)
    return EmbeddingParams(**{**base, **kw})


_NORM = Normalizer(-500.0, 300.0)


def test_semihard_triplet_training_separates_held_out_crops(tmp_path):
    train, val = _toy(24, 8, 10), _toy(24, 4, 20)
    # the known answer is attainable: a low-pass filter and cosine similarity retrieve the crops
    def lp(a):
        smooth = gaussian_filter(a.astype(np.float64) + 500, (0,) * (a.ndim - 2) + (2, 2))
        return smooth.reshape(*a.shape[:-2], -1)

    assert emb.retrieval_accuracy(lp(val.x), lp(val.x_tilde)) > 0.9
    torch.manual_seed(0)
    model = emb.Embedder("resnet-small", 8, width=8).eval()
    ex, einv = emb.embed(model, val.x, _NORM), emb.embed(model, val.x_tilde, _NORM)
    top1, mapr = emb.retrieval_accuracy(ex, einv), emb.map_at_r(ex, einv)
    cfg = _toy_cfg(width=8, crops_per_batch=12)
    res = emb.fit_embedding(model, train, val, cfg, _NORM, tmp_path, "toy", progress=False)
    assert top1 <= 0.3 and mapr <= 0.2                    # chance 1/24; noise dominates random features
    assert res.best_metric >= 0.4 and res.best_metric >= mapr + 0.3   # validation MAP@R
    model.eval()
    assert emb.retrieval_accuracy(emb.embed(model, val.x, _NORM), emb.embed(model, val.x_tilde, _NORM)) >= 0.6
    assert all(h["triplets"] > 0 for h in res.history)    # semi-hard triplets were found throughout
    out = model.eval()(torch.zeros(3, 1, 16, 16))
    assert out.shape == (3, 8) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()


def test_fit_resume_equals_straight_run(tmp_path):
    train, val = _toy(12, 4, 1), _toy(6, 2, 2)
    cfg = _toy_cfg(n_train_crops=12, n_invariances=4, crops_per_batch=4, invariances_per_crop=2,
                   iterations=6, checkpoint_every=2, validate_every=2, n_val_crops=6)
    half = cfg.model_copy(update={"iterations": 4})

    def fresh():
        torch.manual_seed(3)
        return emb.Embedder("resnet-small", 8, width=4)

    a = fresh()
    ra = emb.fit_embedding(a, train, val, cfg, _NORM, tmp_path / "a", "fp", progress=False)
    b = fresh()
    emb.fit_embedding(b, train, val, half, _NORM, tmp_path / "b", "fp", progress=False)
    b = fresh()  # a new process: everything comes from last.pt
    rb = emb.fit_embedding(b, train, val, cfg, _NORM, tmp_path / "b", "fp", progress=False)
    assert rb.resumed_from == 4 and rb.steps == ra.steps == 6
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert [h.get("val") for h in ra.history] == [h.get("val") for h in rb.history]
    with pytest.raises(CheckpointMismatchError, match="another configuration"):
        emb.fit_embedding(fresh(), train, val, cfg, _NORM, tmp_path / "b", "other", progress=False)
    with pytest.raises(ValueError, match="batch needs"):
        emb.fit_embedding(fresh(), train, val, cfg.model_copy(update={"invariances_per_crop": 5}),
                          _NORM, tmp_path / "c", "fp", progress=False)


def test_embed_matches_model_on_normalized_input():
    torch.manual_seed(0)
    model = emb.Embedder("resnet-small", 4, width=2).eval()
    hu = np.random.default_rng(0).normal(-500, 300, (2, 3, 16, 16)).astype(np.float16)
    out = emb.embed(model, hu, _NORM, batch_size=4)
    ref = model(torch.from_numpy((hu.reshape(6, 1, 16, 16).astype(np.float32) + 500) / 300))
    assert out.shape == (2, 3, 4) and np.allclose(out.reshape(6, 4), ref.detach().numpy(), atol=1e-5)


def test_resnet50_imagenet_weights_sum_rgb_filters(tmp_path):
    ref = backbones.resnet50()
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(ref.state_dict(), path)
    model = emb.Embedder("resnet50", 16)
    assert model.load_imagenet_weights(path)
    assert torch.allclose(model.backbone.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.backbone.layer4[2].conv3.weight, ref.layer4[2].conv3.weight)
    assert not model.load_imagenet_weights(None)
    with pytest.raises(FileNotFoundError, match="embedding.imagenet_weights"):
        model.load_imagenet_weights(tmp_path / "none.pth", params_key="embedding.imagenet_weights")
    with pytest.raises(ValueError, match="resnet50"):
        emb.Embedder("resnet-small", 4, width=2).load_imagenet_weights(path)


def test_params_validation():
    with pytest.raises(ValueError, match="crops_per_batch"):
        _toy_cfg(crops_per_batch=30)
    with pytest.raises(ParamsError, match="embedding.invariances_per_crop 11 must be <= .* 10"):
        load_params("smoke", {"embedding.invariances_per_crop": 11})   # 2 x 5 denoisers
    assert load_params("smoke", {"embedding.invariances_per_crop": 10}).embedding.invariances_per_crop == 10
    with pytest.raises(ParamsError, match="analysis.reference 'unet' is not in denoisers.methods; "
                       "set it to one of cnn10, redcnn") as e:
        load_params("smoke", {"analysis.reference": "unet"})
    assert "(got" not in str(e.value), "a cross-field error names its keys, not the whole section"
    with pytest.raises(ParamsError, match="analysis.reference 'redcnn' is not in denoisers.methods"):
        load_params("smoke", {"denoisers.methods": ["cnn10", "gaussri"]})  # checked at load, not late
    assert load_params("smoke", {"denoisers.methods": ["cnn10", "gaussri"],
                                 "analysis.reference": "cnn10"}).analysis.reference == "cnn10"
    with pytest.raises(ValueError, match="imagenet_weights needs backbone"):
        _toy_cfg(imagenet_weights="x.pth")
    from invariscope.evaluation import stats

    for profile in ("smoke", "default", "paper"):
        p = load_params(profile)
        assert tuple(p.analysis.quantiles) == stats.DEFAULT_QUANTILES
        assert p.analysis.reference == "redcnn"
    assert load_params("paper").embedding.backbone == "resnet50"


# ------------------------------------------------------------------------ outputs=False sampling
def test_sampling_without_outputs_keeps_invariances(tmp_path):
    ds = make_dataset(tmp_path / "ds", size=48)
    f, vae, cinn = tiny_sampling_models()
    crops = fixed_crops(ds, "test", 32, 3, seed=0)
    full = inv.sample_invariances(f, vae, cinn, ds, crops, 2, 4, seed=7, progress=False)
    bare = inv.sample_invariances(f, vae, cinn, ds, crops, 2, 4, seed=7, progress=False,
                                  outputs=False)
    assert np.array_equal(full["x_tilde"], bare["x_tilde"]) and np.array_equal(full["x"], bare["x"])
    assert bare["f_x_tilde"].shape == (3, 0, 32, 32)
    assert provenance.invariance_key(crops, 2, 7, False) != provenance.invariance_key(crops, 2, 7, False, outputs=False)
    path = inv.save_invariances(tmp_path / "bare.npz", bare)
    assert inv.load_invariances(path)["f_x_tilde"].shape == (3, 0, 32, 32)


# ------------------------------------------------------------------------ the stage end to end
_TINY = {**TINY_PIPELINE, "denoisers.methods": ["gaussri"], "analysis.reference": "gaussri"}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    ds = make_dataset(root / "ds", size=48)
    params = load_params("smoke", _TINY)
    dirs = dict(vae_dir=root / "vae", denoiser_dir=root / "den")
    vae_training.train_vae("gaussri", params, ds, root / "vae", progress=False, denoiser_dir=root / "den")
    ct.train_cinn("gaussri", params, ds, root / "cinn", progress=False, **dirs)
    return ds, params, {**dirs, "cinn_dir": root / "cinn"}, root


def test_stage_trains_caches_and_loads(stage, tmp_path, monkeypatch):
    ds, params, dirs, _ = stage
    trained = emb.train_embedding(params, ds, tmp_path, progress=False, **dirs)
    assert trained.steps == 4 and trained.chance == pytest.approx(1 / 3)
    assert 0.0 <= trained.best_val <= 1.0 and not trained.model.training
    assert 0.0 <= trained.val_top1 <= 1.0
    assert trained.shapes == {"train": (6, 2, 32, 32), "val": (3, 2, 32, 32)}
    data = tmp_path / "data"
    assert (data / "gaussri_train.npz").is_file() and (data / "gaussri_val.npz").is_file()
    train_set = inv.load_invariances(data / "gaussri_train.npz")
    assert train_set["x_tilde"].shape == (6, 2, 32, 32) and str(train_set["split"]) == "train"
    assert train_set["f_x_tilde"].shape[1] == 0           # f(x̃) is not computed for φ
    expected = fixed_crops(ds, "train", 32, 6, params.embedding.seed)
    assert train_set["crops"].tolist() == [list(c) for c in expected]
    # a rerun resamples nothing (and loads no sampling models) and trains nothing
    calls = []
    real, real_load = inv._sample_chunk, emb.load_models
    monkeypatch.setattr(inv, "_sample_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(emb, "load_models", lambda *a, **k: calls.append(2) or real_load(*a, **k))
    again = emb.train_embedding(params, ds, tmp_path, progress=False, **dirs)
    assert calls == [] and again.steps == 4 and again.resumed_from == 4
    # a damaged cache file is resampled
    (data / "gaussri_val.npz").write_bytes(b"broken")
    emb.sample_training_data(params, ds, "val", out_dir=tmp_path, progress=False, **dirs)
    assert 1 in calls and 2 in calls
    loaded = emb.load_embedding(params, ds, tmp_path, **dirs)
    for k, v in trained.model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    ckpt = provenance.embedding_checkpoint(params, ds, tmp_path, **dirs)
    assert ckpt.parent.name.startswith("embedding-")
    with pytest.raises(FileNotFoundError, match="05_embedding"):
        emb.load_embedding(params, ds, tmp_path, path=ckpt.parent / "missing.pt", **dirs)
    # another configuration (other settings, or other denoisers/cINNs after adding your own
    # denoiser) is not loaded; it names what to run, and then trains beside the old one
    other = load_params("smoke", {**_TINY, "embedding.margin": 0.5})
    with pytest.raises(FileNotFoundError, match="trained on other denoisers.*05_embedding"):
        emb.load_embedding(other, ds, tmp_path, **dirs)
    old_files = {f: f.read_bytes() for f in tmp_path.glob("embedding-*/*.pt")}
    retrained = emb.train_embedding(other, ds, tmp_path, progress=False, **dirs)
    assert retrained.steps == 4 and retrained.resumed_from == 0
    assert len(list(tmp_path.glob("embedding-*/last.pt"))) == 2
    assert all(f.read_bytes() == b for f, b in old_files.items())  # nothing lost
    assert emb.load_embedding(other, ds, tmp_path, **dirs) is not None


def test_stage_errors_name_what_to_run(stage, tmp_path):
    ds, params, dirs, root = stage
    with pytest.raises(FileNotFoundError, match="05_embedding"):
        emb.load_embedding(params, ds, tmp_path / "none", **dirs)
    with pytest.raises(FileNotFoundError, match="03_cinn"):
        emb.train_embedding(params, ds, tmp_path, progress=False,
                            **{**dirs, "cinn_dir": tmp_path / "no-cinn"})
