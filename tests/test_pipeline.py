"""run_all.sh's engine: planning, dry run, argument errors, papermill-ready notebooks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import nbformat
import pytest

from invariscope import pipeline, provenance
from invariscope.config.paths import repo_root


def test_dry_run_lists_jobs_and_runs_nothing(capfd, tmp_path, monkeypatch):
    assert pipeline.run(["--profile", "paper", "--data", str(tmp_path), "--dry-run"]) == 0
    out = capfd.readouterr().out
    assert "runs/paper/notebooks/00_data.ipynb" in out and "This was a dry-run" in out
    assert pipeline.run(["--profile", "smoke", "--denoisers", "unet", "--dry-run"]) == 2
    assert "not in the profile's denoisers" in capfd.readouterr().err


def test_bad_arguments_are_reported(capsys, tmp_path):
    assert pipeline.run(["--profile", "nope", "--dry-run"]) == 2
    assert "available profiles" in capsys.readouterr().err
    assert pipeline.run(["--profile", "smoke", "--data", str(tmp_path / "missing"), "--dry-run"]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown stage"):
        pipeline.run(["--profile", "smoke", "--only", "nostage", "--dry-run"])


def test_stamp_changes_with_parameters():
    from invariscope.config.params import load_params

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
    from invariscope.config.params import load_params

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
    """A copy of params/, notebooks/ and workflow/ as the repo root; the workflow's jobs run
    tests/_fake_runner.py instead of papermill (it records each job in calls.jsonl and writes
    the job's outputs). Returns (root, calls), calls() reading the recorded jobs."""
    root = tmp_path / "root"
    for d in ("params", "notebooks", "workflow"):
        shutil.copytree(repo_root() / d, root / d)
    runner = Path(__file__).resolve().parent / "_fake_runner.py"
    monkeypatch.setenv("INVARISCOPE_ROOT", str(root))
    monkeypatch.setenv("INVARISCOPE_JOB_RUNNER", f"{sys.executable} {runner}")
    monkeypatch.delenv("INVARISCOPE_CALLER_CWD", raising=False)
    monkeypatch.delenv("FAKE_INTERRUPT", raising=False)

    def calls(clear: bool = True) -> list[dict]:
        f = root / "calls.jsonl"
        out = [json.loads(ln) for ln in f.read_text().splitlines()] if f.is_file() else []
        if clear:
            f.unlink(missing_ok=True)
        return out

    return root, calls


_RULE = re.compile(r"^rule (\w+):")
_WILDCARD = re.compile(r"^\s+wildcards: denoiser=(\S+)")


def _planned(out: str) -> set[str]:
    """Job labels of a Snakemake dry run's output (rule blocks with their wildcards)."""
    labels, rule = [], None
    for line in out.splitlines():
        if m := _RULE.match(line):
            rule = "denoiser" if m[1] == "denoiser_untrained" else m[1]
            labels.append(rule)
        elif (m := _WILDCARD.match(line)) and rule:
            labels[-1] = f"{rule}[{m[1]}]"
    return set(labels)


def _dry(capfd, *args: str) -> set[str]:
    assert pipeline.run(["--profile", "smoke", *args, "--dry-run"]) == 0
    return _planned(capfd.readouterr().out)


def _subsets(profile):
    from invariscope.config.params import load_params

    return pipeline.subsets(load_params(profile))


ALL_SMOKE = {j.label for j in pipeline.plan("smoke", None, None, None,
                                            ["cnn10", "redcnn", "wganvgg", "dugan", "gaussri"],
                                            spatial=True, subset_denoisers=_subsets("smoke"))}


def test_dag_of_each_profile_is_the_stage_list(fake_root, capfd):
    """A dry run of a fresh root lists every job of the plan, once, with its rule and wildcard."""
    assert _dry(capfd) == ALL_SMOKE and len(ALL_SMOKE) == 34
    assert pipeline.run(["--profile", "paper", "--data", str(fake_root[0]), "--dry-run"]) == 0
    paper = _planned(capfd.readouterr().out)
    assert "vae[unconditional_spatial]" not in paper and "vae[unconditional]" in paper
    assert paper == {j.label for j in pipeline.plan(
        "paper", None, None, None, ["cnn10", "redcnn", "wganvgg", "dugan", "gaussri"],
        subset_denoisers=_subsets("paper"))}


def test_selections_and_order(fake_root, capfd):
    root, calls = fake_root
    # --only with its inputs missing: Snakemake stops and names them
    assert pipeline.run(["--profile", "smoke", "--only", "denoiser", "--dry-run"]) == 2
    assert "Missing input files" in capfd.readouterr().out
    # --denoisers: the picked methods' chains and their shared upstream jobs, no summaries
    assert _dry(capfd, "--denoisers", "gaussri") == {
        "data", "denoiser[gaussri]", "vae[unconditional]", "vae[unconditional_spatial]",
        "vae[gaussri]", "cinn[gaussri]", "invariances[gaussri]", "optimized[gaussri]"}
    assert pipeline.run(["--profile", "smoke", "--jobs", "2"]) == 0
    order = [c["job"] for c in calls()]
    assert set(order) == ALL_SMOKE and len(order) == len(ALL_SMOKE)
    pos = {label: i for i, label in enumerate(order)}
    for label in ALL_SMOKE:  # every job after the jobs it reads
        stage, _, den = label.partition("[")
        job = next(j for j in pipeline.plan("smoke", None, None, None, ["cnn10", "redcnn",
                   "wganvgg", "dugan", "gaussri"], spatial=True, subset_denoisers=_subsets("smoke"))
                   if j.label == label)
        from invariscope.workflow import Workflow

        wf = Workflow.from_config({"profile": "smoke"})
        assert all(pos[u.label] < pos[label] for u in wf.upstream(job))
    assert _dry(capfd) == set()  # all done
    published = root / "figures/smoke/notebooks"  # every job up to date: the companion is written
    assert len(list(published.glob("*.ipynb"))) == len(ALL_SMOKE) and (published / "manifest.json").is_file()
    assert _dry(capfd, "--only", "denoiser", "--denoisers", "redcnn,gaussri", "--force") == {
        "denoiser[redcnn]", "denoiser[gaussri]"}
    rows = (root / "runs/smoke/timings.csv").read_text().splitlines()
    assert rows[0] == "job,seconds,max_rss_mb,finished" and len(rows) == 1 + len(ALL_SMOKE)


def test_reruns_never_trust_a_half_finished_job(fake_root, capfd, monkeypatch):
    root, calls = fake_root
    assert pipeline.run(["--profile", "smoke", "--denoisers", "gaussri"]) == 0
    calls()
    assert not (root / "figures/smoke/notebooks").exists()  # a partial run publishes nothing
    # interrupted (forced or not): rerun next time, and what reads it
    for force in ([], ["--force"]):
        if not force:  # out of date, so that a plain run starts it
            (root / "runs/smoke/cinn/gaussri/best.pt").unlink()
        monkeypatch.setenv("FAKE_INTERRUPT", "cinn[gaussri]")
        assert pipeline.run(["--profile", "smoke", "--only", "cinn", "--denoisers", "gaussri",
                             *force]) != 0
        monkeypatch.delenv("FAKE_INTERRUPT")
        assert calls() == [{"job": "cinn[gaussri]", "force": bool(force)}]
        assert _dry(capfd, "--denoisers", "gaussri") == {"cinn[gaussri]", "invariances[gaussri]",
                                                          "optimized[gaussri]"}
        assert pipeline.run(["--profile", "smoke", "--denoisers", "gaussri"]) == 0
        assert calls() == [{"job": "cinn[gaussri]", "force": False},
                           {"job": "invariances[gaussri]", "force": False},
                           {"job": "optimized[gaussri]", "force": False}]
    # a deleted output (a checkpoint, a figure) is rebuilt
    (root / "runs/smoke/vae/gaussri/best.pt").unlink()
    assert _dry(capfd, "--denoisers", "gaussri") == {
        "vae[gaussri]", "cinn[gaussri]", "invariances[gaussri]", "optimized[gaussri]"}
    assert pipeline.run(["--profile", "smoke", "--denoisers", "gaussri"]) == 0
    calls()
    # a markdown edit reruns nothing; a code edit reruns the stage and what reads it
    nb_file = root / "notebooks" / "03_cinn.ipynb"
    nb = nbformat.read(nb_file, as_version=4)
    md = next(c for c in nb.cells if c.cell_type == "markdown")
    md.source += "\n\nA clarified sentence."
    nbformat.write(nb, nb_file)
    assert _dry(capfd, "--denoisers", "gaussri") == set()
    code = next(c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", []))
    code.source += "\n# a changed line of code"
    nbformat.write(nb, nb_file)
    assert _dry(capfd, "--denoisers", "gaussri") == {"cinn[gaussri]", "invariances[gaussri]",
                                                          "optimized[gaussri]"}


def test_params_changes_rerun_exactly_the_stages_that_read_them(fake_root, capfd):
    root, calls = fake_root
    assert pipeline.run(["--profile", "smoke"]) == 0
    prof = root / "params" / "retuned.yaml"
    prof.write_text("base: smoke\nrun_name: smoke\ncinn:\n  lr: 1.234e-4\n")
    assert pipeline.run(["--profile", str(prof), "--dry-run"]) == 0
    methods = ("cnn10", "redcnn", "wganvgg", "dugan", "gaussri")
    assert _planned(capfd.readouterr().out) == {
        *(f"cinn[{m}]" for m in methods), *(f"invariances[{m}]" for m in methods), "figure5",
        "embedding", "analysis", "optimized[cnn10]", "optimized[wganvgg]", "optimized[gaussri]",
        "methods", "layerwise[cnn10]", "layerwise_summary"}
    prof.write_text("base: smoke\nrun_name: smoke\ndenoisers:\n  cnn10: {iterations: 21, "
                    "batch_size: 4, patch_size: 32, lr: 1.0e-3}\n")
    assert pipeline.run(["--profile", str(prof), "--dry-run"]) == 0
    assert _planned(capfd.readouterr().out) == {
        "denoiser[cnn10]", "vae[cnn10]", "cinn[cnn10]", "invariances[cnn10]", "table1", "figure4",
        "figure5", "embedding", "analysis", "optimized[cnn10]", "methods", "layerwise[cnn10]",
        "layerwise_summary"}


def test_force_with_denoisers_keeps_the_shared_extra_runs(fake_root):
    """--force --denoisers reruns the picked methods' jobs, not the unconditional VAE they share;
    --force alone reruns everything selected; a forced run leaves the stamps of a plain one."""
    root, calls = fake_root
    assert pipeline.run(["--profile", "smoke", "--until", "vae"]) == 0
    calls()
    assert pipeline.run(["--profile", "smoke", "--only", "vae", "--denoisers", "gaussri",
                         "--force"]) == 0
    assert calls() == [{"job": "vae[gaussri]", "force": True}]
    assert pipeline.run(["--profile", "smoke", "--only", "vae", "--force"]) == 0
    got = calls()
    assert {c["job"] for c in got} >= {"vae[unconditional]", "vae[cnn10]"}
    assert all(c["force"] for c in got)
    assert pipeline.run(["--profile", "smoke", "--only", "vae"]) == 0
    assert calls() == []


def test_two_runs_of_one_folder_exclude_each_other(fake_root, capfd):
    """One run per folder: a second concurrent run stops at once; the Snakemake lock left by a
    killed run (no run alive) is removed, so the next run starts."""
    import fcntl

    root, calls = fake_root
    (root / ".snakemake").mkdir()
    with open(root / ".snakemake" / "run_all.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # a run in progress
        assert pipeline.run(["--profile", "smoke", "--only", "data"]) == 2
        assert "another ./run_all.sh is running" in capfd.readouterr().err and calls() == []
    locks = root / ".snakemake" / "locks"
    locks.mkdir()
    (locks / "0.output.lock").write_text(str(root / "runs/smoke/notebooks/00_data.ipynb") + "\n")
    assert pipeline.run(["--profile", "smoke", "--only", "data"]) == 0
    assert "removed the lock left by an interrupted run" in capfd.readouterr().err
    assert [c["job"] for c in calls()] == ["data"]


def test_dry_run_creates_nothing(fake_root, capfd):
    root, calls = fake_root
    assert pipeline.run(["--profile", "smoke", "--dry-run"]) == 0
    assert pipeline.run(["--profile", str(EXAMPLE), "--dry-run"]) == 0
    assert not (root / "runs").exists() and not (root / "figures").exists() and calls() == []


def test_relative_paths_are_the_callers(fake_root, tmp_path, monkeypatch, capfd):
    """--profile FILE.yaml and --data DIR are relative to the caller's folder ($INVARISCOPE_CALLER_CWD,
    which run_all.sh sets before it changes into the repo root; else the process's cwd)."""
    caller = tmp_path / "caller"
    (caller / "mayo").mkdir(parents=True)
    (caller / "mine.yaml").write_text("base: smoke\nrun_name: smoke\n")
    monkeypatch.chdir(fake_root[0])
    monkeypatch.setenv("INVARISCOPE_CALLER_CWD", str(caller))
    assert pipeline.run(["--profile", "mine.yaml", "--data", "mayo", "--dry-run"]) == 0
    assert "runs/smoke/notebooks/00_data.ipynb" in capfd.readouterr().out
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
    from invariscope.config.params import load_params

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


def test_custom_denoiser_change_reruns_its_jobs(fake_root, tmp_path, capfd):
    root, calls = fake_root
    params = _own_denoiser(tmp_path / "own")
    args = ["--profile", str(params), "--only", "denoiser", "--denoisers", "smooth"]
    assert pipeline.run(["--profile", str(params), "--only", "data"]) == 0
    assert pipeline.run(args) == 0
    assert [c["job"] for c in calls()] == ["data", "denoiser[smooth]"]
    assert pipeline.run(args + ["--dry-run"]) == 0
    assert _planned(capfd.readouterr().out) == set()
    with open(tmp_path / "own" / "my_denoiser.py", "a") as fh:
        fh.write("\n# a changed denoiser\n")
    assert pipeline.run(args + ["--dry-run"]) == 0
    assert _planned(capfd.readouterr().out) == {"denoiser[smooth]"}
    (tmp_path / "own" / "my_denoiser.py").unlink()
    assert pipeline.run(args + ["--dry-run"]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and "my_denoiser.py" in err and "not found" in err


def test_own_denoiser_example_dry_run_reuses_the_default_run(capfd):
    """The example params file adds one method to the default profile's run folder."""
    assert pipeline.run(["--profile", EXAMPLE, "--dry-run"]) == 0
    out = capfd.readouterr().out
    assert "runs/default/notebooks/01_denoiser_smooth.ipynb" in out


def test_missing_weights_stop_a_run_before_it_starts(fake_root, tmp_path, capfd):
    """A weights file that a selected stage would load but that is missing stops the run at once
    (a dry run warns); stages that load no weights are not held up."""
    root, calls = fake_root
    prof = tmp_path / "w.yaml"
    prof.write_text("base: smoke\nrun_name: smoke\nvae:\n  vgg16_weights: data/weights/none.pth\n")
    assert pipeline.run(["--profile", str(prof), "--from", "vae"]) == 2
    err = capfd.readouterr().err
    assert "vae.vgg16_weights = 'data/weights/none.pth': no file" in err and calls() == []
    assert pipeline.run(["--profile", str(prof), "--dry-run"]) == 0
    assert "warning: a run would stop here" in capfd.readouterr().err
    assert pipeline.run(["--profile", str(prof), "--only", "data"]) == 0
    assert [c["job"] for c in calls()] == ["data"]
    (root / "data" / "weights").mkdir(parents=True)
    (root / "data" / "weights" / "none.pth").write_bytes(b"")
    from invariscope.config.params import load_params

    jobs = pipeline.plan("smoke", None, "vae", None, ["gaussri"])
    assert pipeline.missing_weights(jobs, load_params(str(prof))) == []


def test_changed_dicom_tree_is_imported_again(tmp_path, monkeypatch):
    """A file added, rewritten or removed in the Mayo tree changes the import key (a new cache
    folder) and the data job's stamp (the workflow reruns the data stage and what follows)."""
    from invariscope.config.params import load_params
    from invariscope.data import cohort

    tree = tmp_path / "mayo" / "L067"
    tree.mkdir(parents=True)
    (tree / "a.dcm").write_bytes(b"slice a")
    params = load_params("paper", {"data.mayo_root": str(tmp_path / "mayo")})
    jobs = pipeline.plan("paper", None, None, None, params.denoisers.methods)
    dump = params.model_dump(mode="json")

    def state():
        return provenance.import_key(cohort.mayo_root(params.data), params.data.on_error), pipeline.stamps(
            jobs, dump, pipeline.custom_identities(params))["data"]

    seen = [state()]
    (tree / "b.dcm").write_bytes(b"slice b")  # added
    seen.append(state())
    time.sleep(0.01)
    (tree / "a.dcm").write_bytes(b"slice A, repaired")  # rewritten
    seen.append(state())
    (tree / "b.dcm").unlink()  # removed
    seen.append(state())
    assert len({k for k, _ in seen}) == 4 and len({s for _, s in seen}) == 4
    assert state() == seen[-1]  # unchanged tree, same key


def test_skipped_mayo_files_are_reported_on_the_terminal(tmp_path, monkeypatch, capsys):
    from invariscope.config.params import load_params
    from invariscope.data import cohort

    monkeypatch.setenv("INVARISCOPE_DATA", str(tmp_path / "data"))
    (tmp_path / "mayo").mkdir()
    params = load_params("paper", {"data.mayo_root": str(tmp_path / "mayo"),
                                   "data.on_error": "skip"})
    folder = cohort.mayo_import_dir(params.data)
    folder.mkdir(parents=True)
    (folder / "import_report.json").write_text(json.dumps({
        "skipped_files": [{"patient": "L067", "file": "x.dcm"}, {"patient": "L067", "file": "y"}],
        "skipped_patients": [{"patient": "L096", "reason": "no low-dose series"}]}))
    pipeline._report_skipped(params)
    err = capsys.readouterr().err
    assert "skipped 2 file(s) and 1 patient(s)" in err and str(folder / "import_report.md") in err


def test_slurm_dry_run_lists_jobs_with_their_requests(tmp_path, capfd):
    """--executor slurm: every job with the GPU, memory and time request of params cluster."""
    assert pipeline.run(["--profile", "paper", "--data", str(tmp_path), "--executor", "slurm",
                         "--dry-run"]) == 0
    out = capfd.readouterr().out
    assert "--executor slurm" in out and "--retries 2" in out and "--keep-going" in out
    blocks = out.split("rule ")[1:]
    assert len(blocks) == 33  # 27 of the paper, 5 optimized and the methods summary (talk 003)
    den = next(b for b in blocks if b.startswith("denoiser:") and "denoiser=dugan" in b)
    assert "runtime=4320" in den and "gpu=1" in den and "mem_mb=64000" in den
    table = next(b for b in blocks if b.startswith("table1:"))
    assert "gpu=0" in table and "runtime=120" in table


def test_gpu_jobs_hold_distinct_devices(tmp_path):
    """--gpus: each running job holds its own device of the list; a job waits for a free one."""
    import threading

    from invariscope.workflow import claim_gpu

    with claim_gpu(["0", "1"], tmp_path) as a, claim_gpu(["0", "1"], tmp_path) as b:
        assert {a, b} == {"0", "1"}
        got = []
        t = threading.Thread(target=lambda: got.append(
            next(iter([g for g in [claim_gpu(["0", "1"], tmp_path, 0.01).__enter__()]]))))
        t.start()
        t.join(0.3)
        assert t.is_alive() and got == []  # both busy: the third job waits
    t.join(2)
    assert got and got[0] in ("0", "1")


def test_gpu_run_command_line(fake_root, capfd):
    """--gpus 0,1: two jobs at once, each rule asks for one GPU, the devices reach the jobs."""
    root, calls = fake_root
    params = pipeline.load_params("smoke")
    args = pipeline.argparse.Namespace(profile="smoke", data=None, jobs=2, threads=1,
                                       executor="local", only=None, start=None, force=False,
                                       denoisers=None, dry_run=True)
    cmd, env = pipeline.snakemake_command(params, args, pipeline.plan("smoke", None, None, None,
                                                                     ["gaussri"]), ["0", "1"])
    assert env["INVARISCOPE_GPUS"] == "0,1"
    assert cmd[cmd.index("--resources") + 1] == "gpu=2" and "vae:gpu=1" in cmd
    assert cmd[cmd.index("--jobs") + 1] == "2"


EXPERIMENTS = sorted((repo_root() / "params" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_params_file_builds_its_workflow(path):
    """Each params/experiments/*.yaml loads and yields the workflow a run would execute."""
    from invariscope.workflow import Workflow

    wf = Workflow.from_config({"profile": str(path)})
    assert wf.stamps and len(wf.jobs) >= 27 and wf.profile == wf.params.profile


def test_experiment_dry_run(capfd):
    path = repo_root() / "params" / "experiments" / "global_adv0.yaml"
    assert pipeline.run(["--profile", str(path), "--denoisers", "gaussri,cnn10", "--dry-run"]) == 0
    assert "runs/global_adv0/notebooks/02_vae_gaussri.ipynb" in capfd.readouterr().out


def test_gpus_per_job_claims_several_devices_and_sizes_the_training_rules(tmp_path, fake_root):
    """--gpus 0,1,2,3 --gpus-per-job 2: training rules ask for two GPUs, the others for one; a job
    holds two distinct devices; more per job than listed is refused."""
    from invariscope.workflow import claim_gpu

    params = pipeline.load_params("smoke")
    args = pipeline.argparse.Namespace(profile="smoke", data=None, jobs=2, threads=1, executor="local",
                                       only=None, start=None, force=False, denoisers=None,
                                       dry_run=True, gpus_per_job=2)
    cmd, env = pipeline.snakemake_command(params, args, pipeline.plan("smoke", None, None, None,
                                                                     ["gaussri"]), ["0", "1", "2", "3"])
    assert env[pipeline.PROCESSES_ENV] == "2"
    assert {"denoiser:gpu=2", "vae:gpu=2", "cinn:gpu=2", "embedding:gpu=2", "table1:gpu=1",
            "invariances:gpu=1", "denoiser_untrained:gpu=1"} <= set(cmd)
    with claim_gpu(["0", "1", "2"], tmp_path, count=2) as pair:
        assert len(set(pair.split(","))) == 2
        with claim_gpu(["0", "1", "2"], tmp_path, count=1) as rest:
            assert rest not in pair.split(",")
    with pytest.raises(ValueError, match="asks for 3 GPU"):
        with claim_gpu(["0", "1"], tmp_path, count=3):
            pass
    assert pipeline.run(["--profile", "smoke", "--gpus", "0", "--gpus-per-job", "2", "--dry-run"]) == 2


def test_run_job_trains_through_torchrun_then_runs_the_notebook(fake_root, monkeypatch):
    """With $INVARISCOPE_GPUS_PER_JOB the training jobs first run torchrun (invariscope.trainer,
    --force passed on) and then their notebook without force; other jobs only their notebook."""
    ran, executed = [], []
    monkeypatch.setattr(pipeline.subprocess, "run",
                        lambda cmd, check=False: ran.append(cmd) or SimpleNamespace(returncode=0))
    monkeypatch.setattr(pipeline, "_execute", lambda job, out, force=False: executed.append((job.label, force)))
    monkeypatch.setenv(pipeline.PROCESSES_ENV, "2")
    monkeypatch.setenv("INVARISCOPE_FORCE_JOBS", "cinn[gaussri]")
    monkeypatch.delenv("INVARISCOPE_GPUS", raising=False)
    params = pipeline.load_params("smoke")
    assert pipeline._run_job("cinn:gaussri", "smoke", None, params) == 0
    assert pipeline._run_job("figure5", "smoke", None, params) == 0
    assert pipeline._run_job("denoiser:gaussri", "smoke", None, params) == 0
    assert len(ran) == 1
    cmd = ran[0]
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc-per-node=2" in cmd
    assert cmd[cmd.index("invariscope.trainer") + 1:] == ["cinn:gaussri", "--profile", "smoke", "--force"]
    assert executed == [("cinn[gaussri]", False), ("figure5", False), ("denoiser[gaussri]", False)]
