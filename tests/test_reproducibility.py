"""The simulated cohort is the same on every machine: noise draws of fixed random-number
consumption, sums that do not depend on the thread count, and a content hash that records it."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from invariscope.config.params import load_params
from invariscope.data import cohort, ctsim
from invariscope.data.dataset import content_hash
from invariscope.provenance import simulation_key

TINY = {"data.split": {"train": 1, "val": 1, "test": 1}, "data.simulation.image_size": 64,
        "data.simulation.n_views": 60, "data.simulation.slices_per_patient": [1, 2]}

#: content hash of the TINY smoke cohort; it changes only when the simulator's numbers change
#: (then bump ``format`` in cohort.simulation_key and update this value and the committed tables)
TINY_HASH = "c048d3263800843f"


@pytest.mark.parametrize("lam", [0.02, 0.7, 3.0, 17.0, 250.0, 6000.0])
def test_poisson_quantile_equals_scipy_ppf(lam):
    u = np.random.default_rng(0).random(4000)
    u[:3] = [1e-12, 0.5, 1 - 1e-12]
    got = ctsim.poisson_quantile(u, np.full_like(u, lam))
    assert np.array_equal(got, scipy.stats.poisson.ppf(u, lam))


def test_poisson_quantile_draws_follow_the_poisson_law():
    rng = np.random.default_rng(1)
    k = ctsim.poisson_quantile(rng.random(200_000), np.full(200_000, 4.0)).astype(int)
    counts = np.bincount(k, minlength=16)[:16]
    expected = scipy.stats.poisson.pmf(np.arange(16), 4.0) * k.size
    expected[-1] += scipy.stats.poisson.sf(15, 4.0) * k.size  # the tail in the last bin
    counts[-1] += (k >= 16).sum()
    assert scipy.stats.chisquare(counts, expected * counts.sum() / expected.sum()).pvalue > 1e-3
    big = ctsim.poisson_quantile(rng.random(200_000), np.full(200_000, 3000.0))
    assert abs(big.mean() - 3000) < 4 * np.sqrt(3000 / big.size)
    assert abs(big.var() / 3000 - 1) < 0.02


def test_noise_ignores_last_bit_changes_of_the_expected_counts():
    """Perturb every noise-free line integral by a relative 1e-12: the same noise realization
    (numpy's rejection sampler would shift its random stream at the first changed decision)."""
    p = np.random.default_rng(2).uniform(0.0, 6.0, (3, 60, 91))
    n0 = np.array([600.0, 6000.0])
    a = ctsim.measured_line_integrals(p, n0, 1.0, np.random.default_rng(5))
    b = ctsim.measured_line_integrals(p * (1 + 1e-12), n0, 1.0, np.random.default_rng(5))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert a.shape == (2, 3, 60, 91) and a.dtype == np.float32


def test_backprojection_does_not_depend_on_the_thread_count():
    """The view blocks are fixed (not one per CPU), so the sum over blocks is too."""
    proj = ctsim.ParallelBeamProjector(48, 200.0, 40)
    assert len(proj._at_blocks) == ctsim.N_BLOCKS
    sino = np.random.default_rng(3).normal(size=(2, 40, proj.n_det)).astype(np.float32)
    one_by_one = sum(proj._at_blocks[k] @ sino[:, proj.view_bounds[k]:proj.view_bounds[k + 1]]
                     .reshape(2, -1).T for k in range(ctsim.N_BLOCKS))
    np.testing.assert_array_equal(proj.backproject(sino).reshape(2, -1), one_by_one.T)


_PATIENT_HASH = textwrap.dedent("""
    import hashlib
    from invariscope.data import cohort
    from invariscope.config.params import load_params
    sim = load_params("smoke").data.simulation.model_copy(update={"image_size": 96, "n_views": 90})
    low, full, _, _ = cohort.simulate_patient(sim, 3)
    print(hashlib.sha256(low.tobytes() + full.tobytes()).hexdigest())
""")


def _other_cpu_env() -> dict[str, str]:
    """The environment of 'another machine' on this one: numpy's dispatched SIMD kernels
    (AVX2, AVX-512) off, OpenBLAS on an old core type, glibc's FMA variants of libm off."""
    from numpy._core._multiarray_umath import __cpu_dispatch__  # the kernels numpy may pick

    env = dict(os.environ, OPENBLAS_CORETYPE="Sandybridge",
               GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX2_Usable,-FMA_Usable,-AVX512F_Usable")
    if __cpu_dispatch__:
        env["NPY_DISABLE_CPU_FEATURES"] = " ".join(__cpu_dispatch__)
    return env


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_simulated_patient_is_the_same_on_other_cpu_features_and_one_thread():
    run = [sys.executable, "-c", _PATIENT_HASH]
    here = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    one_cpu = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
    other = subprocess.run([sys.executable, "-c", one_cpu + _PATIENT_HASH], env=_other_cpu_env(),
                           capture_output=True, text=True, check=True).stdout
    assert len(here.strip()) == 64 and here == other


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("INVARISCOPE_DATA", str(tmp_path / "data"))
    params = load_params("smoke", TINY)
    return params, cohort.prepare_dataset(params, progress=False)


def test_cohort_hash_is_recorded_and_pinned(tiny):
    params, ds = tiny
    assert ds.manifest["content_hash"] == ds.content_hash
    assert content_hash(ds.root, ds.manifest["patients"]) == ds.content_hash
    assert ds.content_hash == TINY_HASH, (
        "the simulator's numbers changed: if on purpose, bump `format` in "
        "provenance.simulation_key and update TINY_HASH and the committed tables")


def test_cohort_hash_changes_with_one_value(tiny):
    params, ds = tiny
    pid = ds.patients("test")[0]
    f = ds.root / pid / "low.npy"
    a = np.load(f)
    a[0, 10, 10] += 1
    np.save(f, a)
    assert content_hash(ds.root, ds.manifest["patients"]) != ds.content_hash


def test_committed_hash_check(tiny, tmp_path: Path):
    params, ds = tiny
    csv = tmp_path / "data_physics.csv"
    ok, msg = cohort.committed_hash_check(ds, params.data, csv)
    assert ok and "no committed" in msg
    key = simulation_key(params.data)
    csv.write_text(f",value\n{cohort.HASH_ROW},{ds.content_hash}\n{cohort.KEY_ROW},{key}\n")
    ok, msg = cohort.committed_hash_check(ds, params.data, csv)
    assert ok and "identical" in msg
    csv.write_text(f",value\n{cohort.HASH_ROW},ffffffffffffffff\n{cohort.KEY_ROW},{key}\n")
    ok, msg = cohort.committed_hash_check(ds, params.data, csv)
    assert not ok and "ffffffffffffffff" in msg and ds.content_hash in msg
    csv.write_text(f",value\n{cohort.HASH_ROW},ffffffffffffffff\n{cohort.KEY_ROW},other\n")
    assert cohort.committed_hash_check(ds, params.data, csv)[0]


def test_committed_hash_check_reads_git_when_the_file_is_gone(tiny, tmp_path: Path, monkeypatch):
    """Snakemake deletes data_physics.csv before the data job: the check reads git's HEAD copy."""
    import subprocess

    params, ds = tiny
    root = tmp_path / "repo"
    (root / "params").mkdir(parents=True)
    csv = root / "figures" / "tiny" / "data_physics.csv"
    csv.parent.mkdir(parents=True)
    key = simulation_key(params.data)
    csv.write_text(f",value\n{cohort.HASH_ROW},ffffffffffffffff\n{cohort.KEY_ROW},{key}\n")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
    csv.unlink()
    monkeypatch.setenv("INVARISCOPE_ROOT", str(root))
    ok, msg = cohort.committed_hash_check(ds, params.data, csv)
    assert not ok and "ffffffffffffffff" in msg
