"""The executed companion (figures/<profile>/notebooks/): compacted, current, with figures."""

from __future__ import annotations

import json
import shutil

import pytest

from invariscope import companion
from invariscope.config.paths import figures_dir, repo_root


def _nb(cells):
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _code(src, outputs=(), tags=()):
    return {"cell_type": "code", "source": src, "metadata": {"tags": list(tags)},
            "outputs": list(outputs), "execution_count": 1}


def _stream(text, name="stderr"):
    return {"output_type": "stream", "name": name, "text": text}


def test_progress_bars_are_reduced_to_their_final_state():
    frames = [_stream("\rtrain:   0%|    | 0/4"), _stream("\rtrain:  50%|##  | 2/4"),
              _stream("\rtrain: 100%|####| 4/4\n"), _stream("best step 3\n", "stdout"),
              {"output_type": "display_data", "data": {"image/png": "iVBOR"}, "metadata": {}},
              _stream("a\n"), _stream("b\r\n")]
    nb = companion.compact_streams(_nb([_code("train()", frames)]))
    outs = nb["cells"][0]["outputs"]
    assert [o["output_type"] for o in outs] == ["stream", "stream", "display_data", "stream"]
    assert outs[0]["text"] == "train: 100%|####| 4/4\n" and outs[1]["text"] == "best step 3\n"
    assert outs[3]["text"] == "a\nb\n"


def test_an_executed_notebook_has_the_code_hash_of_its_source():
    source = _nb([_code("profile = 'smoke'", tags=["parameters"]), _code("print(1)")])
    executed = _nb([source["cells"][0], _code("profile = 'default'\n", tags=["injected-parameters"]),
                    _code("print(1)", [_stream("1\n", "stdout")])])
    assert companion.notebook_code_sha(executed) == companion.notebook_code_sha(source)
    executed["cells"][2]["source"] = "print(2)"
    assert companion.notebook_code_sha(executed) != companion.notebook_code_sha(source)


def test_publish_then_stale_names_what_changed(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    shutil.copytree(repo_root() / "params", root / "params")
    (root / "notebooks").mkdir()
    src = _nb([_code("x = 1", tags=["parameters"]), _code("print(x)")])
    (root / "notebooks" / "04_invariances.ipynb").write_text(json.dumps(src))
    monkeypatch.setenv("INVARISCOPE_ROOT", str(root))
    runs = root / "runs" / "p" / "notebooks"
    runs.mkdir(parents=True)
    executed = _nb([src["cells"][0], _code("print(x)", [_stream("\r1/2"), _stream("\r2/2\n")])])
    (runs / "04_invariances_cnn10.ipynb").write_text(json.dumps(executed))
    results = figures_dir("p")
    results.mkdir(parents=True)
    (results / "table2.csv").write_text("a,b\n1,2\n")

    out = companion.publish("p", [runs / "04_invariances_cnn10.ipynb"])
    assert companion.stale("p") == []
    published = json.loads((out / "04_invariances_cnn10.ipynb").read_text())
    assert published["cells"][1]["outputs"] == [_stream("2/2\n")]
    assert "04_invariances_cnn10.ipynb" in (out / "README.md").read_text()

    (results / "table2.csv").write_text("a,b\n1,3\n")
    (results / "figure7.png").write_bytes(b"png")
    assert companion.stale("p") == ["figure7.png changed since the executed notebooks were published",
                                    "table2.csv changed since the executed notebooks were published"]
    companion.publish("p", [runs / "04_invariances_cnn10.ipynb"])
    src["cells"][1]["source"] = "print(x + 1)"
    (root / "notebooks" / "04_invariances.ipynb").write_text(json.dumps(src))
    assert companion.stale("p") == ["04_invariances_cnn10.ipynb: the code of "
                                    "notebooks/04_invariances.ipynb changed since it ran"]
    shutil.rmtree(out)
    assert "manifest.json is missing" in companion.stale("p")[0]


DEFAULT = figures_dir("default") / companion.FOLDER


def test_committed_default_companion_is_current():
    """figures/default/notebooks/ comes from the run that wrote figures/default/ and from the
    notebooks as they are now (regenerate both with ./run_all.sh)."""
    assert companion.stale("default") == []


@pytest.mark.parametrize("name", sorted(p.name for p in DEFAULT.glob("*.ipynb")))
def test_committed_notebooks_show_their_figures_without_progress_noise(name):
    nb = json.loads((DEFAULT / name).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        outs = cell.get("outputs", [])
        if "plt.show()" in src.splitlines():  # an unconditional figure
            assert any("image/png" in o.get("data", {}) for o in outs), f"{name}: no figure in\n{src}"
        for o in outs:
            assert o["output_type"] != "error", f"{name}: an error output"
            text = "".join(o.get("text", ""))
            assert "\r" not in text and "IProgress" not in text and "TqdmWarning" not in text
