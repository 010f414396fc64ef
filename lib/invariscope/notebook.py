"""The one call every notebook starts with: its parameters in, the profile, data and folders out.

    from invariscope.notebook import setup
    nb = setup(profile, data_root)          # params, dataset, folders
    params, dataset = nb.params, nb.dataset

Paths come from the repository root (:mod:`invariscope.config.paths`), so a notebook runs the same
under papermill, nbval and JupyterLab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from invariscope.config.params import Params, load_params
from invariscope.config.paths import ensure, figures_dir, run_dir
from invariscope.data.cohort import prepare_dataset
from invariscope.data.dataset import CTDataset
from invariscope.provenance import stage_dir

__all__ = ["Setup", "setup"]


@dataclass
class Setup:
    """What a notebook works with: the validated ``params``, the prepared ``dataset`` (None when
    not asked for), ``runs`` (``runs/<profile>``) and ``figures`` (``figures/<profile>``, created)."""

    params: Params
    dataset: CTDataset | None
    runs: Path
    figures: Path

    def dir(self, stage: str, create: bool = False) -> Path:
        """``runs/<profile>/<stage>`` (:func:`invariscope.provenance.stage_dir`)."""
        path = stage_dir(self.params, stage)
        return ensure(path) if create else path


def setup(profile: str, data_root: str = "", *, dataset: bool = True, force_data: bool = False) -> Setup:
    """Load the params of ``profile`` (a profile name or a params file; ``data_root``: a Mayo
    LDCT-and-Projection-data folder instead of the profile's data source) and, with ``dataset``,
    prepare its data set (``force_data``: simulate or import it again)."""
    overrides = {"data.source": "mayo", "data.mayo_root": data_root} if data_root else {}
    params = load_params(profile, overrides)
    data = prepare_dataset(params, force=force_data) if dataset else None
    return Setup(params, data, run_dir(params.profile), ensure(figures_dir(params.profile)))
