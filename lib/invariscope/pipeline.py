"""The command line behind ``./run_all.sh``: the stages, their jobs and stamps, and the
Snakemake call that runs them (``workflow/Snakefile``, :mod:`invariscope.workflow`).

Each stage is a numbered notebook, run once per profile (or once per denoiser for per-denoiser
stages) with papermill; executed notebooks go to ``runs/<profile>/notebooks/``. A job's stamp
hashes the code cells of its notebook, the params sections it reads and the stamps of the jobs
it reads; Snakemake reruns a job whose stamp changed, whose outputs are missing or which was
interrupted. Long stages checkpoint themselves, so an interrupted job resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invariscope import atomic
from invariscope.companion import notebook_code_sha, publish
from invariscope.config.params import Params, ParamsError, digest, load_params
from invariscope.config.paths import RELATIVE_RULE, ensure, figures_dir, repo_root, resolve_setting, run_dir
from invariscope.evaluation.headline import run_check


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a notebook, run once or once per denoiser.

    ``extra_runs``: further values of the notebook's ``denoiser`` parameter that a per-denoiser
    stage also runs, before the denoisers (e.g. ``"unconditional"`` for the VAE stage);
    ``spatial_extra_runs``: more of them with ``vae.latent: spatial`` (the spatial unconditional VAE);
    ``subset``: a params section that lists the denoisers the stage runs for (``<section>.denoisers``;
    a profile without that section skips the stage, see :func:`subsets`).
    """

    name: str
    notebook: str
    sections: tuple[str, ...]
    per_denoiser: bool = False
    extra_runs: tuple[str, ...] = ()
    spatial_extra_runs: tuple[str, ...] = ()
    subset: str | None = None


#: ``sections``: the params sections a stage reads itself; what its upstream stages read reaches
#: its stamp through their stamps. A per-denoiser job sees only its own method's sub-section of
#: ``denoisers`` (retuning RED-CNN does not retrain CNN-10). ``precision`` is in a dump (and so
#: in a stamp) only when it is not fp32.
STAGES: tuple[Stage, ...] = (
    Stage("data", "00_data.ipynb", ("data",)),
    Stage("denoiser", "01_denoiser.ipynb", ("seed", "precision", "loader", "denoisers"),
          per_denoiser=True),
    Stage("table1", "01b_table1_figure3.ipynb", ("seed", "loader", "denoisers")),
    Stage("vae", "02_vae.ipynb", ("seed", "precision", "loader", "vae"), per_denoiser=True,
          extra_runs=("unconditional",), spatial_extra_runs=("unconditional_spatial",)),
    Stage("figure4", "02b_figure4.ipynb", ("seed", "vae")),
    Stage("cinn", "03_cinn.ipynb", ("seed", "precision", "vae", "cinn"),
          per_denoiser=True),
    Stage("invariances", "04_invariances.ipynb", ("precision", "vae", "invariances"),
          per_denoiser=True),
    Stage("figure5", "04b_figure5_controls.ipynb", ("invariances",)),
    Stage("embedding", "05_embedding.ipynb", ("seed", "precision", "vae", "embedding")),
    Stage("analysis", "06_analysis.ipynb", ("vae", "invariances", "embedding", "analysis")),
    Stage("optimized", "07_optimized_invariances.ipynb",
          ("seed", "loader", "vae", "invariances", "optimized", "natural"), per_denoiser=True,
          subset="optimized"),
    Stage("methods", "07b_invariance_methods.ipynb",
          ("vae", "invariances", "analysis", "optimized", "natural"), subset="optimized"),
    Stage("layerwise", "08_layerwise.ipynb",
          ("seed", "precision", "vae", "cinn", "invariances", "layerwise"), per_denoiser=True,
          subset="layerwise"),
    Stage("layerwise_summary", "08b_layerwise_summary.ipynb", ("layerwise",), subset="layerwise"),
)

#: Outputs listed (and tables printed) at the end of a run.
RESULTS = ("table1.md", "figure3.png", "figure4.png", "vae_reconstruction.csv", "figure5.png",
           "controls.csv", "table2.md", "figure6.png", "figure7.png", "invariance_methods.md",
           "invariance_methods.png", "figure5_output_sd.png", "layerwise.csv", "layerwise.png",
           "layerwise_target.png")


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


def subsets(params: Params) -> dict[str, list[str]]:
    """Per params section that a stage's ``subset`` names: the denoisers it lists (absent when the
    profile has no such section: its stages are skipped)."""
    out = {}
    if params.optimized is not None:
        out["optimized"] = list(params.optimized.denoisers)
    if params.layerwise is not None:
        out["layerwise"] = list(params.layerwise.denoisers)
    return out


def plan(profile: str, data_root: str | None, only: str | None, start: str | None,
         denoisers: list[str], spatial: bool = False,
         subset_denoisers: dict[str, list[str]] | None = None) -> list[Job]:
    """The jobs of a run, in order (per-denoiser stages once for each of their ``extra_runs``
    (and ``spatial_extra_runs`` when ``spatial``: ``vae.latent: spatial``), then once for each of
    ``denoisers``). A stage with a ``subset`` runs only when ``subset_denoisers`` (:func:`subsets`)
    has its section, and per denoiser only for those of ``denoisers`` the section lists."""
    subset_denoisers = subset_denoisers or {}
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
        if s.subset is not None and s.subset not in subset_denoisers:
            continue
        if s.per_denoiser:
            extra = list(s.extra_runs) + (list(s.spatial_extra_runs) if spatial else [])
            runs = extra + [d for d in denoisers if d not in extra and (
                s.subset is None or d in subset_denoisers[s.subset])]
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
    lw = out.get("layerwise")
    if job.stage.per_denoiser and isinstance(lw, dict):  # another denoiser's layers: not this job's
        out["layerwise"] = {**lw, "denoisers": {job.denoiser: lw["denoisers"].get(job.denoiser)}}
    return out


def job_stamp(job: Job, params_dump: dict[str, Any], upstream: list[str],
              identity: str | None = None) -> str:
    """Everything a job's result depends on, hashed: its notebook's code cells, its params sections, its
    papermill parameters (but the profile's name), the stamps of the jobs upstream of it and,
    when given, its denoiser's ``identity`` (a custom method's module file and weights)."""
    nb = repo_root() / "notebooks" / job.stage.notebook
    # not the profile argument itself: the same parameters under another file name (a params file
    # with `base: default` and `run_name: default`) must find the finished jobs
    given = {k: v for k, v in job.parameters.items() if k != "profile"}
    parts = {"notebook": notebook_code_sha(nb), "params": job_params(job, params_dump),
             "parameters": given, "upstream": upstream}
    if identity is not None:  # only then: built-in methods keep the stamps of finished runs
        parts["identity"] = identity
    return digest(parts, length=16)


def custom_identities(params: Params) -> dict[str, str]:
    """What a job depends on beyond its params: :func:`invariscope.provenance.custom_identity` of every
    custom method of ``denoisers.methods`` (FileNotFoundError when its module file or weights
    are missing) and, with Mayo data, the DICOM tree's files (``stage:data``)."""
    out: dict[str, str] = {}
    names = [d for d in params.denoisers.methods if d in params.denoisers.custom]
    mayo = params.data.source == "mayo" and bool(params.data.mayo_root)
    if not (names or mayo):
        return out
    # not a cycle: provenance imports torch, which the command line loads only when it must
    from invariscope.provenance import custom_identity, tree_fingerprint

    if mayo:
        root = resolve_setting(str(params.data.mayo_root), params.source_file).resolve()
        out["stage:data"] = tree_fingerprint(root)
    return out | {d: custom_identity(d, params) for d in names}


def upstream(jobs: list[Job], job: Job) -> list[Job]:
    """The jobs of ``jobs`` that ``job`` reads: a per-denoiser job reads the earlier jobs of its
    own denoiser, the stages' extra runs and the data stage (not summaries such as Table 1, so
    adding a denoiser leaves the others' jobs alone); a once-per-profile job reads every earlier
    job. A job of a stage with a ``subset`` is read only by stages of the same subset."""
    order = [s.name for s in STAGES]
    first_per_denoiser = min(i for i, s in enumerate(STAGES) if s.per_denoiser)
    rank = order.index(job.stage.name)

    def feeds(j: Job) -> bool:
        if order.index(j.stage.name) >= rank:
            return False
        if j.stage.subset is not None and j.stage.subset != job.stage.subset:
            return False  # the talks' stages (optimized, layerwise) do not read each other
        if not job.stage.per_denoiser:
            return True
        if not j.stage.per_denoiser:
            return order.index(j.stage.name) < first_per_denoiser
        return j.denoiser == job.denoiser or j.denoiser in j.stage.extra_runs

    return [j for j in jobs if feeds(j)]


def stamps(jobs: list[Job], params_dump: dict[str, Any],
           identities: Mapping[str, str] | None = None) -> dict[str, str]:
    """Stamp of every job of a full plan, from the stamps of the jobs it reads (:func:`upstream`;
    ``jobs`` in plan order). ``identities``: per denoiser, what else its jobs depend on (see
    :func:`custom_identities`), and per ``"stage:<name>"`` what else a once-per-profile job
    depends on (the data stage: the Mayo tree's files). Keyed by :attr:`Job.label`."""
    identities = identities or {}
    out: dict[str, str] = {}
    for job in jobs:
        up = upstream(jobs, job)
        identity = (identities.get(job.denoiser) if job.stage.per_denoiser
                    else identities.get(f"stage:{job.stage.name}"))
        out[job.label] = job_stamp(job, params_dump, [out[j.label] for j in up], identity)
    return out


#: Pretrained-weights settings, per stage that loads them (``denoiser``: only WGAN-VGG's job).
WEIGHT_KEYS: dict[str, tuple[str, ...]] = {
    "denoiser": ("denoisers.vgg_weights",),
    "vae": ("vae.imagenet_weights", "vae.vgg16_weights"),
    "embedding": ("embedding.imagenet_weights",),
    "optimized": ("optimized.vgg16_weights",),
}


def missing_weights(jobs: list[Job], params: Params) -> list[str]:
    """``key = 'setting': no file PATH`` for every weights file that a job of ``jobs`` would load
    and that is not there (relative settings: to the repo root), so a long run stops at the
    start rather than days in."""
    out = []
    for key in dict.fromkeys(k for j in jobs for k in WEIGHT_KEYS.get(j.stage.name, ())
                             if j.stage.name != "denoiser" or j.denoiser == "wganvgg"):
        section, name = key.split(".")
        setting = getattr(getattr(params, section), name, None)
        if setting is not None and not (path := resolve_setting(setting, params.source_file)).is_file():
            out.append(f"{key} = {setting!r}: no file {path} ({RELATIVE_RULE})")
    return out


def caller_path(path: str) -> str:
    """``path`` made absolute against the caller's working directory (``run_all.sh`` changes
    into the repo root and passes the caller's in ``$INVARISCOPE_CALLER_CWD``)."""
    cwd = Path(os.environ.get("INVARISCOPE_CALLER_CWD") or Path.cwd())
    return str((cwd / Path(path).expanduser()).resolve())


def run(argv: list[str] | None = None) -> int:
    """Command-line entry point (see ``./run_all.sh --help``): builds the Snakemake command line
    of a run, or (``--run-job``, what the workflow's rules call) executes one notebook."""
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
    ap.add_argument("--until", metavar="STAGE", help="stop after this stage")
    ap.add_argument("--denoisers", metavar="A,B", help="comma-separated subset of the profile's "
                    "denoisers: their per-denoiser jobs only, not the summaries that need every "
                    "method (default: all of params denoisers.methods, summaries included)")
    ap.add_argument("--device", metavar="DEV", help="where the networks run: auto | cpu | cuda | "
                    "cuda:N (default: device in the params file; sets $INVARISCOPE_DEVICE)")
    ap.add_argument("--jobs", type=int, default=None, metavar="N",
                    help="jobs at once (default: one per core, at most 4, on a CPU; one per GPU "
                    "with --gpus; 1 on a single GPU)")
    ap.add_argument("--threads", type=int, default=1, metavar="T",
                    help="CPU threads per job (default 1, so results do not depend on --jobs)")
    ap.add_argument("--gpus", metavar="LIST", help="comma-separated GPU indices, e.g. 0,1,2,3: "
                    "one GPU job per device at once (CUDA_VISIBLE_DEVICES); implies --device cuda")
    ap.add_argument("--gpus-per-job", type=int, default=1, metavar="N",
                    help="train each denoiser, VAE, cINN and the embedding on N processes through "
                    "torchrun (data-parallel, the params file's batch split across them): N GPUs "
                    "of --gpus each, or N gloo processes on a CPU (default 1)")
    ap.add_argument("--executor", choices=("local", "slurm"), default="local",
                    help="slurm: submit every job to Slurm with the resources of params cluster")
    ap.add_argument("--dry-run", action="store_true", help="list what would run, run nothing")
    ap.add_argument("--check", action="store_true", help="run nothing: compare the finished run's "
                    "tables with the committed ones, number by number, within the seed spread "
                    "(docs/reproducibility.md)")
    ap.add_argument("--run-job", metavar="STAGE[:DENOISER]", help=argparse.SUPPRESS)
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
    if args.run_job:
        return _run_job(args.run_job, args.profile, args.data, params)
    if args.check:
        return run_check(params.profile)
    if args.data and not Path(args.data).expanduser().is_dir():
        print(f"error: --data {args.data}: no such folder", file=sys.stderr)
        return 2
    for flag, value in (("--jobs", args.jobs), ("--threads", args.threads),
                        ("--gpus-per-job", args.gpus_per_job)):
        if value is not None and value < 1:
            print(f"error: {flag} {value}: give 1 or more", file=sys.stderr)
            return 2
    gpus = [g.strip() for g in (args.gpus or "").split(",") if g.strip()]
    if args.gpus is not None and not all(g.isdigit() for g in gpus) or args.gpus == "":
        print(f"error: --gpus {args.gpus!r}: give GPU indices such as 0,1", file=sys.stderr)
        return 2
    if gpus and args.device is None:
        args.device = "cuda"
    if gpus and args.gpus_per_job > len(gpus):
        print(f"error: --gpus-per-job {args.gpus_per_job} needs at least that many GPUs in --gpus "
              f"(got {','.join(gpus)})", file=sys.stderr)
        return 2
    try:
        # on a cluster the login node need not see the GPUs the jobs will get
        where = _device(args.device, params) if args.executor == "local" \
            else (args.device or params.device)
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.jobs is None:
        args.jobs = len(gpus) if gpus else 1 if where.startswith("cuda") else min(os.cpu_count() or 1, 4)
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
        custom_identities(params)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    spatial = params.vae.latent == "spatial"
    full = plan(args.profile, args.data, None, None, list(params.denoisers.methods), spatial,
                subsets(params))
    jobs = plan(args.profile, args.data, args.only, args.start, denoisers, spatial, subsets(params))
    if args.until:
        names = [st.name for st in STAGES]
        if args.until not in names:
            raise SystemExit(f"--until {args.until!r}: unknown stage; stages are {', '.join(names)}")
        jobs = [j for j in jobs if names.index(j.stage.name) <= names.index(args.until)]
    if args.denoisers:  # only the picked methods' chains: summaries need every method
        jobs = [j for j in jobs if j.stage.per_denoiser]
    missing = missing_weights(jobs, params)
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
    cmd, env = snakemake_command(params, args, jobs, gpus)
    print(f"[{params.profile}] networks run on {where}; {len(jobs)} job(s) selected, "
          f"{args.jobs} at once", flush=True)
    t_run = time.time()
    with _one_run_at_a_time(cmd, env, args.dry_run) as free:
        if not free:
            print(f"error: another ./run_all.sh is running in {repo_root()}; wait for it to finish "
                  "(Snakemake allows one run per folder)", file=sys.stderr)
            return 2
        rc = subprocess.run(cmd, cwd=repo_root(), env=env).returncode
    if args.dry_run:
        return 0 if rc == 0 else 2
    _write_timings(full, params.profile)
    if params.data.source == "mayo" and any(j.stage.name == "data" for j in jobs):
        _report_skipped(params)
    if rc != 0:
        print(f"error: the workflow stopped (snakemake exit code {rc}); rerun the same command "
              "to resume: finished jobs are kept, an interrupted one reruns", file=sys.stderr)
        return 1
    print(f"\nthis run took {(time.time() - t_run) / 60:.1f} min")
    if len(jobs) == len(full):  # every job is up to date: the executed notebooks go with the results
        from invariscope.workflow import notebook_out  # workflow imports this module

        folder = publish(params.profile, [repo_root() / notebook_out(params.profile, j.stage, j.denoiser)
                                          for j in full])
        print(f"executed notebooks (figures inline) in {folder.relative_to(repo_root())}/")
    _print_results(params.profile)
    return 0


#: Rules of each stage in workflow/Snakefile (the denoiser stage has one for untrained methods).
RULES = {s.name: (s.name,) for s in STAGES} | {"denoiser": ("denoiser", "denoiser_untrained")}
#: Rules that train (``--gpus-per-job``: their jobs run data-parallel on several processes).
TRAINING_RULES = ("denoiser", "vae", "cinn", "embedding")
#: Environment variable of ``--gpus-per-job`` (processes per training job).
PROCESSES_ENV = "INVARISCOPE_GPUS_PER_JOB"


def snakemake_command(params: Params, args: argparse.Namespace, jobs: list[Job],
                      gpus: list[str]) -> tuple[list[str], dict[str, str]]:
    """The ``snakemake`` command line of a run and its environment: targets are all outputs of
    ``jobs`` (Snakemake checks only requested files for a missing output); ``--only``/``--from`` restrict the rules that may run; ``--force``
    forces exactly the selected jobs (the notebooks get ``force=True`` through
    ``$INVARISCOPE_FORCE_JOBS``, so a forced run leaves the stamps of a plain one)."""
    from invariscope.workflow import notebook_out, outputs  # workflow imports this module

    threads = max(1, args.threads)
    config = [f"profile={args.profile}", f"data={args.data or ''}", f"threads={threads}"]
    runner = os.environ.get("INVARISCOPE_JOB_RUNNER")
    if runner:  # tests: a stand-in for the notebook runner
        config.append(f"runner={runner}")
    targets = [f for j in jobs for f in outputs(params.profile, j.stage, j.denoiser)]
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(repo_root() / "workflow" / "Snakefile"),
           "--directory", str(repo_root()), "--config", *config,
           "--rerun-incomplete", "--rerun-triggers", "mtime", "params", "input",
           "--show-failed-logs"]
    if args.executor == "slurm":
        cmd += ["--executor", "slurm", "--jobs", str(max(args.jobs, 1) if args.jobs > 1 else 100),
                "--retries", str(params.cluster.retries), "--keep-going"]
    else:
        cmd += ["--cores", str(threads * args.jobs), "--jobs", str(args.jobs)]
        if gpus:  # every job holds its GPUs: at most one job per device at once
            per_job = max(1, getattr(args, "gpus_per_job", 1))
            rules = [r for rs in RULES.values() for r in rs]
            cmd += ["--resources", f"gpu={len(gpus)}", "--set-resources",
                    *[f"{r}:gpu={per_job if r in TRAINING_RULES else 1}" for r in rules]]
    if args.only or args.start:
        names = [s.name for s in STAGES]
        chosen = [args.only] if args.only else names[names.index(args.start):]
        cmd += ["--allowed-rules", *[r for n in chosen for r in RULES[n]]]
    env = dict(os.environ)
    if args.force:
        forced = [j for j in jobs if _forced(j, True, bool(args.denoisers))]
        cmd += ["--forcerun", *[notebook_out(params.profile, j.stage, j.denoiser) for j in forced]]
        env["INVARISCOPE_FORCE_JOBS"] = ",".join(j.label for j in forced)
    else:
        env.pop("INVARISCOPE_FORCE_JOBS", None)
    if gpus:
        env["INVARISCOPE_GPUS"] = ",".join(gpus)
    if getattr(args, "gpus_per_job", 1) > 1:
        env[PROCESSES_ENV] = str(args.gpus_per_job)
    else:
        env.pop(PROCESSES_ENV, None)
    cmd += ["--dry-run"] if args.dry_run else ["--quiet", "rules"]
    return cmd + ["--", *targets] if targets else cmd, env


@contextlib.contextmanager
def _one_run_at_a_time(cmd: list[str], env: dict[str, str], dry_run: bool) -> Iterator[bool]:
    """Hold ``.snakemake/run_all.lock`` for a run (yields False when another run holds it). A
    Snakemake lock left by a run that was killed (no run holds ours) is removed first."""
    if dry_run:
        yield True
        return
    folder = ensure(repo_root() / ".snakemake")
    with open(folder / "run_all.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        locks = folder / "locks"
        if locks.is_dir() and any(locks.iterdir()):
            unlock = [c for c in cmd[:cmd.index("--")] if c != "--dry-run"] if "--" in cmd else cmd
            subprocess.run([*unlock, "--unlock"], cwd=repo_root(), env=env, capture_output=True)
            print("note: removed the lock left by an interrupted run", file=sys.stderr)
        yield True


def _run_job(spec: str, profile: str, data: str | None, params: Params) -> int:
    """Execute one job's notebook (what a workflow rule runs): ``spec`` is ``STAGE`` or
    ``STAGE:DENOISER``. The notebook gets ``force=True`` when ``$INVARISCOPE_FORCE_JOBS`` names
    the job; with ``$INVARISCOPE_GPUS`` it holds one of those GPUs while it runs."""
    from invariscope.workflow import claim_gpu  # workflow imports this module

    name, _, denoiser = spec.partition(":")
    spatial = params.vae.latent == "spatial"
    every = plan(profile, data, None, None, list(params.denoisers.methods), spatial, subsets(params))
    job = next((j for j in every if j.stage.name == name and (j.denoiser or "") == denoiser), None)
    if job is None:
        print(f"error: no job {spec} in profile {params.profile}", file=sys.stderr)
        return 2
    forced = job.label in os.environ.get("INVARISCOPE_FORCE_JOBS", "").split(",")
    out_dir = ensure(run_dir(params.profile) / "notebooks")
    gpus = [g for g in os.environ.get("INVARISCOPE_GPUS", "").split(",") if g]
    procs = int(os.environ.get(PROCESSES_ENV, "1") or 1)
    parallel = procs > 1 and trains(job)
    claim = (claim_gpu(gpus, run_dir(params.profile) / ".gpu-locks", count=procs if parallel else 1)
             if gpus else contextlib.nullcontext(None))
    with claim as gpu:
        if gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            os.environ["INVARISCOPE_DEVICE"] = "cuda"
            print(f"[{params.profile}] {job.label} on GPU {gpu}", flush=True)
        if parallel:  # the notebook then finds the finished training: no force for it
            _train_parallel(spec, profile, data, procs, forced)
        _execute(job, out_dir / job.output_name, force=forced and not parallel)
    return 0


def trains(job: Job) -> bool:
    """Whether a job has a training loop (a trained denoiser, a VAE, a cINN, the embedding)."""
    from invariscope.workflow import TRAINED  # workflow imports this module

    if job.stage.name == "denoiser":
        return job.denoiser in TRAINED
    return job.stage.name in TRAINING_RULES


def _train_parallel(spec: str, profile: str, data: str | None, procs: int, force: bool) -> None:
    """Train a job's stage on ``procs`` processes through torchrun (:mod:`invariscope.trainer`);
    its notebook, run next in one process, then finds the finished checkpoints."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "invariscope.trainer", spec, "--profile", profile]
    cmd += ["--data", data] if data else []
    cmd += ["--force"] if force else []
    print(f"[torchrun] {' '.join(cmd[2:])}", flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc:
        raise SystemExit(f"stage {spec} failed in data-parallel training (torchrun exit {rc}); "
                         "rerun to resume from its last checkpoint")


def _report_skipped(params: Params) -> None:
    """After a Mayo import with ``on_error: skip``: how many files and patients were skipped,
    and where the report is, on the terminal (not only inside the executed notebook)."""
    # not a cycle: cohort imports torch, which the command line loads only here
    from invariscope.data.cohort import mayo_import_dir

    report = mayo_import_dir(params.data, params.source_file) / "import_report.json"
    try:
        rec = json.loads(report.read_text())
    except (OSError, ValueError):
        return
    files, patients = len(rec.get("skipped_files", [])), len(rec.get("skipped_patients", []))
    if files or patients:
        print(f"warning: the Mayo import skipped {files} file(s) and {patients} patient(s) "
              f"(data.on_error: skip); see {report.with_suffix('.md')}", file=sys.stderr)


def _device(option: str | None, params: Params) -> str:
    """The device the notebooks will use, checked before any stage starts: ``--device`` (exported
    as ``$INVARISCOPE_DEVICE`` for the kernels), else the environment variable, else ``device`` of
    the params file. ValueError for a malformed setting, RuntimeError for a missing GPU."""
    from invariscope import device as devices  # imports torch

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


def _write_timings(jobs: list[Job], profile: str) -> None:
    """``runs/<profile>/timings.csv``: wall seconds, peak memory (MB) and end time of the last
    successful run of every job of ``jobs`` (the full plan, whatever this run selected), from
    Snakemake's per-job benchmark files."""
    from invariscope.workflow import timings_rows  # workflow imports this module

    atomic.write_text(run_dir(profile) / "timings.csv", "\n".join(timings_rows(profile, jobs)) + "\n")


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
    os.environ.pop("MPLBACKEND", None)  # the kernel draws inline: figures land in the notebook
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
