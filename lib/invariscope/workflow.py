"""The pipeline as a Snakemake workflow (``workflow/Snakefile``): the files each job writes and
reads, its stamp (the rerun trigger), its threads and resources.

Snakemake decides what runs: a job runs when one of its outputs is missing, when it was
interrupted (``--rerun-incomplete``), when its stamp changed (the ``params`` trigger: the code
cells of its notebook, the params sections it reads, its upstream stamps) or when an input is
newer than its outputs. A markdown edit changes no stamp. Outputs are deleted by Snakemake
before a job reruns; training resumes from ``last.pt``, which keeps a copy of the best weights.
"""

from __future__ import annotations

import fcntl
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from invariscope.config.params import Params, load_params
from invariscope.config.paths import repo_root
from invariscope.pipeline import STAGES, Job, Stage, custom_identities, plan, stamps, subsets, upstream

#: Methods with a training loop (their denoiser job writes ``best.pt``).
TRAINED = ("cnn10", "redcnn", "wganvgg", "dugan")

#: Per stage: the files a job writes besides its executed notebook (``{R}``: runs/<profile>,
#: ``{F}``: figures/<profile>, ``{d}``: the denoiser, or the extra run such as ``unconditional``).
PRODUCTS: dict[str, tuple[str, ...]] = {
    "data": ("{F}/data_physics.csv", "{F}/split.csv", "{F}/data_examples.png"),
    "denoiser": ("{R}/denoisers/{d}/test_metrics.csv",),
    "table1": ("{F}/table1.md", "{F}/table1.csv", "{F}/figure3.png"),
    "vae": ("{R}/vae/{d}/best.pt",),
    "figure4": ("{F}/figure4.png", "{F}/vae_reconstruction.csv"),
    "cinn": ("{R}/cinn/{d}/best.pt",),
    "invariances": ("{R}/invariances/{d}.npz", "{R}/invariances/{d}_controls.json",
                    "{R}/invariances/{d}_prior.npz"),
    "figure5": ("{F}/figure5.png", "{F}/controls.csv"),
    "embedding": ("{R}/embedding/summary.json",),
    "analysis": ("{F}/table2.md", "{F}/table2.csv", "{F}/figure6.png", "{F}/figure7.png"),
    "optimized": ("{R}/optimized/{d}_summary.json",),
    "methods": ("{F}/invariance_methods.csv", "{F}/invariance_methods.md",
                "{F}/invariance_methods_controls.csv", "{F}/invariance_methods.png",
                "{F}/figure5_output_sd.png"),
    "layerwise": ("{R}/layerwise/{d}_summary.json",),
    "layerwise_summary": ("{F}/layerwise.csv", "{F}/layerwise.png"),
}


def stage(name: str) -> Stage:
    """The :data:`~invariscope.pipeline.STAGES` entry called ``name``."""
    return next(s for s in STAGES if s.name == name)


def notebook_out(profile: str, job_stage: Stage, denoiser: str | None) -> str:
    """The executed notebook of a job, relative to the repository root."""
    stem = Path(job_stage.notebook).stem
    name = f"{stem}_{denoiser}.ipynb" if denoiser else f"{stem}.ipynb"
    return f"runs/{profile}/notebooks/{name}"


def outputs(profile: str, job_stage: Stage, denoiser: str | None) -> list[str]:
    """Every file a job writes that the workflow tracks (executed notebook first); ``denoiser``
    may be a Snakemake wildcard such as ``"{denoiser}"``."""
    files = [notebook_out(profile, job_stage, denoiser)]
    products = PRODUCTS[job_stage.name]
    if job_stage.name == "denoiser" and denoiser in TRAINED + ("{denoiser}",):
        products = products + ("{R}/denoisers/{d}/best.pt",)
    files += [p.format(R=f"runs/{profile}", F=f"figures/{profile}", d=denoiser) for p in products]
    return files


@dataclass
class Workflow:
    """One profile's full job list with stamps, and what a run selected."""

    params: Params
    profile_arg: str  # as passed to the notebooks (a name, or an absolute YAML path)
    data_root: str
    jobs: list[Job]
    stamps: dict[str, str]
    threads: int = 1

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Workflow":
        """Built from Snakemake's ``config`` (keys ``profile``, ``data``, ``threads``)."""
        profile = str(config.get("profile", "default"))
        data = str(config.get("data") or "")
        overrides = {"data.source": "mayo", "data.mayo_root": data} if data else {}
        params = load_params(profile, overrides)
        spatial = params.vae.latent == "spatial"
        jobs = plan(profile, data or None, None, None, list(params.denoisers.methods), spatial,
                    subsets(params))
        dump = params.model_dump(mode="json")
        return cls(params, profile, data, jobs, stamps(jobs, dump, custom_identities(params)),
                   max(1, int(config.get("threads", 1))))

    @property
    def profile(self) -> str:
        """The run name (``runs/<profile>``, ``figures/<profile>``)."""
        return self.params.profile

    def job(self, stage_name: str, denoiser: str | None = None) -> Job:
        for j in self.jobs:
            if j.stage.name == stage_name and j.denoiser == denoiser:
                return j
        raise KeyError(f"no job {stage_name}[{denoiser}] in profile {self.profile}")

    def outputs(self, job: Job) -> list[str]:
        return outputs(self.profile, job.stage, job.denoiser)

    def upstream(self, job: Job) -> list[Job]:
        """The jobs whose outputs ``job`` reads (:func:`~invariscope.pipeline.upstream`)."""
        return upstream(self.jobs, job)

    def inputs(self, stage_name: str, denoiser: str | None = None) -> list[str]:
        """Input files of a job: the outputs of its upstream jobs."""
        return [f for j in self.upstream(self.job(stage_name, denoiser)) for f in self.outputs(j)]

    def has(self, stage_name: str) -> bool:
        """Whether the profile runs the stage at all (a stage with a ``subset`` may be skipped)."""
        return any(j.stage.name == stage_name for j in self.jobs)

    def stamp(self, stage_name: str, denoiser: str | None = None) -> str:
        return self.stamps[self.job(stage_name, denoiser).label]

    def denoiser_runs(self, stage_name: str) -> list[str]:
        """The ``denoiser`` values of a per-denoiser stage (extra runs first)."""
        return [j.denoiser for j in self.jobs if j.stage.name == stage_name and j.denoiser]

    def wildcard_pattern(self, stage_name: str, trained: bool | None = None) -> str:
        """Regex of the ``denoiser`` wildcard of a per-denoiser rule (``trained``: only the
        methods with a training loop, or only those without)."""
        names = self.denoiser_runs(stage_name)
        if trained is not None:
            names = [n for n in names if (n in TRAINED) == trained]
        return "|".join(re.escape(n) for n in names) or "(?!)"

    def benchmark(self, stage_name: str, denoiser: str | None = None) -> str:
        """Snakemake's per-job record of wall time and peak memory."""
        return benchmark_file(self.profile, stage_name, denoiser)

    def resources(self, stage_name: str) -> dict[str, Any]:
        """Snakemake resources of a stage's jobs for a cluster executor (params ``cluster``)."""
        return self.params.cluster.resources(stage_name)


def benchmark_file(profile: str, stage_name: str, denoiser: str | None) -> str:
    """A job's Snakemake benchmark file, relative to the repository root."""
    label = f"{stage_name}_{denoiser}" if denoiser else stage_name
    return f"runs/{profile}/benchmarks/{label}.tsv"


def timings_rows(profile: str, jobs: list[Job]) -> list[str]:
    """``runs/<profile>/timings.csv`` rows from Snakemake's benchmark files: per job its wall
    seconds, peak resident memory (MB) and when it finished."""
    rows = ["job,seconds,max_rss_mb,finished"]
    for job in jobs:
        f = repo_root() / benchmark_file(profile, job.stage.name, job.denoiser)
        try:
            head, values = f.read_text().splitlines()[:2]
        except (OSError, ValueError):
            continue
        rec = dict(zip(head.split("\t"), values.split("\t")))
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f.stat().st_mtime))
        rows.append(f"{job.label},{float(rec.get('s', 'nan')):.1f},{rec.get('max_rss', '')},{finished}")
    return rows


@contextmanager
def claim_gpu(gpus: list[str], lock_dir: Path, wait_s: float = 0.5, count: int = 1) -> Iterator[str]:
    """Hold ``count`` GPUs of ``gpus`` for the lifetime of a job (yields them comma-separated, as
    ``CUDA_VISIBLE_DEVICES`` wants them): an exclusive lock file per device (Snakemake's ``gpu``
    resource caps how many GPUs jobs hold at once; this picks which devices)."""
    if not 1 <= count <= len(gpus):
        raise ValueError(f"a job asks for {count} GPU(s) of {len(gpus)} ({','.join(gpus)})")
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        held: list[tuple[str, Any]] = []
        for gpu in gpus:
            fh = open(lock_dir / f"gpu{gpu}.lock", "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            held.append((gpu, fh))
            if len(held) == count:
                break
        if len(held) == count:
            try:
                yield ",".join(g for g, _ in held)
            finally:
                for _, fh in held:
                    fcntl.flock(fh, fcntl.LOCK_UN)
                    fh.close()
            return
        for _, fh in held:  # not enough free devices: let go and wait
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        time.sleep(wait_s)
