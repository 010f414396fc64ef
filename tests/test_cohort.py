"""The dataset cache of a profile: reused, rebuilt on request (``force``), never deleted elsewhere."""

from pathlib import Path

import numpy as np
import pytest

from invariscope.config.params import load_params
from invariscope.data import cohort
from invariscope.data.dataset import DatasetError

TINY = {"data.split": {"train": 1, "val": 1, "test": 1}, "data.simulation.image_size": 64,
        "data.simulation.n_views": 60, "data.simulation.slices_per_patient": [1, 1]}


@pytest.fixture
def params(tmp_path, monkeypatch):
    monkeypatch.setenv("INVARISCOPE_DATA", str(tmp_path / "data"))
    return load_params("smoke", TINY)


def test_force_rebuilds_the_cached_cohort(params):
    ds = cohort.prepare_dataset(params, progress=False)
    root = cohort.simulated_root(params.data)
    assert ds.root == root and (root / "manifest.json").is_file()
    pid = ds.patients("test")[0]
    before = ds.volume(pid, "low").copy()
    marker = root / "stale.txt"
    marker.write_text("left by an older simulator")

    cohort.prepare_dataset(params, progress=False)  # cached: reused as it is
    assert marker.is_file()

    again = cohort.prepare_dataset(params, progress=False, force=True)
    assert not marker.exists() and (root / "manifest.json").is_file()
    assert np.array_equal(again.volume(pid, "low"), before)  # same seeds, same cohort


def test_cache_removal_stays_inside_the_data_folder(params, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(DatasetError, match="refusing to delete"):
        cohort._remove_cache(outside)
    assert outside.is_dir()


def test_relative_mayo_root_is_taken_from_the_repo_root(params):
    from invariscope.config.paths import repo_root

    rel = params.data.model_copy(update={"source": "mayo", "mayo_root": "data/LDCT"})
    assert cohort.mayo_root(rel) == (repo_root() / "data" / "LDCT").resolve()
    absolute = rel.model_copy(update={"mayo_root": "/srv/LDCT"})
    assert cohort.mayo_root(absolute) == Path("/srv/LDCT").resolve()
    assert cohort.mayo_import_dir(rel) != cohort.mayo_import_dir(absolute)


def test_relative_paths_follow_one_rule(tmp_path, monkeypatch):
    """A relative path in a params file: next to that file first, then the repository root; a
    missing Mayo folder is an error that states the rule."""
    from invariscope.config.paths import RELATIVE_RULE

    monkeypatch.setenv("INVARISCOPE_DATA", str(tmp_path / "data"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "LDCT").mkdir()
    prof = tmp_path / "mine" / "p.yaml"
    prof.write_text("base: paper\nrun_name: mine\ndata:\n  mayo_root: LDCT\n")
    params = load_params(str(prof))
    assert cohort.mayo_root(params.data, params.source_file) == (tmp_path / "mine" / "LDCT")
    prof.write_text("base: paper\nrun_name: mine\ndata:\n  mayo_root: nowhere\n")
    params = load_params(str(prof))
    with pytest.raises(DatasetError, match=r"data.mayo_root = 'nowhere' .*: no folder .*nowhere"):
        cohort.prepare_dataset(params, progress=False)
    assert RELATIVE_RULE.startswith("a relative path in a params file is looked up next to")
