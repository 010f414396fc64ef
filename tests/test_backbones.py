"""Backbones: torchvision key layout, local ImageNet weight loading, VGG perceptual loss."""

from __future__ import annotations

import pytest
import torch

from invariscope.models.backbones import (VGGPerceptualLoss, load_imagenet_weights, resnet50, vgg16_features,
                                          vgg19_features, vgg_layer_names)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# Independent description of torchvision's architectures (torchvision.models.vgg / resnet).
VGG_CONVS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def torchvision_vgg_state(kind: str) -> dict[str, torch.Tensor]:
    """A state dict shaped like torchvision's vgg file (features with real shapes; the classifier,
    which loaders ignore, with dummy shapes to keep the file small)."""
    sd: dict[str, torch.Tensor] = {}
    idx, ch = 0, 3
    g = torch.Generator().manual_seed(5)
    for v in VGG_CONVS[kind]:
        if v == "M":
            idx += 1
            continue
        sd[f"features.{idx}.weight"] = torch.randn(v, ch, 3, 3, generator=g) * 0.05
        sd[f"features.{idx}.bias"] = torch.randn(v, generator=g) * 0.05
        ch, idx = v, idx + 2
    for i in (0, 3, 6):
        sd[f"classifier.{i}.weight"] = torch.zeros(2, 2)
        sd[f"classifier.{i}.bias"] = torch.zeros(2)
    return sd


def torchvision_resnet50_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{k}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for li, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"] = (1000, 2048)
    shapes["fc.bias"] = (1000,)
    return shapes


# ------------------------------------------------------------------------------ key layout
def test_parameter_counts():
    assert n_params(vgg19_features()) == 20_024_384
    assert n_params(vgg16_features()) == 14_714_688
    assert n_params(resnet50()) == 25_557_032


@pytest.mark.parametrize("kind, build", [("vgg16", vgg16_features), ("vgg19", vgg19_features)])
def test_vgg_key_layout(kind, build):
    own = {k: tuple(v.shape) for k, v in build().state_dict().items()}
    ref = {k: tuple(v.shape) for k, v in torchvision_vgg_state(kind).items() if k.startswith("features.")}
    assert own == ref
    last = 28 if kind == "vgg16" else 34
    assert own[f"features.{last}.weight"] == (512, 512, 3, 3)
    assert own["features.0.weight"] == (64, 3, 3, 3)


def test_resnet50_key_layout():
    own = {k: tuple(v.shape) for k, v in resnet50().state_dict().items()}
    ref = torchvision_resnet50_shapes()
    assert list(own) == list(ref)  # same order as torchvision
    assert own == ref
    assert len(own) == 320


def test_layer_names():
    assert vgg_layer_names("vgg19")["conv5_4"] == 34
    v16 = vgg_layer_names("vgg16")
    assert [v16[n] for n in ("relu1_2", "relu2_2", "relu3_3", "relu4_3")] == [3, 8, 15, 22]


# --------------------------------------------------------------------------- weight loading
def test_load_vgg_file(tmp_path):
    sd = torchvision_vgg_state("vgg19")
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(sd, path)
    net = vgg19_features()
    assert load_imagenet_weights(net, str(path)) is True
    assert torch.equal(net.state_dict()["features.34.weight"], sd["features.34.weight"])


def test_load_resnet_file_strict_and_partial(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {
        k: (torch.tensor(3) if k.endswith("num_batches_tracked") else torch.randn(*s, generator=g))
        for k, s in torchvision_resnet50_shapes().items()
    }
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(sd, path)
    net = resnet50()
    assert load_imagenet_weights(net, path)
    assert torch.equal(net.layer3[5].conv2.weight, sd["layer3.5.conv2.weight"])
    # a 2-channel stem and a new head: strict fails naming the keys, strict=False loads the rest
    enc = resnet50(num_classes=10, in_channels=2)
    with pytest.raises(RuntimeError) as err:
        load_imagenet_weights(enc, path)
    assert "conv1.weight" in str(err.value) and "resnet50-0676ba61.pth" in str(err.value)
    before = enc.conv1.weight.clone()
    assert load_imagenet_weights(enc, path, strict=False)
    assert torch.equal(enc.conv1.weight, before)
    assert torch.equal(enc.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


def test_missing_and_none(tmp_path):
    net = vgg19_features()
    assert load_imagenet_weights(net, None) is False
    with pytest.raises(FileNotFoundError) as err:
        load_imagenet_weights(net, tmp_path / "weights" / "vgg19.pth", params_key="vae.vgg_weights")
    msg = str(err.value)
    assert "vgg19-dcbb9e9d.pth" in msg and "download.pytorch.org" in msg and "vae.vgg_weights" in msg
    with pytest.raises(FileNotFoundError, match="resnet50-0676ba61.pth"):
        load_imagenet_weights(resnet50(), tmp_path / "r.pth")


def test_mismatched_file(tmp_path):
    sd = torchvision_vgg_state("vgg16")
    del sd["features.28.bias"]
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match=r"features\.28\.bias"):
        load_imagenet_weights(vgg16_features(), path)


# --------------------------------------------------------------------------- perceptual loss
def test_perceptual_loss_random_fallback():
    loss = VGGPerceptualLoss(kind="vgg16")
    assert loss.pretrained is False
    assert loss.layer_indices == (3, 8, 15, 22)
    assert all(not p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.training and not loss.features.training
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 32, 32, generator=g)
    y = x + 0.1 * torch.randn(2, 1, 32, 32, generator=g)
    assert loss(x, x).item() == 0.0
    d = loss(x, y)
    assert d.item() > 0
    # deterministic fallback: a second instance gives the same value; global RNG untouched
    state = torch.get_rng_state()
    assert torch.equal(VGGPerceptualLoss(kind="vgg16")(x, y), d)
    assert torch.equal(torch.get_rng_state(), state)
    # gradients reach the input
    xr = x.clone().requires_grad_(True)
    loss(xr, y).backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0


def test_perceptual_loss_vgg19_and_options(tmp_path):
    path = tmp_path / "vgg19-dcbb9e9d.pth"
    torch.save(torchvision_vgg_state("vgg19"), path)
    loss = VGGPerceptualLoss(weights_path=path, kind="vgg19", norm="mse")
    assert loss.pretrained is True
    assert loss.layer_indices == (34,) and len(loss.features) == 35
    x = torch.randn(1, 1, 32, 32)
    assert loss(x, x).item() == 0.0 and loss(x, -x).item() > 0
    win = VGGPerceptualLoss(kind="vgg16", layers=["relu1_2", 8], input_mapping="imagenet")
    assert win.layer_indices == (3, 8)
    v = win.to_vgg_input(torch.zeros(1, 1, 4, 4))
    assert v.shape == (1, 3, 4, 4)
    assert win(x, x).item() == 0.0 and win(x, x + 0.5).item() > 0
    with pytest.raises(ValueError):
        VGGPerceptualLoss(kind="vgg16", layers=["conv5_4"])
    with pytest.raises(FileNotFoundError):
        VGGPerceptualLoss(weights_path=tmp_path / "missing.pth")
