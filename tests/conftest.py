"""Shared fixtures: small synthetic datasets in the on-disk format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invariscope.data.dataset import CTDataset, DatasetWriter


def make_dataset(root, slices=(2, 5, 9, 3, 4, 6), size=48, seed=0) -> CTDataset:
    """Patients P0.. with the given slice counts; P0..P3 train, P4 val, P5 test.

    Low dose = full dose + Gaussian noise; every pixel of patient i, slice k has full-dose
    value 100*i + k (HU), so crops can be traced back to their source.
    """
    rng = np.random.default_rng(seed)
    splits = ["train"] * (len(slices) - 2) + ["val", "test"]
    w = DatasetWriter(root, source="simulated", params={"test": True})
    for i, (n, split) in enumerate(zip(slices, splits)):
        full = np.broadcast_to((100.0 * i + np.arange(n))[:, None, None], (n, size, size)).copy()
        low = full + rng.normal(0, 20, full.shape)
        w.add_patient(f"P{i}", split, low, full, pixel_spacing_mm=1.5)
    return w.finalize()


@pytest.fixture
def small_dataset(tmp_path) -> CTDataset:
    return make_dataset(tmp_path / "ds")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and far faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: Overrides of the smoke profile that make every model of the pipeline tiny (seconds per stage),
#: with the paper's global-latent design (:data:`TINY_SPATIAL`: the spatial one).
TINY_PIPELINE = {
    "vae.latent": "global", "vae.spatial": None, "cinn.spatial": None, "layerwise": None,
    "vae.iterations": 1, "vae.batch_size": 2, "vae.n_val_crops": 2, "vae.n_test_crops": 2,
    "vae.checkpoint_every": 1, "vae.validate_every": 1,
    "cinn.n_blocks": 2, "cinn.hidden": 16, "cinn.hidden_depth": 1, "cinn.base_channels": 4,
    "cinn.cond_dim": 8, "cinn.batch_size": 4, "cinn.iterations": 2, "cinn.checkpoint_every": 2,
    "cinn.validate_every": 2, "cinn.n_val_crops": 4, "cinn.pool_crops": 0,
    "invariances.batch_size": 8, "invariances.chunk_crops": 4,
    "embedding.n_train_crops": 6, "embedding.n_invariances": 2, "embedding.crops_per_batch": 3,
    "embedding.invariances_per_crop": 2, "embedding.iterations": 4, "embedding.checkpoint_every": 2,
    "embedding.validate_every": 2, "embedding.n_val_crops": 3, "embedding.width": 2,
}


#: :data:`TINY_PIPELINE` with the spatial-latent cVAEs and convolutional cINNs of the smoke profile.
TINY_SPATIAL = {
    **{k: v for k, v in TINY_PIPELINE.items() if not k.startswith(("vae.latent", "vae.spatial", "layerwise",
                                                                    "cinn."))},
    "vae.spatial.iterations": 2, "vae.spatial.pool_crops": 8, "vae.spatial.pool_crops_by_denoiser": {},
    "vae.spatial.latent_channels": 2, "vae.spatial.encoder_width": 4, "vae.spatial.decoder_width": 4,
    "cinn.n_blocks": 2, "cinn.batch_size": 4, "cinn.iterations": 2, "cinn.checkpoint_every": 2,
    "cinn.validate_every": 2, "cinn.n_val_crops": 4, "cinn.spatial.subnet_width": 4,
    "cinn.spatial.cond_width": 4, "cinn.spatial.cond_channels": 2,
}


def tiny_sampling_models():
    """Gauss+RI, a small random cVAE (32² crops, latent 16) and a small cINN whose ActNorms are
    initialized from a fixed random batch: enough to sample invariances in milliseconds."""
    from invariscope.models.cinn import ConditionalINN
    from invariscope.models.denoisers import GaussRI
    from invariscope.models.vae import ConditionalVAE, VAEConfig

    torch.manual_seed(0)
    vae = ConditionalVAE(VAEConfig.small(crop_size=32, latent_dim=16)).eval()
    cinn = ConditionalINN(latent_dim=16, cond_size=32, cond_dim=8, base_channels=4, n_blocks=2,
                          hidden=16, hidden_depth=1)
    g = torch.Generator().manual_seed(1)
    cinn.initialize(torch.randn(16, 16, generator=g), torch.randn(16, 1, 32, 32, generator=g))
    return GaussRI().eval(), vae, cinn.eval()
