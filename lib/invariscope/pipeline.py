"""Run the pipeline's notebooks with papermill (the engine behind ``./run_all.sh``).

Each stage is a numbered notebook, run once per profile (or once per denoiser for per-denoiser
stages). Executed notebooks are written to ``runs/<profile>/notebooks/``; a stage whose notebook,
parameters and upstream stages are unchanged since its last successful run is skipped
(``--force`` reruns it). Long stages checkpoint themselves, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .params import Params, ParamsError, digest, load_params
from .paths import ensure, figures_dir, from_repo_root, repo_root, run_dir


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a notebook, run once or once per denoiser.

    ``extra_runs``: further values of the notebook's ``denoiser`` parameter that a per-denoiser
    stage also runs, before the denoisers (e.g. ``"unconditional"`` for the VAE stage);
    ``spatial_extra_runs``: more of them with ``vae.latent: spatial`` (the spatial unconditional VAE).
    """

    name: str
    notebook: str
    sections: tuple[str, ...]
    per_denoiser: bool = False
    extra_runs: tuple[str, ...] = ()
    spatial_extra_runs: tuple[str, ...] = ()


#: ``sections``: the params sections a stage reads itself; what its upstream stages read reaches
#: its stamp through their stamps. A per-denoiser job sees only its own method's sub-section of
#: ``denoisers`` (retuning RED-CNN does not retrain CNN-10).
STAGES: tuple[Stage, ...] = (
    Stage("data", "00_data.ipynb", ("data",)),
    Stage("denoiser", "01_denoiser.ipynb", ("seed", "loader", "denoisers"), per_denoiser=True),
    Stage("table1", "01b_table1_figure3.ipynb", ("seed", "loader", "denoisers")),
    Stage("vae", "02_vae.ipynb", ("seed", "loader", "vae"), per_denoiser=True,
          extra_runs=("unconditional",), spatial_extra_runs=("unconditional_spatial",)),
    Stage("figure4", "02b_figure4.ipynb", ("seed", "vae")),
    Stage("cinn", "03_cinn.ipynb", ("seed", "vae", "cinn"), per_denoiser=True),
    Stage("invariances", "04_invariances.ipynb", ("vae", "invariances"), per_denoiser=True),
    Stage("figure5", "04b_figure5_controls.ipynb", ("invariances",)),
    Stage("embedding", "05_embedding.ipynb", ("seed", "vae", "embedding")),
    Stage("analysis", "06_analysis.ipynb", ("vae", "invariances", "embedding", "analysis")),
)

#: Outputs listed (and tables printed) at the end of a run.
RESULTS = ("table1.md", "figure3.png", "figure4.png", "vae_reconstruction.csv", "figure5.png",
           "controls.csv", "table2.md", "figure6.png", "figure7.png")


@dataclass(frozen=True)
class Job:
    """One notebook execution: a stage, optionally for one denoiser."""

    stage: Stage
    denoiser: str | None
    parameters: dict[str, Any]

    @property
    def label(self) -> str:
        return self.stage.name + (f"[{self.denoiser}]" if self.denoiser else "")

    @property
    def output_name(self) -> str:
        stem = Path(self.stage.notebook).stem
        return f"{stem}_{self.denoiser}.ipynb" if self.denoiser else f"{stem}.ipynb"


def plan(profile: str, data_root: str | None, only: str | None, start: str | None,
         denoisers: list[str], spatial: bool = False) -> list[Job]:
    """The jobs of a run, in order (per-denoiser stages once for each of their ``extra_runs``
    (and ``spatial_extra_runs`` when ``spatial``: ``vae.latent: spatial``), then once for each of
    ``denoisers``)."""
    names = [s.name for s in STAGES]
    for flag, value in (("--only", only), ("--from", start)):
        if value is not None and value not in names:
            raise SystemExit(f"{flag} {value!r}: unknown stage; stages are {', '.join(names)}")
    stages = list(STAGES)
    if start:
        stages = stages[names.index(start):]
    if only:
        stages = [s for s in stages if s.name == only]
    params = {"profile": profile, "data_root": data_root or ""}
    jobs = []
    for s in stages:
        if s.per_denoiser:
            extra = list(s.extra_runs) + (list(s.spatial_extra_runs) if spatial else [])
            runs = extra + [d for d in denoisers if d not in extra]
            jobs += [Job(s, d, {**params, "denoiser": d}) for d in runs]
        else:
            jobs.append(Job(s, None, dict(params)))
    return jobs


def job_params(job: Job, params_dump: dict[str, Any]) -> dict[str, Any]:
    """The part of the params a job reads itself (its stage's ``sections``)."""
    out = {k: params_dump[k] for k in job.stage.sections if k in params_dump}
    den = out.get("denoisers")
    if job.stage.per_denoiser and isinstance(den, dict):
        others = (set(den.get("methods", [])) | set(den.get("custom", {}))) - {job.denoiser}
        out["denoisers"] = {k: v for k, v in den.items() if k not in others | {"methods", "custom"}}
        if job.denoiser in den.get("custom", {}):
            out["denoisers"]["custom"] = den["custom"][job.denoiser]
    return out


def job_stamp(job: Job, params_dump: dict[str, Any], upstream: list[str],
              identity: str | None = None) -> str:
    """Everything a job's result depends on, hashed: its notebook, its params sections, its
    papermill parameters (but the profile's name), the stamps of the jobs upstream of it and,
    when given, its denoiser's ``identity`` (a custom method's module file and weights)."""
    nb = repo_root() / "notebooks" / job.stage.notebook
    # not the profile argument itself: the same parameters under another file name (a params file
    # with `base: default` and `run_name: default`) must find the finished jobs
    given = {k: v for k, v in job.parameters.items() if k != "profile"}
    parts = {"notebook": atomic.file_sha(nb), "params": job_params(job, params_dump),
             "parameters": given, "upstream": upstream}
    if identity is not None:  # only then: built-in methods keep the stamps of finished runs
        parts["identity"] = identity
    return digest(parts, length=16)


def custom_identities(params: Params) -> dict[str, str]:
    """:func:`invariscope.custom.identity` of every custom method of ``denoisers.methods``
    (FileNotFoundError when its module file or weights are missing)."""
    names = [d for d in params.denoisers.methods if d in params.denoisers.custom]
    if not names:
        return {}
    from .custom import identity  # imports torch: only when there are custom methods

    return {d: identity(d, params) for d in names}


def stamps(jobs: list[Job], params_dump: dict[str, Any],
           identities: Mapping[str, str] | None = None) -> dict[str, str]:
    """Stamp of every job of a full plan. A per-denoiser job depends on the earlier jobs of its
    own denoiser, of the stages' extra runs and on the data stage (not on summaries such as
    Table 1, so adding a denoiser leaves the others' jobs alone); a once-per-profile job depends
    on every earlier job. ``identities``: per denoiser, what else its jobs depend on (see
    :func:`custom_identities`). Keyed by :attr:`Job.label`."""
    identities = identities or {}
    out: dict[str, str] = {}
    order = [s.name for s in STAGES]
    first_per_denoiser = min(i for i, s in enumerate(STAGES) if s.per_denoiser)

    def feeds(j: Job, job: Job) -> bool:
        if not job.stage.per_denoiser:
            return True
        if not j.stage.per_denoiser:
            return order.index(j.stage.name) < first_per_denoiser
        return j.denoiser == job.denoiser or j.denoiser in j.stage.extra_runs

    for job in jobs:
        rank = order.index(job.stage.name)
        up = [j for j in jobs[:len(out)] if order.index(j.stage.name) < rank and feeds(j, job)]
        identity = identities.get(job.denoiser) if job.stage.per_denoiser else None
        out[job.label] = job_stamp(job, params_dump, [out[j.label] for j in up], identity)
    return out


#: Pretrained-weights settings, per stage that loads them (``denoiser``: only WGAN-VGG's job).
WEIGHT_KEYS: dict[str, tuple[str, ...]] = {
    "denoiser": ("denoisers.vgg_weights",),
    "vae": ("vae.imagenet_weights", "vae.vgg16_weights"),
    "embedding": ("embedding.imagenet_weights",),
}


def missing_weights(jobs: list[Job], params: Params) -> list[str]:
    """``key = 'setting': no file PATH`` for every weights file that a job of ``jobs`` would load
    and that is not there (relative settings: to the repo root), so a long run stops at the
    start rather than days in."""
    out = []
    for key in dict.fromkeys(k for j in jobs for k in WEIGHT_KEYS.get(j.stage.name, ())
                             if j.stage.name != "denoiser" or j.denoiser == "wganvgg"):
        section, name = key.split(".")
        setting = getattr(getattr(params, section), name)
        if setting is not None and not (path := from_repo_root(setting)).is_file():
            out.append(f"{key} = {setting!r}: no file {path}")
    return out


def caller_path(path: str) -> str:
    """``path`` made absolute against the caller's working directory (``run_all.sh`` changes
    into the repo root and passes the caller's in ``$INVARISCOPE_CALLER_CWD``)."""
    cwd = Path(os.environ.get("INVARISCOPE_CALLER_CWD") or Path.cwd())
    return str((cwd / Path(path).expanduser()).resolve())


def run(argv: list[str] | None = None) -> int:
    """Command-line entry point (see ``./run_all.sh --help``)."""
    ap = argparse.ArgumentParser(prog="run_all.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default",
                    help="smoke | default | paper, or a params YAML file (default: default)")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="Mayo LDCT-and-Projection-data folder (switches the data source to mayo)")
    ap.add_argument("--force", action="store_true",
                    help="rerun the selected stages even if up to date, from scratch (their "
                    "checkpoints and caches are deleted first); with --denoisers, a stage's shared "
                    "extra runs (the unconditional VAE) rerun only when out of date")
    ap.add_argument("--only", metavar="STAGE", help="run only this stage")
    ap.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
    ap.add_argument("--denoisers", metavar="A,B", help="comma-separated subset of the profile's "
                    "denoisers (default: all of params denoisers.methods)")
    ap.add_argument("--device", metavar="DEV", help="where the networks run: auto | cpu | cuda | "
                    "cuda:N (default: device in the params file; sets $INVARISCOPE_DEVICE)")
    ap.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    args = ap.parse_args(argv)

    if Path(args.profile).suffix in (".yaml", ".yml"):  # notebooks run in notebooks/: absolute
        args.profile = caller_path(args.profile)
    if args.data:
        args.data = caller_path(args.data)
    overrides = {"data.source": "mayo", "data.mayo_root": args.data} if args.data else {}
    try:
        params = load_params(args.profile, overrides)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.data and not Path(args.data).expanduser().is_dir():
        print(f"error: --data {args.data}: no such folder", file=sys.stderr)
        return 2
    try:
        where = _device(args.device, params)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    denoisers = list(params.denoisers.methods)
    if args.denoisers:
        asked = [d.strip() for d in args.denoisers.split(",") if d.strip()]
        unknown = [d for d in asked if d not in denoisers]
        if unknown:
            print(f"error: --denoisers {','.join(unknown)}: not in the profile's denoisers "
                  f"({', '.join(denoisers)}; see denoisers.methods in {params.source_file})",
                  file=sys.stderr)
            return 2
        denoisers = asked
    try:
        identities = custom_identities(params)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # stamps come from the full plan, so --only / --from / --denoisers do not change them
    spatial = params.vae.latent == "spatial"
    full = plan(args.profile, args.data, None, None, list(params.denoisers.methods), spatial)
    all_stamps = stamps(full, params.model_dump(mode="json"), identities)
    jobs = plan(args.profile, args.data, args.only, args.start, denoisers, spatial)
    out_dir = run_dir(params.profile) / "notebooks"
    if not args.dry_run:  # a dry run creates nothing
        ensure(out_dir)
    # per job: rerun it (forced, or its last successful run had another stamp)?
    forced = {j.label: _forced(j, args.force, bool(args.denoisers)) for j in jobs}
    rerun = {j.label: forced[j.label] or _done_record(_done_file(out_dir, j)).get("stamp")
             != all_stamps[j.label] for j in jobs}
    missing = missing_weights([j for j in jobs if rerun[j.label]], params)
    if missing:
        lines = "\n  ".join(missing)
        hint = (f"copy torchvision's files there (README, 'Paper scale on a GPU box'), or set these "
                f"keys in {params.source_file} to where the files are, or to null (random weights, "
                "not the paper's)")
        if not args.dry_run:
            print(f"error: pretrained weights missing:\n  {lines}\n{hint}", file=sys.stderr)
            return 2
        print(f"warning: a run would stop here, pretrained weights missing:\n  {lines}\n{hint}",
              file=sys.stderr)
    print(f"[{params.profile}] networks run on {where}", flush=True)
    t_run = time.time()
    for job in jobs:
        out = out_dir / job.output_name
        status = "run" if rerun[job.label] else "up to date, skip"
        print(f"[{params.profile}] {job.label:<26} {status:<17} -> {out.relative_to(repo_root())}",
              flush=True)
        if args.dry_run or not rerun[job.label]:
            continue
        t0 = time.time()
        _execute(job, out, force=forced[job.label])
        atomic.write_json(_done_file(out_dir, job),
                          {"stamp": all_stamps[job.label], "seconds": round(time.time() - t0, 1),
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    if not args.dry_run:
        _write_timings(full, out_dir, params.profile)
        print(f"\nthis run took {(time.time() - t_run) / 60:.1f} min")
        _print_results(params.profile)
    return 0


def _device(option: str | None, params: Params) -> str:
    """The device the notebooks will use, checked before any stage starts: ``--device`` (exported
    as ``$INVARISCOPE_DEVICE`` for the kernels), else the environment variable, else ``device`` of
    the params file. ValueError for a malformed setting, RuntimeError for a missing GPU."""
    from . import device as devices  # imports torch

    if option is not None:
        spec = devices.check_spec(option)
        dev = devices.resolve(spec, where="--device")
        os.environ[devices.ENV] = spec
    else:
        dev = devices.of(params)
    setting = os.environ.get(devices.ENV, "").strip() or params.device
    note = " (auto: no CUDA GPU seen)" if dev.type == "cpu" and setting.lower() == "auto" else ""
    return f"{dev}{note}"


def _forced(job: Job, force: bool, subset: bool) -> bool:
    """Whether ``--force`` reruns ``job``: not a stage's extra run (the unconditional VAE every
    method shares) when ``--denoisers`` picks a subset; that one reruns only when stale."""
    shared = job.stage.extra_runs + job.stage.spatial_extra_runs
    return force and not (subset and job.denoiser in shared)


def _done_file(out_dir: Path, job: Job) -> Path:
    """Where a job's last successful run is recorded (beside its executed notebook)."""
    return (out_dir / job.output_name).with_suffix(".done.json")


def _done_record(done_file: Path) -> dict[str, Any]:
    """A job's ``.done.json`` (stamp, seconds, finished); empty when missing or unreadable."""
    try:
        record = json.loads(done_file.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_timings(jobs: list[Job], out_dir: Path, profile: str) -> None:
    """``runs/<profile>/timings.csv``: seconds of the last successful run of every job of
    ``jobs`` (the full plan, whatever this run selected) that has finished once."""
    rows = ["job,seconds,finished"]
    for job in jobs:
        d = _done_record(_done_file(out_dir, job))
        if d:
            rows.append(f"{job.label},{d.get('seconds', '')},{d.get('finished', '')}")
    atomic.write_text(run_dir(profile) / "timings.csv", "\n".join(rows) + "\n")


def _print_results(profile: str) -> None:
    """Where the figures and tables are, and the tables themselves."""
    fig_dir = figures_dir(profile)
    print(f"figures and tables in {fig_dir.relative_to(repo_root())}/:")
    for name in RESULTS:
        f = fig_dir / name
        print(f"  {'ok     ' if f.is_file() else 'missing'} {name}")
    for name in ("table1.md", "table2.md", "vae_reconstruction.csv", "controls.csv"):
        f = fig_dir / name
        if f.is_file():
            print(f"\n{name}:\n{f.read_text().rstrip()}")


def notebook_parameters(notebook: Path) -> list[str]:
    """Names set in a notebook's ``parameters`` cell."""
    from papermill.inspection import inspect_notebook

    return list(inspect_notebook(str(notebook)))


def _execute(job: Job, out: Path, force: bool = False) -> None:
    """Run one notebook; on success it replaces ``out``, on failure it is kept as *.failed.ipynb.

    ``force``: also pass ``force=True`` to a notebook that has that parameter (it then deletes
    its checkpoints or caches and recomputes them from scratch).
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb_dir = repo_root() / "notebooks"
    running = out.with_name(out.stem + ".running.ipynb")
    failed = out.with_name(out.stem + ".failed.ipynb")
    parameters = dict(job.parameters)
    if force and "force" in notebook_parameters(nb_dir / job.stage.notebook):
        parameters["force"] = True
    try:
        pm.execute_notebook(
            str(nb_dir / job.stage.notebook), str(running), parameters=parameters,
            kernel_name="python3", cwd=str(nb_dir), progress_bar=True, language="python",
        )
    except PapermillExecutionError as exc:
        running.replace(failed)
        raise SystemExit(
            f"stage {job.label} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
            f"the executed notebook is kept at {failed}"
        ) from None
    except BaseException:
        if running.exists():
            running.replace(failed)
        raise
    failed.unlink(missing_ok=True)
    running.replace(out)


if __name__ == "__main__":
    sys.exit(run())
