"""Learned embedding φ of the invariances for s_DML (paper Sec. 2.4.2, Eq. 8 and 10).

φ (a ResNet on one-channel crops, unit-length output) is trained with the triplet loss
``max(0, ‖φ(x) − φ(x̃⁺)‖ − ‖φ(x) − φ(x̃⁻)‖ + margin)`` and semi-hard mining
(pytorch-metric-learning): anchors are low-dose crops x, positives invariances x̃⁺ of the same
crop, negatives invariances x̃⁻ of other crops, so that "an LD input lies closer to its own
invariances than to invariances of other crops". On unit vectors the L2 distance is a monotone
function of the cosine similarity that s_DML measures.

Data (:func:`sample_training_data`): ``embedding.n_train_crops`` fixed training-split crops (not
the test crops the analysis uses) with ``embedding.n_invariances`` invariances per denoiser of
``denoisers.methods``, each drawn with that denoiser's cINN and cVAE and pooled per crop (the label
is the crop, whatever the denoiser); the same for ``embedding.n_val_crops`` validation-split crops.
The sets are cached in ``<out_dir>/data/<denoiser>_<split>.npz`` (f(x̃) is not computed).

Training (:func:`fit_embedding`): step s draws P = ``crops_per_batch`` crops and K =
``invariances_per_crop`` of each crop's invariances from a generator seeded by (seed, s), so a
resumed run is exact; checkpoints, NaN guard and ``best.pt`` come from
:func:`invariscope.stages.training.train`. Validation (picks ``best.pt``): :func:`map_at_r` of the
held-out inputs x against the invariances of all held-out crops (about 1 / ``n_val_crops`` for a
random ranking); :func:`retrieval_accuracy` (top-1) is the simpler score shown beside it. With
real invariances a random network often ranks the top-1 invariance right already (anatomy
dominates a crop), so top-1 saturates where MAP@R still measures how well all of a crop's
invariances are gathered.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import distributed as pml_distributed
from torch import nn

from invariscope import device as devices
from invariscope import distributed
from invariscope.config.params import EmbeddingParams, Params, digest
from invariscope.data.dataset import CTDataset
from invariscope.data.loader import Normalizer
from invariscope.models import backbones
from invariscope.models.vae import _SmallResNet, adapt_rgb_conv
from invariscope.precision import Precision
from invariscope.provenance import (embedding_checkpoint, embedding_data_key, embedding_fingerprint,
                                    embedding_set_keys, stage_dir)
from invariscope.stages.cinn_training import load_cinn, load_models
from invariscope.stages.invariances import load_invariances, sample_invariances_cached, stored_key
from invariscope.stages.training import TrainResult, checkpoint_dir, load_best, load_checkpoint, train
from invariscope.stages.vae_training import resolve_weights

__all__ = [
    "Embedder",
    "EmbeddingData",
    "TrainedEmbedding",
    "build_embedder",
    "embed",
    "retrieval_accuracy",
    "map_at_r",
    "batch_indices",
    "sample_training_data",
    "fit_embedding",
    "train_embedding",
    "load_embedding",
]

_RUN = "run 05_embedding.ipynb for this profile"


class Embedder(nn.Module):
    """ResNet on normalized one-channel crops ``(B, 1, c, c)`` -> unit vectors ``(B, embed_dim)``."""

    def __init__(self, backbone: Literal["resnet50", "resnet-small"] = "resnet50", embed_dim: int = 128,
                 width: int = 64, layers: Sequence[int] = (1, 1, 1, 1)) -> None:
        super().__init__()
        self.kind = backbone
        self.backbone: nn.Module
        if backbone == "resnet50":
            self.backbone = backbones.resnet50(in_channels=1)
            self.backbone.fc = nn.Identity()
            feat = 512 * backbones.Bottleneck.expansion
        elif backbone == "resnet-small":
            self.backbone = _SmallResNet(1, width, tuple(layers))
            feat = self.backbone.out_features
        else:
            raise ValueError(f"backbone must be 'resnet50' or 'resnet-small', got {backbone!r}")
        self.head = nn.Linear(feat, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone.features(x)), dim=1)

    def load_imagenet_weights(self, path: str | Path | None, *, params_key: str | None = None) -> bool:
        """Load a torchvision ``resnet50`` ImageNet file (conv1's RGB filters summed to one channel;
        ``fc`` dropped, the head stays random). ``path=None`` -> False (random initialisation)."""
        if self.kind != "resnet50":
            raise ValueError(f"ImageNet weights exist for backbone 'resnet50' only, not {self.kind!r}")
        ref = backbones.resnet50()
        if not backbones.load_imagenet_weights(ref, path, strict=True, params_key=params_key):
            return False
        state = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
        state["conv1.weight"] = adapt_rgb_conv(state["conv1.weight"], 1)
        self.backbone.load_state_dict(state, strict=True)
        return True


def build_embedder(params: Params, load_pretrained: bool = True) -> Embedder:
    """The profile's embedder, initialised from ``embedding.seed`` (and ImageNet weights if set)."""
    cfg = params.embedding
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Embedder(cfg.backbone, cfg.embed_dim, cfg.width, cfg.layers)
    if load_pretrained and cfg.imagenet_weights is not None:
        model.load_imagenet_weights(resolve_weights(cfg.imagenet_weights, params.source_file),
                                    params_key="embedding.imagenet_weights")
    return model


@torch.no_grad()
def embed(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], images_hu: np.ndarray,
          norm: Normalizer, batch_size: int = 64, device: torch.device | None = None) -> np.ndarray:
    """``model`` applied to HU crops ``(..., c, c)`` (any dtype) -> float32 ``(..., D)``.

    Inputs are normalized batch by batch (float16 invariance arrays are never copied whole) and
    moved to ``device`` (None: the device of ``model``'s parameters; the CPU for a plain
    function). ``model`` (an :class:`Embedder`, or e.g. ``lambda x: vae.encode(x)[0]``) should be
    in eval mode.
    """
    dev = device if device is not None else devices.module_device(model)
    arr = np.asarray(images_hu)
    lead, c = arr.shape[:-2], arr.shape[-2:]
    flat = arr.reshape(-1, *c)
    out = [model(torch.from_numpy(np.asarray(norm(flat[i:i + batch_size].astype(np.float32)),
                                             dtype=np.float32))[:, None].to(dev)).float().cpu().numpy()
           for i in range(0, len(flat), batch_size)]
    res = np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
    return res.reshape(*lead, -1)


def _similarities(ex: np.ndarray | torch.Tensor,
                  einv: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Cosine similarities (N, N·M) of the queries ``ex`` (N, D) against every invariance of
    ``einv`` (N, M, D) (float64), and N, M."""
    a = torch.as_tensor(np.asarray(ex) if not isinstance(ex, torch.Tensor) else ex, dtype=torch.float64)
    b = torch.as_tensor(np.asarray(einv) if not isinstance(einv, torch.Tensor) else einv,
                        dtype=torch.float64)
    n, m = b.shape[:2]
    if a.shape[0] != n or a.ndim != 2 or b.ndim != 3:
        raise ValueError(f"expected ex (N,D) and einv (N,M,D), got {tuple(a.shape)}, {tuple(b.shape)}")
    return F.normalize(a, dim=1) @ F.normalize(b.reshape(n * m, -1), dim=1).T, n, m


def retrieval_accuracy(ex: np.ndarray | torch.Tensor, einv: np.ndarray | torch.Tensor) -> float:
    """Fraction of crops i whose most cosine-similar invariance, among the invariances of all
    crops ``einv`` (N, M, D), belongs to crop i itself; ``ex`` (N, D). Chance level 1 / N."""
    sim, n, m = _similarities(ex, einv)
    owner = sim.argmax(dim=1) // m
    return float((owner == torch.arange(n)).double().mean())


def map_at_r(ex: np.ndarray | torch.Tensor, einv: np.ndarray | torch.Tensor) -> float:
    """Mean average precision at R (Musgrave et al. 2020) of the queries x_i against the
    invariances of all crops ``einv`` (N, M, D), R = M (crop i's own invariances), cosine
    similarity. 1 when every crop's own invariances rank first; about 1 / N for random ranking.
    Unlike top-1 retrieval it does not saturate when only the nearest invariance is right."""
    sim, n, m = _similarities(ex, einv)
    top = sim.topk(m, dim=1).indices // m                         # owners of the R best, (N, R)
    rel = (top == torch.arange(n)[:, None]).double()
    precision = rel.cumsum(1) / torch.arange(1, m + 1, dtype=torch.float64)
    return float((precision * rel).sum(1).div(m).mean())


def batch_indices(n_crops: int, n_pool: int, crops_per_batch: int, invariances_per_crop: int,
                  seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch of step ``step``: P distinct crop indices ``(P,)`` and K distinct invariance indices
    per crop ``(P, K)`` (into the crop's pool of ``n_pool``); depends only on (seed, step)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    crops = torch.randperm(n_crops, generator=g)[:crops_per_batch]
    inv = torch.stack([torch.randperm(n_pool, generator=g)[:invariances_per_crop]
                       for _ in range(len(crops))])
    return crops, inv


# --------------------------------------------------------------------------------------
# Training data
# --------------------------------------------------------------------------------------
@dataclass
class EmbeddingData:
    """Crops and their pooled invariances: ``x`` (N, c, c) float32 HU, ``x_tilde`` (N, P, c, c)
    HU (P = invariances of all denoisers, ``source[j]`` names the denoiser of column j), and
    ``key`` (what the set depends on)."""

    x: np.ndarray
    x_tilde: np.ndarray
    source: list[str] = field(default_factory=list)
    key: str = ""


def sample_training_data(params: Params, dataset: CTDataset, split: str = "train", *,
                         out_dir: str | Path | None = None, cinn_dir: str | Path | None = None,
                         vae_dir: str | Path | None = None, denoiser_dir: str | Path | None = None,
                         force: bool = False, progress: bool = True) -> EmbeddingData:
    """Invariances of the ``split`` crops ("train": ``n_train_crops``, "val": ``n_val_crops``) for
    every denoiser of ``denoisers.methods``, pooled per crop; cached (and resumable per chunk) in
    ``<out_dir>/data/<denoiser>_<split>.npz`` (default ``runs/<profile>/embedding``). A cached file
    of other crops, counts, seed or models is resampled; ``force=True`` resamples all."""
    out, cdir = stage_dir(params, "embedding", out_dir), stage_dir(params, "cinn", cinn_dir)
    cfg = params.embedding
    keys = embedding_set_keys(params, dataset, split, cdir, vae_dir, denoiser_dir)
    xs, pools, source = [], [], []
    for name, (key, models, crops) in keys.items():
        path = out / "data" / f"{name}_{split}.npz"
        if not force and stored_key(path) == key:  # up to date: no need to load the models
            res = load_invariances(path)
        else:
            den, vae = load_models(name, params, dataset, vae_dir, denoiser_dir)
            cinn = load_cinn(name, params, dataset, cdir, vae_dir, denoiser_dir)
            res = sample_invariances_cached(path, den, vae, cinn, dataset, crops, cfg.n_invariances,
                                            params.invariances.batch_size, cfg.seed, split=split,
                                            models=models, chunk_crops=params.invariances.chunk_crops,
                                            force=force, progress=progress, outputs=False,
                                            precision=params.precision)
        xs.append(res["x"])
        pools.append(res["x_tilde"])
        source += [name] * res["x_tilde"].shape[1]
    if any(not np.array_equal(xs[0], x) for x in xs[1:]):
        raise RuntimeError("the denoisers' sets hold different crops x; resample with force=True")
    return EmbeddingData(xs[0], np.concatenate(pools, axis=1), source, embedding_data_key(keys))


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------
@dataclass
class TrainedEmbedding:
    """An embedding after :func:`train_embedding` / :func:`fit_embedding` (``model``: best
    checkpoint, eval mode); ``best_val``: its validation MAP@R, ``chance``: 1 / n_val_crops;
    ``val_top1``: the best model's top-1 retrieval on the validation set; ``shapes``: of the
    training and validation ``x_tilde``; ``seconds_data`` / ``seconds``: wall time of sampling
    (or loading) the sets / of everything."""

    model: Embedder
    best_step: int | None
    best_val: float | None
    chance: float | None
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    seconds_data: float = 0.0
    resumed_from: int = 0
    val_top1: float | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def fit_embedding(model: Embedder, train_data: EmbeddingData, val_data: EmbeddingData | None,
                  cfg: EmbeddingParams, norm: Normalizer, ckpt_dir: str | Path, fp: str,
                  progress: bool = True, precision: str = "fp32") -> TrainResult:
    """Train ``model`` with the triplet loss and semi-hard mining (see the module docstring).

    Uses ``cfg``'s margin, crops_per_batch, invariances_per_crop, lr, iterations,
    checkpoint_every, validate_every and seed. Resumes from ``ckpt_dir/last.pt`` (refusing one of
    another fingerprint ``fp``); ``best.pt`` holds the best validation MAP@R.
    """
    n, pool = train_data.x_tilde.shape[:2]
    p_, k_ = cfg.crops_per_batch, cfg.invariances_per_crop
    if p_ > n or k_ > pool:
        raise ValueError(f"a batch needs {p_} crops x {k_} invariances; the training set has {n} "
                         f"crops x {pool} invariances")
    dev = devices.module_device(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    mp = Precision(precision, dev)
    miner = miners.TripletMarginMiner(margin=cfg.margin, type_of_triplets="semihard")
    loss_fn = losses.TripletMarginLoss(margin=cfg.margin)
    w = distributed.world()
    if w.size > 1:  # mine and average over the global batch (every process's embeddings)
        miner = pml_distributed.DistributedMinerWrapper(miner)
        loss_fn = pml_distributed.DistributedLossWrapper(loss_fn)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(norm(a.astype(np.float32)), dtype=np.float32))[:, None].to(dev)

    def step_fn(step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
        ci, ii = (b.numpy() for b in batch)
        xa = tensor(train_data.x[ci])
        xi = tensor(train_data.x_tilde[ci[:, None], ii].reshape(-1, *train_data.x.shape[1:]))
        with mp.autocast():
            emb = model(torch.cat((xa, xi))).float()
        ea, ei = emb[:len(ci)], emb[len(ci):]
        la = torch.arange(len(ci), device=dev) + w.rank * len(ci)  # the crop's place in the global batch
        li = la.repeat_interleave(ii.shape[1])
        triplets = miner(ea, la, ei, li)
        loss = loss_fn(ea, la, triplets, ei, li)
        mp.update(loss, opt)
        # the distributed wrapper scales the loss by the process count (its gradients are averaged)
        return {"loss": loss.item() / w.size, "triplets": float(len(triplets[0]))}

    def batches(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in itertools.count(start):
            yield batch_indices(n, pool, p_, k_, cfg.seed, step)

    def map_at_r_val() -> float:
        return map_at_r(embed(model, val_data.x, norm), embed(model, val_data.x_tilde, norm))

    validate = map_at_r_val if val_data is not None else None
    return train(step_fn, batches, cfg.iterations, ckpt_dir, {"embedding": model},
                 mp.register({"embedding": opt}), fp, seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                 validate_fn=validate, validate_every=cfg.validate_every, higher_is_better=True,
                 desc="embedding", progress=progress)


def train_embedding(params: Params, dataset: CTDataset, out_dir: str | Path | None = None,
                    force: bool = False, progress: bool = True, *, cinn_dir: str | Path | None = None,
                    vae_dir: str | Path | None = None,
                    denoiser_dir: str | Path | None = None) -> TrainedEmbedding:
    """Sample (or load) the training and validation sets and train (or resume, or reuse) φ.

    Checkpoints in ``<out_dir>/<fingerprint>/`` (default ``out_dir``: ``runs/<profile>/embedding``):
    another set of denoisers, cINNs or embedding settings trains beside an older embedding instead
    of colliding with it (e.g. after adding your own denoiser). ``force=True`` deletes this
    configuration's checkpoints and resamples the sets. Needs every denoiser's cINN (``cinn_dir``, default
    ``runs/<profile>/cinn``). Returns the best checkpoint (highest validation MAP@R).
    """
    out, cdir = stage_dir(params, "embedding", out_dir), stage_dir(params, "cinn", cinn_dir)
    t0 = time.time()
    with distributed.main_first() as main:  # several processes: rank 0 samples, the others load
        kw: dict[str, Any] = dict(out_dir=out, cinn_dir=cdir, vae_dir=vae_dir,
                                  denoiser_dir=denoiser_dir, force=force and main, progress=progress)
        train_data = sample_training_data(params, dataset, "train", **kw)
        val_data = sample_training_data(params, dataset, "val", **kw)
    t_data = time.time() - t0
    fp = embedding_fingerprint(params, digest({"train": train_data.key, "val": val_data.key}))
    ckpt = checkpoint_dir(out, fp, force)
    model = distributed.sync_batchnorm(build_embedder(params).to(devices.of(params)))
    norm = Normalizer.of(dataset)
    result = fit_embedding(model, train_data, val_data, params.embedding, norm, ckpt, fp, progress,
                           params.precision)
    best_step = load_best(ckpt, {"embedding": model}, fp)
    model.eval()
    top1 = retrieval_accuracy(embed(model, val_data.x, norm), embed(model, val_data.x_tilde, norm))
    return TrainedEmbedding(model, result.best_step or best_step, result.best_metric,
                            1.0 / len(val_data.x), result.steps, time.time() - t0, result.history,
                            t_data, result.resumed_from, top1,
                            {"train": train_data.x_tilde.shape, "val": val_data.x_tilde.shape})


def load_embedding(params: Params, dataset: CTDataset, out_dir: str | Path | None = None, *,
                   cinn_dir: str | Path | None = None, vae_dir: str | Path | None = None,
                   denoiser_dir: str | Path | None = None, path: str | Path | None = None) -> Embedder:
    """The best checkpoint of the embedding trained on the current denoisers' invariances, eval
    mode, on the profile's device.

    Raises :class:`FileNotFoundError` (naming the notebook to run) when there is none for the
    current denoisers, cINNs and settings (see :func:`~invariscope.provenance.embedding_checkpoint`). ``path``: that file,
    when the caller already has it from :func:`~invariscope.provenance.embedding_checkpoint` (which hashes every cINN, cVAE and
    denoiser checkpoint to find it).
    """
    if path is None:
        path = embedding_checkpoint(params, dataset, out_dir, cinn_dir=cinn_dir, vae_dir=vae_dir,
                               denoiser_dir=denoiser_dir)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no embedding checkpoint {path}: {_RUN}")
    model = build_embedder(params, load_pretrained=False)
    load_checkpoint(path, {"embedding": model}, {}, path.parent.name)  # this file, not its folder's best
    return model.to(devices.of(params)).eval()
