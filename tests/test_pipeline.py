"""run_all.sh's engine: planning, dry run, argument errors, papermill-ready notebooks."""

from __future__ import annotations

import json

import nbformat
import pytest

from invariscope import pipeline
from invariscope.paths import repo_root


def test_dry_run_lists_stages_and_runs_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("INVARISCOPE_ROOT", str(repo_root()))
    assert pipeline.run(["--profile", "smoke", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "data" in out and "runs/smoke/notebooks/00_data.ipynb" in out


def test_paper_profile_dry_run_with_data_folder(capsys, tmp_path):
    assert pipeline.run(["--profile", "paper", "--data", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[paper] data" in out
    for d in ("cnn10", "redcnn", "wganvgg", "dugan", "gaussri"):
        assert f"denoiser[{d}]" in out


def test_denoiser_subset_and_stage_selection(capsys):
    assert pipeline.run(["--profile", "smoke", "--only", "denoiser", "--denoisers", "redcnn,gaussri",
                         "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "denoiser[redcnn]" in out and "denoiser[gaussri]" in out
    assert "denoiser[cnn10]" not in out and "] data " not in out
    assert pipeline.run(["--profile", "smoke", "--denoisers", "unet", "--dry-run"]) == 2
    assert "not in the profile's denoisers" in capsys.readouterr().err


def test_bad_arguments_are_reported(capsys, tmp_path):
    assert pipeline.run(["--profile", "nope", "--dry-run"]) == 2
    assert "available profiles" in capsys.readouterr().err
    assert pipeline.run(["--profile", "smoke", "--data", str(tmp_path / "missing"), "--dry-run"]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown stage"):
        pipeline.run(["--profile", "smoke", "--only", "nostage", "--dry-run"])


def test_stamp_changes_with_parameters():
    from invariscope.params import load_params

    data, den = pipeline.plan("smoke", None, None, None, ["cnn10"])[:2]
    dump = load_params("smoke").model_dump(mode="json")
    reseeded = load_params("smoke", {"seed": 1}).model_dump(mode="json")
    assert pipeline.job_stamp(den, dump, []) != pipeline.job_stamp(den, reseeded, [])
    # the data stage reads data.* only (the simulation has its own seed)
    assert pipeline.job_stamp(data, dump, []) == pipeline.job_stamp(data, reseeded, [])
    resimulated = load_params("smoke", {"data.simulation.seed": 1}).model_dump(mode="json")
    assert pipeline.job_stamp(data, dump, []) != pipeline.job_stamp(data, resimulated, [])


@pytest.mark.parametrize("stage", pipeline.STAGES, ids=lambda s: s.name)
def test_every_notebook_has_a_parameters_cell_defaulting_to_smoke(stage):
    nb = nbformat.read(repo_root() / "notebooks" / stage.notebook, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    assert 'profile = "smoke"' in cells[0].source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit notebooks without outputs"


EXAMPLE = str(repo_root() / "examples" / "own_denoiser" / "params.yaml")


@pytest.mark.parametrize("profile", ["smoke", "default", "paper", EXAMPLE],
                         ids=["smoke", "default", "paper", "own_denoiser"])
@pytest.mark.parametrize("stage", pipeline.STAGES, ids=lambda s: s.name)
def test_papermill_prepare_only(stage, profile, tmp_path):
    """Every notebook accepts every params file (papermill --prepare-only)."""
    import papermill as pm

    out = tmp_path / "out.ipynb"
    parameters = {"profile": profile, "data_root": ""}
    if stage.per_denoiser:
        parameters["denoiser"] = "redcnn"
    pm.execute_notebook(str(repo_root() / "notebooks" / stage.notebook), str(out),
                        parameters=parameters, prepare_only=True, kernel_name="python3")
    nb = json.loads(out.read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and f'profile = "{profile}"' in "".join(injected[0]["source"])


@pytest.mark.parametrize("stage", pipeline.STAGES, ids=lambda s: s.name)
def test_papermill_parses_every_parameter(stage):
    """A comment papermill cannot parse would silently drop the parameter from its inspection."""
    from papermill.translators import PythonTranslator

    nb = nbformat.read(repo_root() / "notebooks" / stage.notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assigned = [ln.split("=")[0].strip() for ln in cell.source.splitlines() if "=" in ln]
    assert [p.name for p in PythonTranslator.inspect(cell)] == assigned


def test_stamps_depend_only_on_what_a_job_reads():
    from invariscope.params import load_params

    methods = ["cnn10", "redcnn", "gaussri"]
    jobs = pipeline.plan("smoke", None, None, None, methods)
    base = pipeline.stamps(jobs, load_params("smoke").model_dump(mode="json"))
    retuned = pipeline.stamps(jobs, load_params(
        "smoke", {"denoisers.redcnn.lr": 3e-4}).model_dump(mode="json"))
    changed = {label for label in base if base[label] != retuned[label]}
    # RED-CNN and everything downstream of it reruns; CNN-10's chain and the data do not
    assert {"denoiser[redcnn]", "vae[redcnn]", "cinn[redcnn]", "invariances[redcnn]", "table1",
            "figure4", "figure5"} <= changed
    assert not changed & {"data", "denoiser[cnn10]", "vae[cnn10]", "cinn[gaussri]", "vae[unconditional]"}
    later = pipeline.stamps(jobs, load_params("smoke", {"cinn.lr": 1e-4}).model_dump(mode="json"))
    assert {lbl for lbl in base if base[lbl] != later[lbl]} == {
        *(f"cinn[{m}]" for m in methods), *(f"invariances[{m}]" for m in methods), "figure5",
        "embedding", "analysis"}


def test_selection_flags_do_not_change_stamps(capsys, tmp_path, monkeypatch):
    """--only/--denoisers runs a job under the same stamp as a full run, so it is not redone."""
    from invariscope.params import load_params

    dump = load_params("smoke").model_dump(mode="json")
    full = pipeline.stamps(pipeline.plan("smoke", None, None, None, ["cnn10", "gaussri"]), dump)
    part = pipeline.stamps(pipeline.plan("smoke", None, None, None, ["cnn10", "gaussri"]), dump)
    assert full == part


def test_own_denoiser_example_dry_run_reuses_the_default_run(capsys):
    """The example params file adds one method to the default profile's run folder."""
    assert pipeline.run(["--profile", EXAMPLE, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[default] denoiser[smooth]" in out and "[default] invariances[smooth]" in out


def test_force_reruns_from_scratch_without_changing_stamps(tmp_path, monkeypatch, capsys):
    """--force passes force=True to notebooks that take it; the stamps stay those of a plain run."""
    import shutil

    import papermill

    for d in ("params", "notebooks"):
        shutil.copytree(repo_root() / d, tmp_path / d)
    monkeypatch.setenv("INVARISCOPE_ROOT", str(tmp_path))
    calls = []

    def fake_execute(src, dst, parameters, **kw):
        calls.append((src.rsplit("/", 1)[-1], dict(parameters)))
        (tmp_path / dst).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    args = ["--profile", "smoke", "--from", "figure5", "--denoisers", "gaussri"]
    assert pipeline.run(args + ["--force"]) == 0
    forced = {nb: p.get("force") for nb, p in calls}
    assert forced == {"04b_figure5_controls.ipynb": None, "05_embedding.ipynb": True,
                      "06_analysis.ipynb": True}
    calls.clear()
    assert pipeline.run(args) == 0          # a plain run finds the forced runs up to date
    assert calls == []
