"""A two-job smoke run gives the tables of a one-job run (run_tests.sh runs this after its smoke
pipeline, which uses one job per core; set INVARISCOPE_COMPARE_SMOKE=1 to run it by hand)."""

import os
import shutil
import subprocess
import sys

import pytest

from invariscope.config.paths import repo_root

TABLES = ("table1.csv", "vae_reconstruction.csv", "controls.csv", "table2.csv", "data_physics.csv",
          "split.csv")


@pytest.mark.skipif(os.environ.get("INVARISCOPE_COMPARE_SMOKE") != "1",
                    reason="a whole smoke run: run_tests.sh runs it after its own smoke run")
def test_parallel_smoke_run_equals_a_sequential_one(tmp_path):
    parallel = repo_root() / "figures" / "smoke"
    assert all((parallel / t).is_file() for t in TABLES), "run ./run_all.sh --profile smoke first"
    root = tmp_path / "root"
    for d in ("params", "notebooks", "workflow"):
        shutil.copytree(repo_root() / d, root / d)
    env = dict(os.environ, INVARISCOPE_ROOT=str(root), INVARISCOPE_DATA=str(repo_root() / "data"))
    subprocess.run([sys.executable, "-m", "invariscope.pipeline", "--profile", "smoke", "--jobs",
                    "1"], cwd=root, env=env, check=True, capture_output=True)
    for t in TABLES:
        assert (root / "figures" / "smoke" / t).read_text() == (parallel / t).read_text(), t


@pytest.mark.skipif(os.environ.get("INVARISCOPE_COMPARE_SMOKE") != "1",
                    reason="needs the executed notebooks of a smoke run (run_tests.sh)")
def test_executed_notebooks_show_their_figures():
    """Every cell that draws a figure (plt.show()) holds a PNG in the executed notebook, and no
    progress bar leaves a widget warning."""
    import json

    folder = repo_root() / "runs" / "smoke" / "notebooks"
    executed = sorted(p for p in folder.glob("*.ipynb") if ".running" not in p.name
                      and ".failed" not in p.name)
    assert len(executed) == 34  # 28 of the paper, talk 003's 3 optimized + methods, talk 002's 2
    for path in executed:
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        drawing = [c for c in cells if "plt.show()" in "".join(c["source"])]
        for c in drawing:
            assert any("image/png" in o.get("data", {}) for o in c["outputs"]), \
                f"{path.name}: a figure cell without an image"
        text = json.dumps([o for c in cells for o in c["outputs"]])
        assert "IProgress not found" not in text, path.name
