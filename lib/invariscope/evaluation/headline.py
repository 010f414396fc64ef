"""The headline numbers of a run (Table 1, the controls, Table 2), their spread over training
seeds, and the check of a finished run against the committed results within that spread.

``./run_all.sh --check [--profile P]`` compares ``figures/<P>/`` with the committed
``figures/<P>/`` (``git show HEAD:...``) number by number; a number is *within* when it differs
by at most :data:`K_SD` seed SDs (``docs/experiments/seed_spread.csv``) or by its printed
rounding. The cohort's content hash must be equal.
"""

from __future__ import annotations

import io
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from invariscope.config.paths import figures_dir, repo_root

#: Seed SDs a number may differ by and still be "within".
K_SD = 3.0
#: The seed-spread table (written by docs/experiments/seed_spread.py).
SPREAD_FILE = Path("docs") / "experiments" / "seed_spread.csv"
#: Printed rounding of each kind of number (the smallest difference that counts).
_FLOOR = {"ssim": 0.001, "psnr": 0.05, "rmse": 0.5, "s_vae": 0.001, "s_dml": 0.001, "md": 0.05}


def _table1(text: str) -> dict[str, float]:
    df = pd.read_csv(io.StringIO(text))
    return {f"table1/{r.method}/{m}": float(getattr(r, f"{m}_mean"))
            for r in df.itertuples() for m in ("ssim", "psnr", "rmse")}


def _controls(text: str) -> dict[str, float]:
    df = pd.read_csv(io.StringIO(text)).set_index("denoiser")
    return {f"controls/{d}/{c}": float(v) for d, row in df.iterrows() for c, v in row.items()
            if pd.notna(v)}


def _table2(text: str) -> dict[str, float]:
    df = pd.read_csv(io.StringIO(text))
    return {f"table2/{r.label}/{r.metric}": float(r.mean) for r in df.itertuples()}


READERS: dict[str, Callable[[str], dict[str, float]]] = {
    "table1.csv": _table1, "controls.csv": _controls, "table2.csv": _table2}


def numbers(read: Callable[[str], str | None]) -> dict[str, float]:
    """Every headline number of a run; ``read(name)`` returns a table's text or None."""
    out: dict[str, float] = {}
    for name, parse in READERS.items():
        text = read(name)
        if text is not None:
            out |= parse(text)
    return out


def from_folder(folder: Path) -> dict[str, float]:
    """:func:`numbers` of a figures folder."""
    return numbers(lambda n: (folder / n).read_text() if (folder / n).is_file() else None)


def committed_text(profile: str, name: str) -> str | None:
    """A committed file of ``figures/<profile>/`` (git HEAD), or None."""
    rel = f"figures/{profile}/{name}"
    res = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=repo_root(), capture_output=True,
                         text=True)
    return res.stdout if res.returncode == 0 else None


def cohort_hash(text: str | None) -> str | None:
    """The cohort content hash recorded in a ``data_physics.csv`` text."""
    if text is None:
        return None
    df = pd.read_csv(io.StringIO(text), index_col=0)
    return str(df.loc["cohort content hash", "value"]) if "cohort content hash" in df.index else None


def spread(runs: Mapping[str, Path]) -> pd.DataFrame:
    """Per headline number: its value in each run (a figures folder per seed), mean and SD."""
    per_run = {name: from_folder(folder) for name, folder in runs.items()}
    keys = sorted(set().union(*per_run.values()))
    df = pd.DataFrame({name: [vals.get(k, np.nan) for k in keys] for name, vals in per_run.items()},
                      index=pd.Index(keys, name="number"))
    df["mean"] = df[list(runs)].mean(axis=1)
    df["sd"] = df[list(runs)].std(axis=1, ddof=1)
    return df


def tolerance(key: str, sd: float | None) -> float:
    """How far a number may move: K_SD seed SDs, at least its printed rounding."""
    floor = _FLOOR.get(key.rsplit("/", 1)[-1], 0.0)
    return max(K_SD * sd if sd is not None and np.isfinite(sd) else 0.0, floor)


def check(current: Mapping[str, float], committed: Mapping[str, float],
          sds: Mapping[str, float]) -> pd.DataFrame:
    """Per committed number: the committed and current values, the tolerance and the verdict
    (``within``, ``outside``, ``missing``, or ``no spread`` when no seed SD is known and the
    values differ beyond the rounding)."""
    rows = []
    for key, ref in committed.items():
        now = current.get(key)
        sd = sds.get(key)
        tol = tolerance(key, sd)
        if now is None or not np.isfinite(now):
            verdict = "missing"
        elif abs(now - ref) <= tol + 1e-12:
            verdict = "within"
        else:
            verdict = "outside" if sd is not None and np.isfinite(sd) else "no spread"
        rows.append({"number": key, "committed": ref, "this run": now, "tolerance": tol,
                     "verdict": verdict})
    return pd.DataFrame(rows)


def run_check(profile: str) -> int:
    """``./run_all.sh --check``: print the comparison; 0 when every number is within."""
    folder = figures_dir(profile)
    sds: dict[str, float] = {}
    spread_file = repo_root() / SPREAD_FILE
    if spread_file.is_file():
        sds = pd.read_csv(spread_file, index_col=0)["sd"].dropna().to_dict()
    committed = numbers(lambda n: committed_text(profile, n))
    if not committed:
        print(f"error: no committed tables in figures/{profile}/ (git HEAD) to compare with")
        return 2
    table = check(from_folder(folder), committed, sds)
    ok_hash = cohort_hash(committed_text(profile, "data_physics.csv"))
    now_hash = cohort_hash((folder / "data_physics.csv").read_text()
                           if (folder / "data_physics.csv").is_file() else None)
    with pd.option_context("display.max_rows", None, "display.width", 140):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    counts = table["verdict"].value_counts().to_dict()
    print(f"\n{len(table)} numbers: " + ", ".join(f"{v} {k}" for k, v in counts.items())
          + f" (tolerance: {K_SD:g} seed SDs from {SPREAD_FILE}, at least the printed rounding)")
    same = ok_hash is not None and ok_hash == now_hash
    print(f"cohort hash: {now_hash} ({'identical to' if same else 'DIFFERS from'} the committed "
          f"{ok_hash})")
    return 0 if same and counts.get("within", 0) == len(table) else 1
