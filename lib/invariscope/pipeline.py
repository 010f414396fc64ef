"""Run the pipeline's notebooks with papermill (the engine behind ``./run_all.sh``).

Each stage is a numbered notebook, run once per profile (or once per denoiser for per-denoiser
stages). Executed notebooks are written to ``runs/<profile>/notebooks/``; a stage whose notebook,
parameters and upstream stages are unchanged since its last successful run is skipped
(``--force`` reruns it). Long stages checkpoint themselves, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .params import ParamsError, digest, load_params
from .paths import ensure, figures_dir, repo_root, run_dir


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a notebook, run once or once per denoiser.

    ``extra_runs``: further values of the notebook's ``denoiser`` parameter that a per-denoiser
    stage also runs, before the denoisers (e.g. ``"unconditional"`` for the VAE stage).
    """

    name: str
    notebook: str
    per_denoiser: bool = False
    extra_runs: tuple[str, ...] = ()


STAGES: tuple[Stage, ...] = (
    Stage("data", "00_data.ipynb"),
    Stage("denoiser", "01_denoiser.ipynb", per_denoiser=True),
    Stage("table1", "01b_table1_figure3.ipynb"),
    Stage("vae", "02_vae.ipynb", per_denoiser=True, extra_runs=("unconditional",)),
    Stage("figure4", "02b_figure4.ipynb"),
    Stage("cinn", "03_cinn.ipynb", per_denoiser=True),
    Stage("invariances", "04_invariances.ipynb", per_denoiser=True),
    Stage("figure5", "04b_figure5_controls.ipynb"),
)


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


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def plan(profile: str, data_root: str | None, only: str | None, start: str | None,
         denoisers: list[str]) -> list[Job]:
    """The jobs of a run, in order (per-denoiser stages once for each of their ``extra_runs``,
    then once for each of ``denoisers``)."""
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
            runs = list(s.extra_runs) + [d for d in denoisers if d not in s.extra_runs]
            jobs += [Job(s, d, {**params, "denoiser": d}) for d in runs]
        else:
            jobs.append(Job(s, None, dict(params)))
    return jobs


def job_stamp(job: Job, params_dump: dict[str, Any], upstream: list[str]) -> str:
    """Everything a job's result depends on, hashed."""
    nb = repo_root() / "notebooks" / job.stage.notebook
    return digest({"notebook": _file_sha(nb), "params": params_dump,
                   "parameters": job.parameters, "upstream": upstream}, length=16)


def run(argv: list[str] | None = None) -> int:
    """Command-line entry point (see ``./run_all.sh --help``)."""
    ap = argparse.ArgumentParser(prog="run_all.sh", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="default", help="smoke | default | paper (default: default)")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="Mayo LDCT-and-Projection-data folder (switches the data source to mayo)")
    ap.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    ap.add_argument("--only", metavar="STAGE", help="run only this stage")
    ap.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
    ap.add_argument("--denoisers", metavar="A,B", help="comma-separated subset of the profile's "
                    "denoisers (default: all of params denoisers.methods)")
    ap.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    args = ap.parse_args(argv)

    overrides = {"data.source": "mayo", "data.mayo_root": args.data} if args.data else {}
    try:
        params = load_params(args.profile, overrides)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.data and not Path(args.data).expanduser().is_dir():
        print(f"error: --data {args.data}: no such folder", file=sys.stderr)
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
    jobs = plan(args.profile, args.data, args.only, args.start, denoisers)
    out_dir = ensure(run_dir(params.profile) / "notebooks")
    params_dump = params.model_dump(mode="json")
    stamps: list[str] = []
    for job in jobs:
        out = out_dir / job.output_name
        done_file = out.with_suffix(".done.json")
        stamp = job_stamp(job, params_dump, stamps)
        stamps.append(stamp)
        done = done_file.is_file() and json.loads(done_file.read_text()).get("stamp") == stamp
        status = "up to date, skip" if done and not args.force else "run"
        print(f"[{params.profile}] {job.label:<24} {status:<17} -> {out.relative_to(repo_root())}")
        if args.dry_run or (done and not args.force):
            continue
        _execute(job, out)
        atomic.write_json(done_file, {"stamp": stamp, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    if not args.dry_run:
        print(f"figures and tables: {figures_dir(params.profile).relative_to(repo_root())}/")
    return 0


def _execute(job: Job, out: Path) -> None:
    """Run one notebook; on success it replaces ``out``, on failure it is kept as *.failed.ipynb."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb_dir = repo_root() / "notebooks"
    running = out.with_name(out.stem + ".running.ipynb")
    failed = out.with_name(out.stem + ".failed.ipynb")
    try:
        pm.execute_notebook(
            str(nb_dir / job.stage.notebook), str(running), parameters=job.parameters,
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
