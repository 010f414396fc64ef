"""The ``device`` setting: validation, resolution, the environment override, moving batches.

No GPU is needed: CUDA's presence is simulated where a test needs it (resolution only; nothing
is moved to a GPU here).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invariscope import device as devices
from invariscope.config.params import ParamsError, load_params
from invariscope.pipeline import run


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(devices.ENV, raising=False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv(devices.ENV, raising=False)


def test_profiles_device_settings():
    assert load_params("smoke").device == "cpu"
    assert load_params("default").device == "cpu"  # the committed figures were computed on the CPU
    assert load_params("paper").device == "auto"


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cpu0", ""])
def test_bad_device_names_file_key_and_allowed(tmp_path, value):
    f = tmp_path / "p.yaml"
    f.write_text(f"base: smoke\ndevice: '{value}'\n")
    with pytest.raises(ParamsError) as err:
        load_params(f)
    msg = str(err.value)
    assert str(f) in msg and "device" in msg and "'cuda:<index>'" in msg and repr(value) in msg


def test_device_setting_is_normalized():
    assert load_params("smoke", {"device": " CUDA:1 "}).device == "cuda:1"


def test_auto_without_gpu_is_cpu(no_gpu):
    assert devices.resolve("auto") == torch.device("cpu")
    assert devices.resolve("cpu") == torch.device("cpu")


def test_cuda_without_gpu_says_what_to_do(no_gpu):
    with pytest.raises(RuntimeError) as err:
        devices.resolve("cuda", where="device in params/paper.yaml")
    msg = str(err.value)
    assert "device in params/paper.yaml = 'cuda'" in msg and "sees no CUDA GPU" in msg
    assert "CUDA build of torch" in msg and "'cpu' or 'auto'" in msg


def test_resolution_with_gpus(two_gpus):
    assert devices.resolve("auto") == torch.device("cuda", 0)
    assert devices.resolve("cuda") == torch.device("cuda", 0)
    assert devices.resolve("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(RuntimeError, match=r"2 CUDA device\(s\), indices 0\.\.1"):
        devices.resolve("cuda:2")


def test_environment_overrides_params(no_gpu, monkeypatch):
    params = load_params("paper")
    assert devices.of(params) == torch.device("cpu")
    monkeypatch.setenv(devices.ENV, "cuda")
    with pytest.raises(RuntimeError, match=r"\$INVARISCOPE_DEVICE = 'cuda'"):
        devices.of(params)
    monkeypatch.setenv(devices.ENV, "cpu")
    assert devices.of(load_params("smoke", {"device": "cuda"})) == torch.device("cpu")


def test_to_device_keeps_structure():
    batch = {"a": (torch.ones(2), [torch.zeros(1), 3]), "b": "text"}
    moved = devices.to_device(batch, torch.device("cpu"))
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list)
    assert moved["a"][1][1] == 3 and moved["b"] == "text"
    assert torch.equal(moved["a"][0], torch.ones(2))


def test_module_device():
    assert devices.module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert devices.module_device(nn.ReLU()) == torch.device("cpu")  # no tensors at all
    assert devices.module_device(lambda x: x) == torch.device("cpu")


def test_run_all_checks_device_before_starting(no_gpu, capsys, monkeypatch):
    assert run(["--profile", "smoke", "--device", "gpu", "--dry-run"]) == 2
    assert "device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'" in capsys.readouterr().err
    assert run(["--profile", "smoke", "--device", "cuda", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--device = 'cuda'" in err and "sees no CUDA GPU" in err
    monkeypatch.setenv(devices.ENV, "cpu")  # restored after the test: run() exports --device
    assert run(["--profile", "smoke", "--device", "cpu", "--dry-run"]) == 0
    assert "[smoke] networks run on cpu" in capsys.readouterr().out


def test_paper_dry_run_reports_cpu_fallback(no_gpu, capsys):
    assert run(["--profile", "paper", "--dry-run"]) == 0
    assert "networks run on cpu (auto: no CUDA GPU seen)" in capsys.readouterr().out
