"""Table 1: denoisers evaluated on full test slices as the authors did (and Figure 3's examples;
the figure itself: :func:`invariscope.figures.figure3`).

Per full test slice: SSIM and PSNR in the lung window (C -600 / W 1500 HU) mapped to [0, 1], RMSE
in HU on values clipped to [-1024, 1900] (:mod:`invariscope.evaluation.metrics`); mean ± SD over slices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from invariscope import atomic
from invariscope.data.dataset import CTDataset
from invariscope.evaluation.metrics import evaluate_slices, summarize
from invariscope.names import LABELS

Denoise = Callable[[np.ndarray], np.ndarray]  # (n, H, W) HU -> (n, H, W) HU

#: The paper's Table 1 (Mayo chest test set), mean and SD over slices.
PAPER_TABLE1 = {
    "LD": {"ssim": (0.312, 0.072), "psnr": (18.1, 2.5), "rmse": (236, 86)},
    "CNN-10": {"ssim": (0.56, 0.10), "psnr": (27.3, 2.1), "rmse": (72, 19)},
    "RED-CNN": {"ssim": (0.58, 0.10), "psnr": (28.0, 2.2), "rmse": (66, 18)},
    "WGAN-VGG": {"ssim": (0.505, 0.099), "psnr": (25.3, 2.2), "rmse": (91, 26)},
    "DU-GAN": {"ssim": (0.544, 0.096), "psnr": (26.3, 2.2), "rmse": (80, 22)},
}
METRICS = ("ssim", "psnr", "rmse")
_DECIMALS = {"ssim": 3, "psnr": 1, "rmse": 0}


def evaluate_on_split(dataset: CTDataset, denoise: Denoise | None, split: str = "test",
                      progress: bool = True, desc: str = "evaluating") -> pd.DataFrame:
    """Per-slice metrics of ``denoise`` (None = the low-dose input itself) against full dose."""
    rows = []
    for pid in tqdm(dataset.patients(split), desc=desc, disable=not progress):
        low = np.asarray(dataset.volume(pid, "low"), dtype=np.float32)
        full = np.asarray(dataset.volume(pid, "full"), dtype=np.float32)
        pred = low if denoise is None else denoise(low)
        m = evaluate_slices(pred, full)
        for k in range(low.shape[0]):
            rows.append({"patient": pid, "slice": k, **{n: float(m[n][k]) for n in METRICS}})
    return pd.DataFrame(rows)


def table1(per_method: Mapping[str, pd.DataFrame]) -> tuple[pd.DataFrame, str]:
    """Table 1 from per-slice metrics: (numeric table, markdown with the paper's values beside)."""
    rows, md_rows = [], []
    for key, df in per_method.items():
        label = LABELS.get(key, key)
        row = {"method": label, "n_slices": len(df)}
        cells = []
        for m in METRICS:
            mean, sd = summarize(df[m].to_numpy())
            row[f"{m}_mean"], row[f"{m}_sd"] = mean, sd
            d = _DECIMALS[m]
            cells.append(f"{mean:.{d}f} ± {sd:.{d}f}")
        paper = PAPER_TABLE1.get(label)
        pcells = [f"{paper[m][0]} ± {paper[m][1]}" if paper else "–" for m in METRICS]
        rows.append(row)
        md_rows.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(pcells) + " |")
    numeric = pd.DataFrame(rows)
    best = {m: numeric[f"{m}_mean"].iloc[1:].agg("idxmin" if m == "rmse" else "idxmax")
            for m in METRICS} if len(numeric) > 1 else {}
    for m, i in best.items():  # bold the best denoiser per metric, as in the paper
        parts = md_rows[i].split(" | ")
        j = 1 + METRICS.index(m)
        parts[j] = f"**{parts[j]}**"
        md_rows[i] = " | ".join(parts)
    header = ("| | SSIM | PSNR (dB) | RMSE (HU) | paper SSIM | paper PSNR (dB) | paper RMSE (HU) |\n"
              "|---|---|---|---|---|---|---|")
    n = int(numeric["n_slices"].iloc[0]) if len(numeric) else 0
    note = (f"\n\nMean ± SD over {n} full test slices; SSIM/PSNR in the lung window "
            "(C −600 / W 1500 HU) mapped to [0, 1]; RMSE on HU clipped to [−1024, 1900]. "
            "Bold: best denoiser per metric. Paper: Mayo chest test set (Eulig et al. 2025, Table 1).")
    return numeric, header + "\n" + "\n".join(md_rows) + note + "\n"


def write_table1(numeric: pd.DataFrame, markdown: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``table1.csv`` and ``table1.md`` atomically."""
    out_dir = Path(out_dir)
    csv_path, md_path = out_dir / "table1.csv", out_dir / "table1.md"
    atomic.write_text(csv_path, numeric.to_csv(index=False))
    atomic.write_text(md_path, markdown)
    return csv_path, md_path


def pick_examples(dataset: CTDataset, crop: int, seed: int, split: str = "test") -> list[dict]:
    """One random slice per patient and a random zoom crop centred inside the body (seeded)."""
    rng = np.random.default_rng(seed)
    out = []
    for pid in dataset.patients(split):
        n = dataset.info(pid).n_slices
        k = int(rng.integers(n))
        full = np.asarray(dataset.volume(pid, "full")[k])
        inside = np.argwhere(full > -500)  # body pixels
        h, w = full.shape
        cy, cx = inside[rng.integers(len(inside))] if len(inside) else (h // 2, w // 2)
        top = int(np.clip(cy - crop // 2, 0, h - crop))
        left = int(np.clip(cx - crop // 2, 0, w - crop))
        out.append({"patient": pid, "slice": k, "top": top, "left": left, "size": crop})
    return out
