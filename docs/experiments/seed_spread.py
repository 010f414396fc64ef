"""Seed spread of the default profile's headline numbers (Table 1, controls, Table 2).

Reads the figures of three runs of the default profile that differ only in the training seed
(the cohort is the same): ``figures/default`` (seed 1332, the committed run) and the runs of
``params/experiments/seed_1.yaml`` and ``seed_2.yaml`` (``figures/default_seed1``,
``figures/default_seed2``), and writes per number its three values, mean and SD to
``docs/experiments/seed_spread.csv`` (what ``./run_all.sh --check`` reads) and a summary to
``docs/experiments/seed_spread.md``.

    ./run_all.sh --profile params/experiments/seed_1.yaml
    ./run_all.sh --profile params/experiments/seed_2.yaml
    .venv/bin/python docs/experiments/seed_spread.py
"""

from __future__ import annotations

from pathlib import Path

from invariscope import atomic
from invariscope.config.paths import figures_dir
from invariscope.evaluation import headline

HERE = Path(__file__).resolve().parent
RUNS = {"seed1332": "default", "seed1": "default_seed1", "seed2": "default_seed2"}


def main() -> None:
    runs = {name: figures_dir(folder) for name, folder in RUNS.items() if figures_dir(folder).is_dir()}
    table = headline.spread(runs)
    atomic.write_text(HERE / "seed_spread.csv", table.to_csv(float_format="%.6g"))
    lines = ["# Seed spread of the default profile", "",
             f"Runs: {', '.join(runs)} (`docs/experiments/seed_spread.py`). Mean ± SD over seeds "
             "(sample SD); `n` seeds with the number.", "",
             "| number | mean ± SD over seeds | values |", "|---|---|---|"]
    for key, row in table.iterrows():
        vals = [row[r] for r in runs if row[r] == row[r]]
        lines.append(f"| `{key}` | {row['mean']:.4g} ± {row['sd']:.2g} | "
                     + ", ".join(f"{v:.4g}" for v in vals) + " |")
    atomic.write_text(HERE / "seed_spread.md", "\n".join(lines) + "\n")
    print(f"{len(table)} numbers over {len(runs)} runs -> {HERE / 'seed_spread.csv'}")


if __name__ == "__main__":
    main()
