"""A tiny, learnable denoising problem in the on-disk dataset format (denoiser training tests)."""

from __future__ import annotations

import numpy as np

from invariscope.data.dataset import CTDataset, DatasetWriter


def smooth_noisy_dataset(root, slices=(3, 3, 3, 3, 3, 2), size=64, noise_hu=120.0,
                         seed=0) -> CTDataset:
    """Patients P0.. with the given slice counts; all but the last two train, then val, test.

    Full dose: a smooth random image in the lung-window range (lung-like -850 HU background with
    a few soft-tissue-like Gaussian blobs up to about 0 HU). Low dose: full dose + white Gaussian
    noise of ``noise_hu`` HU, so a small CNN learns to denoise it within a few hundred steps.
    """
    rng = np.random.default_rng(seed)
    splits = ["train"] * (len(slices) - 2) + ["val", "test"]
    yy, xx = np.mgrid[:size, :size] / size
    w = DatasetWriter(root, source="simulated", params={"test": "smooth_noisy", "seed": seed})
    for i, (n, split) in enumerate(zip(slices, splits)):
        full = np.full((n, size, size), -850.0)
        for k in range(n):
            for _ in range(4):
                cy, cx = rng.uniform(0.15, 0.85, 2)
                r = rng.uniform(0.08, 0.2)
                full[k] += rng.uniform(300, 850) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        full = np.minimum(full, 100.0)
        low = full + rng.normal(0.0, noise_hu, full.shape)
        w.add_patient(f"P{i}", split, low, full, pixel_spacing_mm=1.5)
    return w.finalize()


def small_denoisers(iterations: int, batch_size: int) -> dict:
    """Params overrides that make the four trained denoisers tiny (32² crops, DU-GAN 24² with
    small discriminators and CutMix always on), checkpointed and validated every step."""
    def cfg(**kw):
        return {"iterations": iterations, "batch_size": batch_size, "patch_size": 32, **kw}

    return {
        "denoisers.checkpoint_every": 1, "denoisers.validate_every": 1, "denoisers.val_slices": 1,
        "denoisers.vgg_weights": None,
        "denoisers.cnn10": cfg(lr=1e-3),
        "denoisers.redcnn": cfg(lr=1e-4),
        "denoisers.wganvgg": cfg(lr=1e-4, lambda_perceptual=0.1, critic_steps=1),
        "denoisers.dugan": cfg(patch_size=24, lr=1e-4, lambda_adv=0.1, lambda_px_grad=20.0,
                               lambda_cutmix=2.65, cutmix_prob=1.0, cutmix_warmup=1,
                               disc_channels=8, disc_depth=3),
    }
