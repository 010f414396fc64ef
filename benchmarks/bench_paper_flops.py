"""Count the floating-point work of the paper profile, stage by stage, to estimate its GPU runtime.

Usage (from the repository root)::

    PYTHONPATH=lib .venv/bin/python benchmarks/bench_paper_flops.py            # print the table
    PYTHONPATH=lib .venv/bin/python benchmarks/bench_paper_flops.py --write    # + update README

No GPU is needed. Every stage's real step (the library's own training step functions, random
weights, random data) runs once on the CPU at the paper's crop sizes with a batch of 2 under
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, forward and
backward, the gradient penalty's double backward included); the count is scaled to the paper's
batch size and step count. Sampling, the embedding and the analysis are counted per image the
same way. The hours are this work divided by an *assumed* sustained rate: they are an order
of magnitude for planning, not a measurement. ``--write`` replaces the "## Paper profile:
floating-point work" section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))

from invariscope.config.params import load_params  # noqa: E402
from invariscope.models.denoisers import GaussRI, build_denoiser  # noqa: E402
from invariscope.names import TRAINED_METHODS  # noqa: E402
from invariscope.stages import denoiser_training as dt  # noqa: E402
from invariscope.stages import vae_training as vt  # noqa: E402
from invariscope.stages.cinn_training import build_cinn  # noqa: E402
from invariscope.stages.embedding import build_embedder  # noqa: E402

README = Path(__file__).resolve().parent / "README.md"
SECTION = "## Paper profile: floating-point work"
RATES = (10e12, 40e12)  # assumed sustained FLOP/s (see the section text)
NO_WEIGHTS = {"denoisers.vgg_weights": None, "vae.vgg16_weights": None,
              "vae.imagenet_weights": None, "embedding.imagenet_weights": None}


class _Counter(TorchDispatchMode):
    """torch.utils.flop_counter's per-operator formulas without its module hooks (which do not
    support the gradient penalties' ``autograd.grad``)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def flops(fn) -> float:
    """FLOPs of one call of ``fn`` (forward and backward work it triggers)."""
    with _Counter() as counter:
        fn()
    return float(counter.total)


def count(params) -> list[tuple[str, str, float]]:
    """Rows (stage, what was counted, total FLOPs) for the paper profile."""
    torch.manual_seed(0)
    fake = SimpleNamespace(normalization=(-542.55, 502.19))
    cpu = torch.device("cpu")
    rows = []
    den = params.denoisers
    slice_px = 512
    for name in TRAINED_METHODS:
        cfg = getattr(den, name)
        setup = dt._setup(name, params, fake, cpu)
        p = cfg.patch_size
        batch = (torch.randn(2, 1, p, p), torch.randn(2, 1, p, p))
        setup.step_fn(0, batch)  # first step outside the counter (lazy initialisations)
        per_step = flops(lambda: setup.step_fn(1, batch)) / 2 * cfg.batch_size
        model = setup.model.eval()
        with torch.no_grad():
            per_slice = flops(lambda: model(torch.randn(1, 1, slice_px, slice_px)))
        n_val = cfg.iterations // den.validate_every
        total = per_step * cfg.iterations + per_slice * den.val_slices * n_val
        rows.append((f"denoiser {name}", f"{cfg.iterations:,} steps × batch {cfg.batch_size} "
                     f"({p}²) + {n_val} validations × {den.val_slices} slices", total))
    v = params.vae
    c = v.crop_size
    methods = list(den.methods)
    fs = {m: (GaussRI() if m == "gaussri" else build_denoiser(m)).eval() for m in methods}
    for f in fs.values():
        for p in f.parameters():
            p.requires_grad_(False)
    each = f"{len(methods)} denoisers, each with its own ŷ = f(x)"
    for conditional in (False, True):
        total = 0.0
        for m in methods if conditional else [None]:
            vae = vt.build_vae(conditional, params)
            critic = vt._build_critic(conditional, params)
            perceptual = vt.build_perceptual_loss(None)
            step_fn, _ = vt._make_step(vae, critic, fs[m] if m else None, params, perceptual)
            x = (torch.randn(2, 1, c, c),)
            step_fn(0, x)
            total += flops(lambda: step_fn(0, x)) / 2 * v.batch_size * v.iterations  # with perceptual
        rows.append(("cVAEs" if conditional else "VAE, unconditional",
                     f"{v.iterations:,} steps × batch {v.batch_size} ({c}²)"
                     + (f"; {each}" if conditional else ""), total))
    ci = params.cinn
    cinn = build_cinn(params)
    vae = vt.build_vae(True, params).eval()
    z, y = torch.randn(2, v.latent_dim), torch.randn(2, 1, c, c)
    cinn.initialize(z, y)
    inv = params.invariances
    n_inv = inv.n_crops * inv.n_invariances
    total_cinn = total_inv = 0.0
    for m in methods:
        f = fs[m]

        def cinn_step() -> None:
            xb = torch.randn(2, 1, c, c)
            with torch.no_grad():
                yh = f(xb)
                vae.encode(xb, yh)
            cinn.nll_loss(z, yh).backward()

        total_cinn += flops(cinn_step) / 2 * ci.batch_size * ci.iterations
        with torch.no_grad():
            cond = cinn.embed(y)
            per_crop = flops(lambda: (f(y), cinn.embed(y))) / 2
            per_inv = flops(lambda: f(vae.decode(cinn.inverse_embedded(z, cond), y))) / 2
            per_prior = flops(lambda: f(vae.decode(z, y))) / 2
        total_inv += inv.n_crops * per_crop + n_inv * (per_inv + per_prior)
    rows.append(("cINNs", f"{ci.iterations:,} steps × batch {ci.batch_size} (ŷ and the encoder "
                 f"every step); {each}", total_cinn))
    rows.append(("invariances", f"{inv.n_crops} crops × {inv.n_invariances} invariances + the "
                 f"prior ablation, with f(x̃); {len(methods)} denoisers", total_inv))
    e = params.embedding
    phi = build_embedder(params, load_pretrained=False)
    imgs = torch.randn(2, 1, c, c)
    per_img_train = flops(lambda: phi(imgs).sum().backward()) / 2
    with torch.no_grad():
        per_img = flops(lambda: phi(imgs)) / 2
        per_dec = flops(lambda: vae.decode(cinn.inverse_embedded(z, cond), y)) / 2
        uvae = vt.build_vae(False, params).eval()
        per_enc = flops(lambda: uvae.encode(imgs)) / 2
    n_sets = (e.n_train_crops + e.n_val_crops) * e.n_invariances * 5
    per_batch = e.crops_per_batch * (1 + e.invariances_per_crop)
    rows.append(("embedding", f"{n_sets:,} invariances sampled + {e.iterations:,} steps × "
                 f"{per_batch} images", n_sets * per_dec + e.iterations * per_batch * per_img_train))
    n_an = inv.n_crops * (inv.n_invariances + 1) * 5
    rows.append(("analysis", f"{n_an:,} images through the VAE encoder and φ",
                 n_an * (per_img + per_enc)))
    return rows


def table(rows: list[tuple[str, str, float]]) -> str:
    total = sum(r[2] for r in rows)
    head = ("| stage | counted | PFLOP | hours at 10 TFLOP/s | hours at 40 TFLOP/s |\n"
            "|---|---|---:|---:|---:|\n")
    body = "".join(f"| {s} | {what} | {f / 1e15:,.0f} | {f / RATES[0] / 3600:,.1f} | "
                   f"{f / RATES[1] / 3600:,.1f} |\n" for s, what, f in rows)
    return head + body + (f"| **total** | | **{total / 1e15:,.0f}** | **{total / RATES[0] / 3600:,.0f}** | "
                          f"**{total / RATES[1] / 3600:,.0f}** |\n")


def write_section(text: str) -> None:
    """Replace (or append) this benchmark's section of ``benchmarks/README.md``."""
    section = (
        f"{SECTION}\n\n"
        "No GPU was lent while this companion was written, so the paper profile's runtime on "
        "one is not measured. This table counts its work instead: every stage's own training "
        "step (random weights and data, the paper's crop sizes, a batch of 2, scaled to the "
        "paper's batch and step counts) under the per-operator formulas of "
        "`torch.utils.flop_counter` (convolutions and matrix products, forward and backward, the "
        "gradient penalties' double backward included; element-wise work and data loading are "
        "not counted). The hours divide that work by an assumed sustained rate: 10 TFLOP/s is "
        "a modern data-centre GPU in FP32 with the small-channel convolutions of these networks; "
        "40 TFLOP/s needs TF32 tensor cores (PyTorch enables them for convolutions by default) "
        "and good utilisation. They are planning numbers, not measurements. The cVAEs dominate "
        "(the perceptual VGG16 and ŷ = f(x) every step); stages of different denoisers are "
        "independent, so several GPUs can share them with `--denoisers`.\n\n"
        f"{text}\n"
        "Rerun: `PYTHONPATH=lib .venv/bin/python benchmarks/bench_paper_flops.py --write` "
        "(about 10 CPU-minutes).\n")
    old = README.read_text()
    pattern = re.compile(rf"{re.escape(SECTION)}\n.*?(?=\n## |\Z)", re.S)
    new = pattern.sub(lambda _: section, old) if pattern.search(old) else old.rstrip() + "\n\n" + section
    README.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="update benchmarks/README.md")
    args = ap.parse_args()
    params = load_params("paper", NO_WEIGHTS)
    text = table(count(params))
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote {README}")


if __name__ == "__main__":
    main()
