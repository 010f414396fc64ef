"""Your own denoiser from a params file (denoisers.custom) and params files with `base`."""

from __future__ import annotations

import textwrap

import pytest
import torch

from invariscope import pipeline
from invariscope.config.params import ParamsError, load_params
from invariscope.models import custom
from invariscope.provenance import denoiser_fingerprint as fingerprint
from invariscope.stages.denoiser_training import load_denoiser, train_denoiser

MODULE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.a = nn.Conv2d(1, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class PlusHundred(nn.Module):
    def forward(self, x):
        return x + 100.0


class Cropper(nn.Module):
    def forward(self, x):
        return x[..., 2:-2, 2:-2]


def not_a_module():
    return 3
'''


def _write_profile(tmp_path, entry: str, methods: str = "[cnn10, gaussri, mine]",
                   run_name: str = "mine_test") -> str:
    (tmp_path / "mynets.py").write_text(MODULE)
    text = textwrap.dedent(f"""\
        base: smoke
        run_name: {run_name}
        analysis:
          reference: gaussri
        denoisers:
          methods: {methods}
          custom:
            mine:
        """) + textwrap.indent(textwrap.dedent(entry), " " * 6)
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    ns: dict = {}
    exec(MODULE, ns)
    net = ns["TinyNet"](channels=4)
    torch.save({"model_state_dict": net.state_dict(), "epoch": 3}, tmp_path / "tiny.pt")
    return net


def test_custom_module_file_with_weights_gives_the_trained_function(tmp_path, weights):
    profile = _write_profile(tmp_path, """\
        module: mynets.py:TinyNet
        kwargs: {channels: 4}
        weights: tiny.pt
        """)
    params = load_params(profile)
    assert params.profile == "mine_test" and params.denoisers.methods[-1] == "mine"
    assert params.vae == load_params("smoke").vae  # inherited from base: smoke
    model = custom.build_custom("mine", params, (-500.0, 500.0))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), weights(x))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_hu_model_is_wrapped_to_normalized_units(tmp_path):
    params = load_params(_write_profile(tmp_path, """\
        module: mynets.py:PlusHundred
        input: hu
        """))
    model = custom.build_custom("mine", params, (-542.5, 500.0))
    x = torch.randn(1, 1, 8, 8)
    assert torch.allclose(model(x), x + 100.0 / 500.0, atol=1e-6)


def test_training_entry_points_return_the_custom_model(tmp_path, weights, small_dataset):
    profile = _write_profile(tmp_path, """\
        module: mynets.py:TinyNet
        weights: tiny.pt
        """)
    params = load_params(profile)
    trained = train_denoiser("mine", params, small_dataset, tmp_path / "den")
    assert trained.steps == 0 and trained.best_step is None
    loaded = load_denoiser("mine", params, small_dataset, tmp_path / "den")
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(trained.model(x), loaded(x))
    before = fingerprint("mine", params, small_dataset)
    with torch.no_grad():
        weights.a.weight.add_(1.0)
    torch.save(weights.state_dict(), tmp_path / "tiny.pt")  # plain state dict works too
    assert fingerprint("mine", params, small_dataset) != before  # new weights: new identity


@pytest.mark.parametrize("entry, error, match", [
    ("module: mynets.py:TinyNet\nweights: missing.pt\n", FileNotFoundError, "missing.pt"),
    ("module: nothere.py:TinyNet\n", FileNotFoundError, "nothere.py"),
    ("module: mynets.py:Nope\n", AttributeError, "no attribute 'Nope'"),
    ("module: mynets.py:not_a_module\n", TypeError, "not a torch.nn.Module"),
    ("module: mynets.py:TinyNet\nkwargs: {channels: 8}\nweights: tiny.pt\n", ValueError,
     "does not fit"),
])
def test_bad_custom_entries_name_the_problem(tmp_path, weights, entry, error, match):
    params = load_params(_write_profile(tmp_path, entry))
    with pytest.raises(error, match=match):
        custom.build_custom("mine", params, (0.0, 1.0))


def test_params_errors_for_custom_names(tmp_path):
    with pytest.raises(ParamsError, match="unknown denoiser; allowed values: cnn10.*mine"):
        load_params(_write_profile(tmp_path, "module: mynets.py:TinyNet\n", methods="[unet]"))
    path = tmp_path / "clash.yaml"
    path.write_text("base: smoke\ndenoisers:\n  custom:\n    redcnn: {module: 'a.py:B'}\n")
    with pytest.raises(ParamsError, match="name is taken"):
        load_params(path)
    path.write_text("base: smoke\ndenoisers:\n  custom:\n    mine: {module: 'no colon'}\n")
    with pytest.raises(ParamsError, match="denoisers.custom.mine.module"):
        load_params(path)


def test_base_profiles_merge_and_refuse_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 7\n")
    (tmp_path / "b.yaml").write_text("base: smoke\nrun_name: bee\ncinn: {lr: 0.5}\n")
    params = load_params(tmp_path / "a.yaml")
    assert params.seed == 7 and params.cinn.lr == 0.5 and params.profile == "a"
    assert params.cinn.n_blocks == load_params("smoke").cinn.n_blocks
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ParamsError, match="cycle"):
        load_params(tmp_path / "a.yaml")


def test_adding_a_custom_denoiser_keeps_the_finished_jobs(tmp_path):
    """A params file `base: smoke`, `run_name: smoke` plus one custom method reruns only that
    method's jobs and the jobs that summarize every method."""
    smoke = load_params("smoke")
    methods = "[" + ", ".join([*smoke.denoisers.methods, "mine"]) + "]"
    mine = load_params(_write_profile(tmp_path, "module: mynets.py:TinyNet\n", methods=methods,
                                      run_name="smoke"))
    assert mine.profile == "smoke"
    a = pipeline.stamps(pipeline.plan("smoke", None, None, None, list(smoke.denoisers.methods)),
                        smoke.model_dump(mode="json"))
    b = pipeline.stamps(pipeline.plan(str(tmp_path / "mine.yaml"), None, None, None,
                                      list(mine.denoisers.methods)), mine.model_dump(mode="json"))
    changed = {label for label in a if a[label] != b[label]}
    per_method = {label for label in a if "[" in label}
    assert not changed & per_method
    assert {"denoiser[mine]", "vae[mine]", "cinn[mine]", "invariances[mine]"} <= set(b) - set(a)


def test_wrong_output_shape_names_the_method_and_the_contract(tmp_path):
    params = load_params(_write_profile(tmp_path, "module: mynets.py:Cropper\n"))
    model = custom.build_custom("mine", params, (0.0, 1.0))
    with pytest.raises(ValueError, match=r"own denoiser 'mine' \(mynets.py:Cropper\) returned "
                       r"\(2, 1, 12, 12\) for an input of shape \(2, 1, 16, 16\): a denoiser "
                       r"must map a batch \(N, 1, H, W\)"):
        model(torch.zeros(2, 1, 16, 16))
    ok = custom.build_custom("mine", load_params(_write_profile(tmp_path, "module: mynets.py:PlusHundred\n")),
                             (0.0, 1.0))
    assert torch.equal(ok(torch.zeros(1, 1, 8, 8)), torch.full((1, 1, 8, 8), 100.0))
