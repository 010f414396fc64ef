"""README "Analyze your own denoiser", end to end at toy scale: a user's torch module and a
params file are all it takes to get its Table 1 row, invariances, controls, Figure 5 and its
Table 2 row."""

from __future__ import annotations

import textwrap

import matplotlib
import numpy as np
import pytest
import torch
from conftest import TINY_PIPELINE, make_dataset

from invariscope import figures
from invariscope.config.params import load_params
from invariscope.data.loader import Normalizer, fixed_crops
from invariscope.evaluation import denoising
from invariscope.stages import analysis, cinn_training
from invariscope.stages import embedding as emb
from invariscope.stages import invariances as inv
from invariscope.stages import vae_training
from invariscope.stages.denoiser_training import denoise_hu, train_denoiser

matplotlib.use("Agg")

USER_MODULE = '''
import torch
from torch import nn


class ResidualCNN(nn.Module):
    """A user's denoiser: three convolutions, residual."""

    def __init__(self, channels=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, 1, 3, padding=1))

    def forward(self, x):
        return x - self.body(x)
'''



pytestmark = pytest.mark.usefixtures("one_thread")


def test_own_denoiser_from_a_module_and_a_params_file(tmp_path):
    # --- what the user writes: a module file, its weights, a params file
    (tmp_path / "user_net.py").write_text(USER_MODULE)
    ns: dict = {}
    exec(USER_MODULE, ns)
    torch.manual_seed(0)
    net = ns["ResidualCNN"](channels=8)
    torch.save({"model_state_dict": net.state_dict()}, tmp_path / "user_net.pt")
    (tmp_path / "mine.yaml").write_text(textwrap.dedent("""\
        base: smoke
        denoisers:
          methods: [gaussri, mine]
          custom:
            mine:
              module: user_net.py:ResidualCNN
              kwargs: {channels: 8}
              weights: user_net.pt
        analysis:
          reference: mine
        """))
    params = load_params(tmp_path / "mine.yaml", TINY_PIPELINE)
    assert params.profile == "mine" and params.denoisers.methods == ["gaussri", "mine"]

    ds = make_dataset(tmp_path / "ds", size=48)
    norm = Normalizer.of(ds)
    dirs = dict(denoiser_dir=tmp_path / "den", vae_dir=tmp_path / "vae")

    # --- Table 1 row: the user's module, not retrained, evaluated like the built-in ones
    trained = train_denoiser("mine", params, ds, tmp_path / "den")
    low = np.asarray(ds.volume(ds.patients("test")[0], "low")[:1], dtype=np.float32)
    with torch.no_grad():
        expected = norm.to_hu(net(torch.from_numpy(norm(low))[:, None]))[:, 0].numpy()
    assert np.allclose(denoise_hu(trained.model, low, norm), expected, atol=1e-3)
    rows = denoising.evaluate_on_split(ds, lambda hu: denoise_hu(trained.model, hu, norm), "test")
    assert len(rows) == len(ds.slice_index("test")) and rows["rmse"].notna().all()

    # --- its cVAE and cINN; the unconditional VAE and Gauss+RI for the comparison
    for name in (None, "gaussri", "mine"):
        vae_training.train_vae(name, params, ds, tmp_path / "vae", progress=False,
                               denoiser_dir=tmp_path / "den")
    for name in ("gaussri", "mine"):
        cinn_training.train_cinn(name, params, ds, tmp_path / "cinn", progress=False, **dirs)

    # --- invariances, controls, Figure 5
    cfg = params.invariances
    crops = fixed_crops(ds, "test", params.vae.crop_size, 4, cfg.seed)
    sets = {}
    for name in ("gaussri", "mine"):
        f, vae = cinn_training.load_models(name, params, ds, **dirs)
        cinn = cinn_training.load_cinn(name, params, ds, tmp_path / "cinn", **dirs)
        common = dict(dataset=ds, crops=crops, n_invariances=3, batch_size=8, seed=0,
                      chunk_crops=4, progress=False)
        sets[name] = inv.sample_invariances_cached(tmp_path / "inv" / f"{name}.npz", f, vae, cinn,
                                                   prior=False, **common)
        prior = inv.sample_invariances_cached(tmp_path / "inv" / f"{name}_prior.npz", f, vae, None,
                                              prior=True, **common)
        controls = inv.control_measures(sets[name], prior)
        assert set(inv.MEASURES) <= set(controls)
        assert controls["input_change_hu"] > 0 and np.isfinite(controls["output_change_hu"])
    fig = figures.figure5(sets, crop_index=0)
    assert len(fig.axes) == 2 * 6 + 1

    # --- the pooled embedding and Table 2
    trained_emb = emb.train_embedding(params, ds, tmp_path / "emb", progress=False,
                                      cinn_dir=tmp_path / "cinn", **dirs)
    vae_u = vae_training.load_vae(None, params, ds, tmp_path / "vae")
    metrics, _ = analysis.analyze(tmp_path / "inv", params.denoisers.methods, vae_u,
                                  trained_emb.model, norm)
    assert sorted(metrics["denoiser"].unique()) == ["gaussri", "mine"]
    numeric, markdown = analysis.table2(metrics, reference=params.analysis.reference)
    assert "mine" in markdown and "Gauss+RI" in markdown
    assert {"md", "s_vae", "s_dml"} <= set(numeric["metric"])
