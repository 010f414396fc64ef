"""Data-parallel training (invariscope.distributed) on the CPU with the gloo backend: two
processes reach the parameters of one process with the same global batch, resume from a
one-process checkpoint, and stay identical to each other where BatchNorm differs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp
from _denoise_data import small_denoisers, smooth_noisy_dataset
from _distributed_worker import run_jobs, worker
from conftest import TINY_PIPELINE, TINY_SPATIAL

from invariscope import distributed

pytestmark = pytest.mark.usefixtures("one_thread")

_DENOISERS = small_denoisers(iterations=3, batch_size=4)
_SPATIAL = {**TINY_SPATIAL, "vae.crop_size": 32, "vae.spatial.iterations": 3,
            "vae.spatial.batch_size": 4, "cinn.iterations": 3, "cinn.checkpoint_every": 1,
            "cinn.validate_every": 1, "denoisers.methods": ["gaussri"],
            "analysis.reference": "gaussri", "embedding.crops_per_batch": 2,
            "embedding.iterations": 3, "embedding.checkpoint_every": 1, "embedding.validate_every": 1}
_GLOBAL = {**TINY_PIPELINE, "vae.crop_size": 32, "vae.iterations": 3, "vae.batch_size": 4,
           "vae.checkpoint_every": 1, "vae.validate_every": 1}


def _jobs(root, iterations=None):
    """Every training stage, written under ``root``; ``iterations`` overrides the steps and keeps
    the stages whose checkpoints allow that (no learning-rate schedule over the iterations)."""
    def it(over, key):
        return {**over, key: iterations} if iterations else over

    den = [{"stage": "denoiser", "name": n, "out": str(root / "den"),
            "overrides": {**_DENOISERS, f"denoisers.{n}": {**_DENOISERS[f"denoisers.{n}"],
                                                           **({"iterations": iterations} if iterations else {})}}}
           for n in ("cnn10", "wganvgg", "dugan")]
    shared = {"denoiser_dir": str(root.parent / "den-none")}
    jobs = den + [
        {"stage": "vae", "name": "gaussri", "out": str(root / "vae"), "overrides": it(_SPATIAL, "vae.spatial.iterations"), **shared},
        {"stage": "vae", "name": "unconditional", "out": str(root / "vae_global"), "dump": True,
         "overrides": it(_GLOBAL, "vae.iterations"), **shared},
        # the cINN and the embedding read the one-process run's cVAE and cINN (same fingerprints)
        {"stage": "cinn", "name": "gaussri", "out": str(root / "cinn"), "overrides": it(_SPATIAL, "cinn.iterations"),
         "vae_dir": str(root.parent / "one" / "vae"), **shared},
        {"stage": "embedding", "out": str(root / "emb"), "dump": True, "overrides": it(_SPATIAL, "embedding.iterations"),
         "vae_dir": str(root.parent / "one" / "vae"), "cinn_dir": str(root.parent / "one" / "cinn"), **shared},
    ]
    if iterations:
        jobs = [j for j in jobs if j.get("name") in ("cnn10", "dugan") or j["stage"] == "cinn"]
    return jobs


def _spawn(jobs, ds_root, tmp, size=2):
    mp.spawn(worker, args=(size, str(tmp / f"init-{len(list(tmp.glob('init-*')))}"), jobs, ds_root),
             nprocs=size, join=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process, two processes, and one process for 1 step resumed by two processes."""
    root = tmp_path_factory.mktemp("ddp")
    ds = smooth_noisy_dataset(root / "ds")
    before = torch.get_num_threads()
    run_jobs(_jobs(root / "one"), str(ds.root))
    _spawn(_jobs(root / "two"), str(ds.root), root)
    run_jobs(_jobs(root / "resume", iterations=1), str(ds.root))
    _spawn(_jobs(root / "resume", iterations=3), str(ds.root), root)
    torch.set_num_threads(before)
    return root


def _last(path):
    return torch.load(path / "last.pt", weights_only=False)


def _assert_close(a, b, what):
    """Equal to float tolerance. Adam normalizes each gradient element, so the few elements
    whose gradient is nearly zero move by up to a fraction of the learning rate depending on the
    rounding of the batch sums: at most 0.1 % of the elements may exceed the tight tolerance, by
    no more than 5e-5 (half an Adam step at lr 1e-4)."""
    assert a["step"] == b["step"], what
    for m, state in a["modules"].items():
        for k, v in state.items():
            w = b["modules"][m][k]
            if not v.is_floating_point():
                assert torch.equal(v, w), f"{what} {m}.{k}"
                continue
            diff = (v - w).abs()
            loose = diff > 2e-6 + 1e-4 * w.abs()
            assert loose.float().mean() <= 1e-3, f"{what} {m}.{k}: {int(loose.sum())} of {v.numel()} differ"
            assert diff.max() <= 5e-5, f"{what} {m}.{k}: max difference {float(diff.max()):.2e}"


@pytest.mark.parametrize("run, stage", [
    *[("two", s) for s in ("den/cnn10", "den/wganvgg", "den/dugan", "vae/gaussri", "cinn/gaussri")],
    *[("resume", s) for s in ("den/cnn10", "den/dugan", "cinn/gaussri")]])
def test_two_processes_equal_one_with_the_same_global_batch(runs, stage, run):
    """Generators, critics and discriminators (every network with its Adam state), the spatial
    cVAE (per-sample flips and reparameterisation noise) and the convolutional cINN; ``resume``:
    one process trained the first step, two processes resumed from its checkpoint."""
    one, other = _last(runs / "one" / stage), _last(runs / run / stage)
    assert one["step"] == 3
    _assert_close(one, other, f"{run}:{stage}")
    for name, state in one["optimizers"].items():  # Adam's moments too
        for pid, st in state["state"].items():
            v, w = st["exp_avg_sq"], other["optimizers"][name]["state"][pid]["exp_avg_sq"]
            torch.testing.assert_close(v, w, rtol=1e-2, atol=1e-3 * float(v.abs().max()) + 1e-20)
    assert len(one["history"]) == len(other["history"]) == 3  # rank 0 logged every step


@pytest.mark.parametrize("stage", ["vae_global", "emb"])
def test_batchnorm_networks_stay_identical_across_processes(runs, stage):
    """The global VAE and the embedding's ResNet normalize per process on the CPU (no CPU
    SyncBatchNorm), so they differ from one process, but the averaged gradients keep every
    process's weights identical."""
    folder = runs / "two" / stage
    r0, r1 = (torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_single_process_helpers_are_the_identity():
    w = distributed.world()
    assert (w.rank, w.size, w.is_main) == (0, 1, True)
    batch = (torch.arange(6), {"a": torch.ones(6, 2)})
    assert distributed.shard(batch) is batch
    torch.manual_seed(3)
    a = distributed.randn_like(torch.empty(4, 2))
    torch.manual_seed(3)
    assert torch.equal(a, torch.randn(4, 2))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert distributed.mean_logs({"l": 1.5}) == {"l": 1.5}
    assert distributed.broadcast_float(None) is None


def test_shard_splits_rows_and_refuses_uneven_batches():
    w = distributed.World(rank=1, size=2)
    x = torch.arange(8).view(4, 2)
    assert torch.equal(distributed.shard(x, w), x[2:])
    assert torch.equal(distributed.shard((x, torch.tensor(5)), w)[1], torch.tensor(5))
    with pytest.raises(ValueError, match="multiple of the process count"):
        distributed.shard(torch.arange(5), w)
    assert copy.copy(w).is_main is False


# ------------------------------------------------------------------------ the command line
def test_torchrun_trains_a_stage_where_its_notebook_finds_it(tmp_path):
    """``torchrun -m invariscope.trainer denoiser:cnn10``: two gloo processes train the smoke
    profile's CNN-10 into runs/<profile>/denoisers, where notebook 01 looks for it."""
    import os
    import subprocess
    import sys

    from invariscope.config.paths import repo_root

    (tmp_path / "params").mkdir()
    profile = tmp_path / "params" / "ddp.yaml"
    profile.write_text(f"base: {repo_root() / 'params' / 'smoke.yaml'}\nrun_name: ddp\n"
                       "denoisers:\n  cnn10: {iterations: 2, batch_size: 4, patch_size: 32, lr: 1.0e-3}\n")
    env = {**os.environ, "INVARISCOPE_ROOT": str(tmp_path), "INVARISCOPE_DATA": str(tmp_path / "data"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root() / "lib")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "invariscope.trainer", "denoiser:cnn10", "--profile", str(profile)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs" / "ddp" / "denoisers" / "cnn10" / "last.pt", weights_only=False)
    assert ckpt["step"] == 2 and len(ckpt["history"]) >= 1
    bad = subprocess.run([sys.executable, "-m", "invariscope.trainer", "table1", "--profile", str(profile)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "stage must be one of denoiser, vae, cinn, embedding" in bad.stderr
