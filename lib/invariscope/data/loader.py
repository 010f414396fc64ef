"""Training crops from a :class:`~invariscope.data.dataset.CTDataset`.

* :class:`PatientWeightedCropSampler` draws (slice, top, left) triples: a patient's slices are
  drawn with weight 1/n_slices of that patient, so every patient is equally likely whatever
  its slice count (the authors' WeightedRandomSampler scheme), and crop offsets are drawn by
  the sampler, not by the dataset, so results do not depend on the number of workers.
* :class:`CropDataset` turns such triples into normalized (low dose, full dose) crops.
* :func:`fixed_crops` gives a deterministic, seeded list of crops for validation and tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from invariscope.data.dataset import CTDataset

CropSpec = tuple[int, int, int]  # (flat slice index, top, left)


class Normalizer:
    """Zero-mean, unit-variance scaling of HU values with the dataset's constants."""

    def __init__(self, mean_hu: float, std_hu: float) -> None:
        self.mean_hu = float(mean_hu)
        self.std_hu = float(std_hu)

    @classmethod
    def of(cls, dataset: CTDataset) -> "Normalizer":
        """The normalization stored in a dataset's manifest."""
        return cls(*dataset.normalization)

    def __call__(self, hu: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        return (hu - self.mean_hu) / self.std_hu

    def to_hu(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Inverse of the normalization."""
        return x * self.std_hu + self.mean_hu


def slice_weights(dataset: CTDataset, split: str) -> np.ndarray:
    """Per-slice sampling weights 1/n_slices(patient), in ``dataset.slice_index(split)`` order."""
    w = [1.0 / dataset.info(p).n_slices for p, _ in dataset.slice_index(split)]
    return np.asarray(w, dtype=np.float64)


class PatientWeightedCropSampler(Sampler[CropSpec]):
    """Infinite-free sampler of ``num_samples`` random crops per epoch, seeded and reproducible.

    Each epoch uses the generator seeded with ``(seed, epoch)``; call :meth:`set_epoch` to move on.
    """

    def __init__(
        self, dataset: CTDataset, split: str, crop_size: int, num_samples: int, seed: int = 0
    ) -> None:
        self.index = dataset.slice_index(split)
        if not self.index:
            raise ValueError(f"split {split!r} of {dataset.root} has no slices")
        self.shapes = [dataset.info(p).shape for p, _ in self.index]
        too_small = [p for (p, _), s in zip(self.index, self.shapes) if min(s) < crop_size]
        if too_small:
            raise ValueError(f"crop size {crop_size} exceeds the slices of patient {too_small[0]}")
        w = slice_weights(dataset, split)
        self.probs = w / w.sum()
        self.crop_size = crop_size
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of an epoch (resume: set the epoch you stopped in)."""
        self.epoch = epoch

    def draw(self, n: int, epoch: int | None = None) -> list[CropSpec]:
        """``n`` crops of an epoch's stream, as (slice index, top, left)."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        idx = rng.choice(len(self.index), size=n, p=self.probs)
        out = []
        for i, u, v in zip(idx, rng.random(n), rng.random(n)):
            h, w = self.shapes[i]
            top = int(u * (h - self.crop_size + 1))
            left = int(v * (w - self.crop_size + 1))
            out.append((int(i), top, left))
        return out

    def __iter__(self) -> Iterator[CropSpec]:
        return iter(self.draw(self.num_samples))

    def __len__(self) -> int:
        return self.num_samples


class CropDataset(Dataset):
    """Normalized (low dose, full dose) crops, each a float32 tensor (1, c, c).

    Indexed by :data:`CropSpec` triples from a sampler, or by an integer into ``crops``.
    """

    def __init__(
        self,
        dataset: CTDataset,
        split: str,
        crop_size: int,
        crops: Sequence[CropSpec] | None = None,
        normalizer: Normalizer | None = None,
    ) -> None:
        self.dataset = dataset
        self.index = dataset.slice_index(split)
        self.crop_size = crop_size
        self.crops = list(crops) if crops is not None else None
        self.norm = normalizer or Normalizer.of(dataset)

    def __len__(self) -> int:
        if self.crops is None:
            raise TypeError("CropDataset without a fixed crop list has no length; use a sampler")
        return len(self.crops)

    def hu_crop(self, spec: CropSpec) -> tuple[np.ndarray, np.ndarray]:
        """The (low, full) HU crop (float32, (c, c)) of one crop spec."""
        i, top, left = spec
        patient, s = self.index[i]
        c = self.crop_size
        region = (s, slice(top, top + c), slice(left, left + c))
        low = np.asarray(self.dataset.volume(patient, "low")[region], dtype=np.float32)
        full = np.asarray(self.dataset.volume(patient, "full")[region], dtype=np.float32)
        return low, full

    def __getitem__(self, item: int | CropSpec) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.crops[item] if isinstance(item, (int, np.integer)) else item
        low, full = self.hu_crop(tuple(spec))
        x = torch.from_numpy(self.norm(low)[None].astype(np.float32))
        y = torch.from_numpy(self.norm(full)[None].astype(np.float32))
        return x, y


def fixed_crops(dataset: CTDataset, split: str, crop_size: int, n: int, seed: int) -> list[CropSpec]:
    """A deterministic list of ``n`` patient-weighted random crops (validation, test, analysis)."""
    sampler = PatientWeightedCropSampler(dataset, split, crop_size, n, seed=seed)
    return sampler.draw(n, epoch=0)


def training_loader(
    dataset: CTDataset,
    crop_size: int,
    batch_size: int,
    samples_per_epoch: int,
    seed: int,
    split: str = "train",
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader of patient-weighted random training crops; ``loader.sampler.set_epoch(e)``."""
    sampler = PatientWeightedCropSampler(dataset, split, crop_size, samples_per_epoch, seed=seed)
    return DataLoader(
        CropDataset(dataset, split, crop_size),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
    )
