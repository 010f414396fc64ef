"""run_all.sh's engine: planning, dry run, argument errors, papermill-ready notebooks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

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
PARAMS_FILES = sorted(p.stem for p in (repo_root() / "params").glob("*.yaml"))


@pytest.mark.parametrize("profile", [*PARAMS_FILES, EXAMPLE], ids=[*PARAMS_FILES, "own_denoiser"])
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


def test_spatial_profiles_train_the_spatial_unconditional_vae_too():
    jobs = pipeline.plan("smoke", None, "vae", None, ["cnn10", "gaussri"], spatial=True)
    assert [j.denoiser for j in jobs] == ["unconditional", "unconditional_spatial", "cnn10", "gaussri"]
    jobs = pipeline.plan("paper", None, "vae", None, ["cnn10"])
    assert [j.denoiser for j in jobs] == ["unconditional", "cnn10"]


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


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """A copy of params/ and notebooks/ as the repo root, papermill replaced by a recorder:
    returns (root, calls), calls being (notebook, parameters) of every execution."""
    import papermill

    root = tmp_path / "root"
    for d in ("params", "notebooks"):
        shutil.copytree(repo_root() / d, root / d)
    monkeypatch.setenv("INVARISCOPE_ROOT", str(root))
    monkeypatch.delenv("INVARISCOPE_CALLER_CWD", raising=False)
    calls = []

    def fake_execute(src, dst, parameters, **kw):
        calls.append((src.rsplit("/", 1)[-1], dict(parameters)))
        (root / dst).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    return root, calls


def _statuses(out: str) -> dict[str, str]:
    """Job label -> "run" / "skip" from run()'s printed lines."""
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("[") and " -> " in ln]
    return {r[1]: "skip" if "skip" in r else "run" for r in rows}


def test_selected_jobs_run_under_their_full_plan_stamps(fake_root, capsys):
    """--only/--from/--denoisers run a job under the stamp a full run gives it (the stamps come
    from the full plan, upstream jobs and all methods included), so a full run skips it."""
    from invariscope.params import load_params

    root, calls = fake_root
    for selection in (["--only", "analysis"], ["--from", "cinn", "--denoisers", "gaussri"],
                      ["--only", "vae", "--denoisers", "redcnn"]):
        assert pipeline.run(["--profile", "smoke", *selection]) == 0
    capsys.readouterr()
    assert pipeline.run(["--profile", "smoke", "--dry-run"]) == 0
    status = _statuses(capsys.readouterr().out)
    assert {label for label, s in status.items() if s == "skip"} == {
        "vae[unconditional]", "vae[unconditional_spatial]", "vae[redcnn]", "cinn[gaussri]",
        "invariances[gaussri]", "figure5", "embedding", "analysis"}
    params = load_params("smoke")
    full = pipeline.stamps(pipeline.plan("smoke", None, None, None, params.denoisers.methods,
                                         spatial=True), params.model_dump(mode="json"))
    done = json.loads((root / "runs/smoke/notebooks/06_analysis.done.json").read_text())
    assert done["stamp"] == full["analysis"]


def test_force_with_denoisers_keeps_the_shared_extra_runs(fake_root):
    """--force --denoisers reruns the picked methods' jobs, not the unconditional VAE they share
    (unless it is out of date); --force alone still reruns everything selected."""
    root, calls = fake_root
    assert pipeline.run(["--profile", "smoke", "--only", "vae", "--denoisers", "gaussri"]) == 0
    assert [p["denoiser"] for _, p in calls] == ["unconditional", "unconditional_spatial", "gaussri"]
    for selection in (["--only", "vae"], ["--from", "vae"]):
        calls.clear()
        assert pipeline.run(["--profile", "smoke", *selection, "--denoisers", "gaussri",
                             "--force"]) == 0
        vae = [p for nb, p in calls if nb == "02_vae.ipynb"]
        assert vae == [{"profile": "smoke", "data_root": "", "denoiser": "gaussri", "force": True}]
    calls.clear()
    (root / "runs/smoke/notebooks/02_vae_unconditional.done.json").unlink()   # now stale
    assert pipeline.run(["--profile", "smoke", "--only", "vae", "--denoisers", "gaussri",
                         "--force"]) == 0
    assert [(p["denoiser"], p.get("force")) for _, p in calls] == [
        ("unconditional", None), ("gaussri", True)]
    calls.clear()
    assert pipeline.run(["--profile", "smoke", "--only", "vae", "--force"]) == 0
    assert calls[0][1]["denoiser"] == "unconditional"
    assert all(p.get("force") for _, p in calls)


def test_timings_cover_every_finished_job(fake_root):
    """timings.csv lists every job of the full plan that finished once, not just this run's."""
    root, calls = fake_root
    assert pipeline.run(["--profile", "smoke", "--only", "vae", "--denoisers", "gaussri"]) == 0
    assert pipeline.run(["--profile", "smoke", "--only", "analysis"]) == 0
    rows = (root / "runs/smoke/timings.csv").read_text().splitlines()
    assert rows[0] == "job,seconds,finished"
    assert [r.split(",")[0] for r in rows[1:]] == ["vae[unconditional]", "vae[unconditional_spatial]",
                                                   "vae[gaussri]", "analysis"]


def test_dry_run_creates_nothing(fake_root):
    root, calls = fake_root
    assert pipeline.run(["--profile", "smoke", "--dry-run"]) == 0
    assert pipeline.run(["--profile", str(EXAMPLE), "--dry-run"]) == 0
    assert not (root / "runs").exists() and not (root / "figures").exists() and calls == []


def test_relative_paths_are_the_callers(fake_root, tmp_path, monkeypatch, capsys):
    """--profile FILE.yaml and --data DIR are relative to the caller's folder ($INVARISCOPE_CALLER_CWD,
    which run_all.sh sets before it changes into the repo root; else the process's cwd)."""
    caller = tmp_path / "caller"
    (caller / "mayo").mkdir(parents=True)
    (caller / "mine.yaml").write_text("base: smoke\nrun_name: smoke\n")
    monkeypatch.chdir(fake_root[0])
    monkeypatch.setenv("INVARISCOPE_CALLER_CWD", str(caller))
    assert pipeline.run(["--profile", "mine.yaml", "--data", "mayo", "--dry-run"]) == 0
    assert "[smoke] data" in capsys.readouterr().out
    monkeypatch.delenv("INVARISCOPE_CALLER_CWD")
    monkeypatch.chdir(caller)
    assert pipeline.run(["--profile", "mine.yaml", "--data", "mayo", "--dry-run"]) == 0


def test_run_all_passes_the_callers_folder(tmp_path):
    """run_all.sh runs Python in the repo root, with the caller's folder in the environment."""
    shutil.copy(repo_root() / "run_all.sh", tmp_path / "run_all.sh")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup_env.sh").write_text("")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "$INVARISCOPE_CALLER_CWD|$PWD|$*"\n')
    python.chmod(0o755)
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "INVARISCOPE_CALLER_CWD"}
    out = subprocess.run(["bash", str(tmp_path / "run_all.sh"), "--profile", "p.yaml"], cwd=caller,
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{caller}|{tmp_path}|-m invariscope.pipeline --profile p.yaml"


def _own_denoiser(folder, weights: bool = False):
    """examples/own_denoiser copied to ``folder`` (optionally with a weights file): its params."""
    shutil.copytree(Path(EXAMPLE).parent, folder)
    if weights:
        (folder / "w.pt").write_bytes(b"weights v1")
        text = (folder / "params.yaml").read_text().replace("weights: null", "weights: w.pt")
        (folder / "params.yaml").write_text(text)
    return folder / "params.yaml"


def test_custom_denoiser_code_and_weights_reach_the_stamps(tmp_path):
    """A custom method's jobs, and what depends on them, change with its module file and
    weights; without identities (no custom method) the stamps are those of before."""
    from invariscope.params import load_params

    params = load_params(_own_denoiser(tmp_path / "own", weights=True))
    jobs = pipeline.plan("x", None, None, None, params.denoisers.methods)
    dump = params.model_dump(mode="json")
    base = pipeline.stamps(jobs, dump, pipeline.custom_identities(params))
    assert pipeline.stamps(jobs, dump) == pipeline.stamps(jobs, dump, {})
    assert base != pipeline.stamps(jobs, dump)
    downstream = {"denoiser[smooth]", "vae[smooth]", "cinn[smooth]", "invariances[smooth]",
                  "table1", "figure4", "figure5", "embedding", "analysis"}
    for f, more in (("my_denoiser.py", b"\n# retuned\n"), ("w.pt", b" v2")):
        with open(tmp_path / "own" / f, "ab") as fh:
            fh.write(more)
        changed = pipeline.stamps(jobs, dump, pipeline.custom_identities(params))
        assert {label for label in base if base[label] != changed[label]} == downstream
        base = changed


def test_custom_denoiser_change_reruns_its_jobs(fake_root, tmp_path, capsys):
    params = _own_denoiser(tmp_path / "own")
    args = ["--profile", str(params), "--only", "denoiser", "--denoisers", "smooth"]
    assert pipeline.run(args) == 0
    capsys.readouterr()
    assert pipeline.run(args + ["--dry-run"]) == 0
    assert _statuses(capsys.readouterr().out) == {"denoiser[smooth]": "skip"}
    with open(tmp_path / "own" / "my_denoiser.py", "a") as fh:
        fh.write("\n# a changed denoiser\n")
    assert pipeline.run(args + ["--dry-run"]) == 0
    assert _statuses(capsys.readouterr().out) == {"denoiser[smooth]": "run"}
    (tmp_path / "own" / "my_denoiser.py").unlink()
    assert pipeline.run(args + ["--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "my_denoiser.py" in err and "not found" in err


def test_own_denoiser_example_dry_run_reuses_the_default_run(capsys):
    """The example params file adds one method to the default profile's run folder."""
    assert pipeline.run(["--profile", EXAMPLE, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[default] denoiser[smooth]" in out and "[default] invariances[smooth]" in out


def test_force_reruns_from_scratch_without_changing_stamps(fake_root):
    """--force passes force=True to notebooks that take it; the stamps stay those of a plain run."""
    root, calls = fake_root
    args = ["--profile", "smoke", "--from", "figure5", "--denoisers", "gaussri"]
    assert pipeline.run(args + ["--force"]) == 0
    forced = {nb: p.get("force") for nb, p in calls}
    assert forced == {"04b_figure5_controls.ipynb": None, "05_embedding.ipynb": True,
                      "06_analysis.ipynb": True}
    calls.clear()
    assert pipeline.run(args) == 0          # a plain run finds the forced runs up to date
    assert calls == []


def test_missing_weights_stop_a_run_before_it_starts(fake_root, tmp_path, capsys):
    """A weights file that a selected stage would load but that is missing stops the run at once
    (a dry run warns); stages that load no weights are not held up."""
    root, calls = fake_root
    prof = tmp_path / "w.yaml"
    prof.write_text("base: smoke\nrun_name: smoke\nvae:\n  vgg16_weights: data/weights/none.pth\n")
    assert pipeline.run(["--profile", str(prof), "--from", "vae"]) == 2
    err = capsys.readouterr().err
    assert "vae.vgg16_weights = 'data/weights/none.pth': no file" in err and calls == []
    assert pipeline.run(["--profile", str(prof), "--dry-run"]) == 0
    assert "warning: a run would stop here" in capsys.readouterr().err
    assert pipeline.run(["--profile", str(prof), "--only", "data"]) == 0
    assert [nb for nb, _ in calls] == ["00_data.ipynb"]
    (root / "data" / "weights").mkdir(parents=True)
    (root / "data" / "weights" / "none.pth").write_bytes(b"")
    from invariscope.params import load_params

    jobs = pipeline.plan("smoke", None, "vae", None, ["gaussri"])
    assert pipeline.missing_weights(jobs, load_params(str(prof))) == []
