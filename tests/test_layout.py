"""The library's layout: figures in one module, stage hand-offs through library functions,
provenance keys that do not drift, imports visible in the module graph, one notebook setup."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from invariscope import handoffs, provenance
from invariscope.config.paths import repo_root
from invariscope.notebook import setup
from invariscope.stages import invariances as inv

LIB = repo_root() / "lib" / "invariscope"
NOTEBOOKS = sorted((repo_root() / "notebooks").glob("*.ipynb"))
#: why an import may sit inside a function (the comment on the line above it says which)
_ALLOWED = re.compile(r"not a cycle|workflow imports this module|imports torch")


def _code(nb: Path) -> str:
    cells = json.loads(nb.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_only_the_figures_module_draws():
    """Every figure is drawn in invariscope.figures: no other module imports matplotlib."""
    drawing = sorted(str(p.relative_to(LIB)) for p in LIB.rglob("*.py") if "matplotlib" in p.read_text())
    assert drawing == ["figures.py"]


def test_imports_inside_functions_say_why():
    """A library import inside a function is there for a reason its comment names (a cycle, or
    keeping torch out of the command line); every other one belongs at the top of the module."""
    hidden = []
    for path in LIB.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.level or "invariscope" in (inner.module or "")):
                    here, above = lines[inner.lineno - 1], lines[inner.lineno - 2]
                    if not (_ALLOWED.search(here) or _ALLOWED.search(above)):
                        hidden.append(f"{path.relative_to(LIB)}:{inner.lineno}")
    assert hidden == [], f"imports inside functions without a reason: {hidden}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_share_one_setup_and_write_no_handoffs(nb):
    code = _code(nb)
    assert "from invariscope.notebook import setup" in code and "setup(profile, data_root" in code
    assert "load_params(" not in code and "prepare_dataset(" not in code  # done by setup
    for handoff in ("test_metrics.csv", "_controls.json", "summary.json", "report.json"):
        assert handoff not in code, f"{nb.name} names the hand-off {handoff}: use invariscope.handoffs"


def test_setup_gives_params_folders_and_no_data_when_not_asked():
    nb = setup("smoke", dataset=False)
    assert nb.params.profile == "smoke" and nb.dataset is None
    assert nb.figures.is_dir() and nb.figures.name == "smoke"
    assert nb.dir("cinn") == nb.runs / "cinn" == provenance.stage_dir(nb.params, "cinn")
    with pytest.raises(ValueError, match="unknown stage folder 'cinns'.*cinn"):
        nb.dir("cinns")


def test_controls_of_an_older_version_are_completed_from_the_stored_sets(tmp_path, capsys):
    """A controls file that lacks a newer measure (its stage is up to date, so nothing reruns it)
    gets that measure from its invariance sets, unchanged otherwise and without resampling."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 50, (2, 32, 32))
    xt = (x[:, None] + rng.normal(0, 20, (2, 3, 32, 32))).astype(np.float16)
    res = {"x": x, "y": x - 1.0, "y_hat": x, "x_tilde": xt, "f_x_tilde": xt * 0,
           "crops": np.arange(2)}
    inv.save_invariances(tmp_path / "cnn10.npz", res)
    new = {"denoiser": "cnn10", **inv.control_measures(res, None), "n_crops": 2}
    old = {k: v for k, v in new.items() if not k.endswith("_q_nyquist")}
    handoffs.write_controls(old, tmp_path)
    (row,) = handoffs.read_controls(tmp_path, ["cnn10"])
    assert row == pytest.approx(new, nan_ok=True)
    assert "added hf_share_q_nyquist, hf_share_ld_noise_q_nyquist" in capsys.readouterr().out
    assert handoffs.read_controls(tmp_path, ["cnn10"]) == [row]  # rewritten: read as it is now
    (tmp_path / "cnn10.npz").unlink()
    handoffs.write_controls(old, tmp_path)
    with pytest.raises(FileNotFoundError, match="04_invariances.ipynb"):
        handoffs.read_controls(tmp_path, ["cnn10"])


def test_handoffs_round_trip_and_name_the_notebook_to_run(tmp_path):
    per_slice = pd.DataFrame({"patient": ["S001", "S001"], "slice": [0, 1], "psnr": [25.0, 26.5]})
    handoffs.write_test_metrics(per_slice, tmp_path, "cnn10")
    pd.testing.assert_frame_equal(handoffs.read_test_metrics(tmp_path, "cnn10"), per_slice)
    with pytest.raises(FileNotFoundError, match="01_denoiser.ipynb for redcnn"):
        handoffs.read_test_metrics(tmp_path, "redcnn")

    full = dict.fromkeys(inv.MEASURES, 0.5)
    rows = [{"denoiser": "gaussri", **full, "sd_ratio_smoothed": 14.9},
            {"denoiser": "cnn10", **full, "sd_ratio_smoothed": 1.2}]
    for row in rows:
        handoffs.write_controls(row, tmp_path)
    assert handoffs.read_controls(tmp_path, ["gaussri", "cnn10"]) == rows
    with pytest.raises(FileNotFoundError, match="04_invariances.ipynb for dugan"):
        handoffs.read_controls(tmp_path, ["gaussri", "dugan"])

    handoffs.write_vae_report({"vae": "unconditional", "mae_hu": 40.0}, tmp_path)
    assert handoffs.read_vae_report(None, tmp_path)["mae_hu"] == 40.0
    with pytest.raises(FileNotFoundError, match="02_vae.ipynb with denoiser = 'redcnn'"):
        handoffs.read_vae_report("redcnn", tmp_path)

    handoffs.write_embedding_summary({"steps": 4}, tmp_path)
    assert handoffs.read_embedding_summary(tmp_path) == {"steps": 4}


def test_provenance_keys_are_frozen():
    """The payloads of the keys are frozen: a change makes every finished run of every user stale
    (these values are those of the releases that trained the committed results)."""
    assert provenance.digest({"a": 1, "b": [1, 2]}) == "8baa73198470"
    crops = [(0, 3, 10, 12), (1, 0, 5, 7)]
    assert provenance.invariance_key(crops, 16, 1332, False, "test", "m") == "bbfd3b3c80c157b5"
    assert provenance.invariance_key(crops, 16, 1332, False, "train", "m", outputs=False) \
        == "b0b4c11cac72f02c"
