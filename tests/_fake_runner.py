"""Stand-in for ``python -m invariscope.pipeline --run-job`` in the workflow tests: records the
job (and whether it was forced) in ``$INVARISCOPE_ROOT/calls.jsonl`` and writes every output the
workflow expects of it, in milliseconds instead of minutes.

``$FAKE_INTERRUPT=<label>``: at that job, kill the Snakemake process (SIGKILL, like a power cut)
after writing part of the outputs, leaving the job half done.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

from invariscope.config.params import load_params
from invariscope.pipeline import STAGES
from invariscope.workflow import outputs


def _snakemake_pid() -> int:
    pid = os.getppid()
    while pid > 1:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"snakemake" in cmd:
            return pid
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise RuntimeError("no snakemake process above this job")


def main(argv: list[str]) -> int:
    spec, rest = argv[0], argv[1:]
    profile = rest[rest.index("--profile") + 1]
    name, _, denoiser = spec.partition(":")
    params = load_params(profile)
    stage = next(s for s in STAGES if s.name == name)
    label = f"{name}[{denoiser}]" if denoiser else name
    forced = label in os.environ.get("INVARISCOPE_FORCE_JOBS", "").split(",")
    root = Path(os.environ["INVARISCOPE_ROOT"])
    with open(root / "calls.jsonl", "a") as fh:
        fh.write(json.dumps({"job": label, "force": forced}) + "\n")
    files = outputs(params.profile, stage, denoiser or None)
    if os.environ.get("FAKE_INTERRUPT") == label:
        (root / files[-1]).parent.mkdir(parents=True, exist_ok=True)
        (root / files[-1]).write_text("half written\n")
        os.kill(_snakemake_pid(), signal.SIGKILL)
        time.sleep(30)
        return 1
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        text = (json.dumps({"cells": [], "metadata": {"job": label}, "nbformat": 4, "nbformat_minor": 5})
                if f.endswith(".ipynb") else label)
        (root / f).write_text(f"{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
