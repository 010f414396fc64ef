"""Conditional INN: invertibility, exact log-determinant, likelihood training, init/state handling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from invariscope.models.cinn import (PAPER_CINN_CONFIG, ConditionalINN, ConditionEmbedder,
                                     InvertibleLeakyReLU, NotInitializedError, count_parameters,
                                     expected_parameter_count)

SMALL = dict(latent_dim=8, cond_size=32, cond_dim=6, base_channels=4, n_blocks=3, hidden=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(seed: int = 0, **kw) -> ConditionalINN:
    torch.manual_seed(seed)
    return ConditionalINN(**{**SMALL, **kw})


def batch(n: int, cfg: dict = SMALL, seed: int = 0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, cfg["latent_dim"], generator=g) + 0.3
    y = torch.randn(n, 1, cfg["cond_size"], cfg["cond_size"], generator=g)
    return z.to(dtype), y.to(dtype)


# ----------------------------------------------------------------------------- LeakyReLU
def test_leaky_relu_logdet_counts_negatives():
    alpha = 0.9
    m = InvertibleLeakyReLU([(7,)], alpha=alpha)
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    (y,), ld = m([x], jac=True)
    n_neg = (x < 0).sum(1).to(x.dtype)
    assert n_neg.min() < 7 and n_neg.max() > 0
    assert torch.allclose(ld, n_neg * math.log(alpha))
    assert torch.equal(y, torch.where(x < 0, alpha * x, x))
    (xr,), ld_rev = m([y], rev=True, jac=True)
    assert torch.allclose(xr, x, atol=1e-7)
    assert torch.allclose(ld_rev, -ld)
    with pytest.raises(ValueError):
        InvertibleLeakyReLU([(3,)], alpha=0.0)


# ----------------------------------------------------------------------------- embedder / counts
@pytest.mark.parametrize("size", [32, 48, 64, 128])
def test_embedder_sizes(size):
    e = ConditionEmbedder(size, cond_dim=5, base_channels=4)
    assert e.dense.kernel_size == (size // 16, size // 16)
    assert e(torch.randn(2, 1, size, size)).shape == (2, 5)


def test_embedder_rejects_bad_size():
    with pytest.raises(ValueError):
        ConditionEmbedder(40)
    with pytest.raises(ValueError):
        ConditionEmbedder(32)(torch.randn(2, 1, 64, 64))


@pytest.mark.parametrize("coupling", ["rnvp", "glow"])
def test_parameter_count_matches_formula(coupling):
    m = small_model(coupling=coupling)
    exp = expected_parameter_count(**m.config)
    assert count_parameters(m.flow) == exp["flow"]
    assert count_parameters(m.embedder) == exp["embedder"]
    assert count_parameters(m) == exp["total"]
    # fixed permutations are stored as non-trainable parameters
    assert count_parameters(m, trainable_only=False) == exp["total"] + 2 * SMALL["latent_dim"] * SMALL["n_blocks"]


def test_paper_size_parameter_count():
    exp = expected_parameter_count(**PAPER_CINN_CONFIG)
    assert exp == {"flow": 125_988_864, "embedder": 11_144_320, "total": 137_133_184}
    with torch.device("meta"):  # builds the real module structure without allocating 0.5 GB
        m = ConditionalINN(**PAPER_CINN_CONFIG)
    assert count_parameters(m.flow) == 125_988_864
    assert count_parameters(m.embedder) == 11_144_320


# ----------------------------------------------------------------------------- invertibility
def test_invertibility_fresh_and_trained():
    m = small_model()
    z, y = batch(32)
    m.initialize(z, y)
    with torch.no_grad():
        v, _ = m(z, y)
        assert (m.inverse(v, y) - z).norm(dim=1).max() < 1e-4
        c = m.embed(y)
        v2, _ = m.forward_embedded(z, c)
        assert torch.equal(v, v2)
        assert torch.equal(m.inverse_embedded(v, c), m.inverse(v, y))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for i in range(15):
        zb, yb = batch(32, seed=100 + i)
        loss = m.nll_loss(zb, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z, y = batch(32, seed=7)
        v, ld = m(z, y)
        assert (m.inverse(v, y) - z).norm(dim=1).max() < 1e-4
        _, ld_rev = m.flow(v, c=[m.embed(y)], rev=True)
        assert torch.allclose(ld_rev, -ld, atol=1e-4)


# ----------------------------------------------------------------------------- log-determinant
def test_logdet_matches_autograd_jacobian():
    cfg = dict(SMALL, latent_dim=6)
    m = small_model(**cfg).double()
    z0, y0 = batch(16, cfg, dtype=torch.float64)
    m.initialize(z0, y0)
    # perturb ActNorm away from its data init so the check is not at a special point
    for p in m.flow.parameters():
        if p.requires_grad:
            p.data += 0.05 * torch.randn_like(p)
    z, y = batch(3, cfg, seed=1, dtype=torch.float64)
    z[:, :3] = -z[:, :3].abs() - 0.1  # negative inputs: the LeakyReLU term matters

    lrelu_terms = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: lrelu_terms.append(out[1]))
             for mod in m.flow.modules() if isinstance(mod, InvertibleLeakyReLU)]
    with torch.no_grad():
        c = m.embed(y)
        _, ld = m.forward_embedded(z, c)
    for h in hooks:
        h.remove()
    assert torch.stack(lrelu_terms).sum(0).abs().min() > 0.05

    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda zi: m.forward_embedded(zi[None], c[i:i + 1])[0][0], z[i])
        assert jac.shape == (6, 6)
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        assert abs(logabs.item() - ld[i].item()) < 1e-6, abs(logabs.item() - ld[i].item())


# ----------------------------------------------------------------------------- likelihood
def test_nll_reaches_analytic_optimum_on_linear_gaussian():
    """z | ŷ ~ N(A c, L Lᵀ), with ŷ = c1·(x ramp) + c2·(y ramp): optimum loss = ½ log det Σ + D/2."""
    d, s = 4, 8
    g = torch.Generator().manual_seed(1)
    a = torch.randn(d, 2, generator=g)
    l_mat = torch.tril(0.5 * torch.randn(d, d, generator=g), -1) + torch.diag(torch.tensor([1.0, 0.5, 0.8, 0.3]))
    sigma = l_mat @ l_mat.T
    ramp = torch.linspace(-1, 1, s)
    p1, p2 = ramp[None, :].expand(s, s), ramp[:, None].expand(s, s)

    def image(c: torch.Tensor) -> torch.Tensor:
        return (c[:, 0, None, None] * p1 + c[:, 1, None, None] * p2)[:, None]

    def data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.randn(n, 2, generator=gen)
        return c @ a.T + torch.randn(n, d, generator=gen) @ l_mat.T, image(c)

    optimum = 0.5 * torch.logdet(sigma).item() + d / 2
    marginal = 0.5 * torch.logdet(sigma + a @ a.T).item() + d / 2  # what ignoring ŷ would give
    torch.manual_seed(0)
    m = ConditionalINN(latent_dim=d, cond_size=s, cond_dim=8, base_channels=8, n_down=1, n_blocks=3, hidden=32)
    gen = torch.Generator().manual_seed(2)
    m.initialize(*data(512, gen))
    z_eval, y_eval = data(4096, torch.Generator().manual_seed(3))
    with torch.no_grad():
        start = m.nll_loss(z_eval, y_eval).item()
    steps, lr = 400, 5e-3
    opt = torch.optim.Adam(m.parameters(), lr=lr, foreach=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    for _ in range(steps):
        loss = m.nll_loss(*data(128, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        end = m.nll_loss(z_eval, y_eval).item()
        assert start > marginal > optimum + 2
        assert optimum - 0.1 < end < optimum + 0.15, (start, end, optimum)
        # exact log-likelihood = −(paper loss) − ½ D log 2π
        lp = m.log_prob(z_eval, y_eval).mean().item()
        assert lp == pytest.approx(-end - 0.5 * d * math.log(2 * math.pi), abs=1e-4)

        c = torch.tensor([[0.7, -1.2]])
        samples = m.sample(image(c)[0], 4000, generator=torch.Generator().manual_seed(5))
        assert samples.shape == (4000, d)
        assert (samples.mean(0) - (c @ a.T)[0]).abs().max() < 0.15
        assert (torch.cov(samples.T) - sigma).abs().max() < 0.15


# ----------------------------------------------------------------------------- init / state
def test_uninitialized_model_refuses_inverse_and_sample():
    m = small_model()
    z, y = batch(4)
    assert not m.is_initialized
    with pytest.raises(NotInitializedError, match="initialize"):
        m.sample(y[0], 3)
    with pytest.raises(NotInitializedError):
        m.inverse(z, y)
    with pytest.raises(NotInitializedError):
        m.sample_embedded(torch.zeros(1, SMALL["cond_dim"]), 3)
    assert not m.is_initialized  # nothing was fitted to latent-side data
    with pytest.raises(ValueError):
        m(z[:1], y[:1])  # a batch of 1 cannot data-initialize ActNorm
    with pytest.raises(ValueError):
        m.initialize(z[:1], y[:1])
    m(z, y)  # a first training forward pass initializes too
    assert m.is_initialized
    assert m.sample(y[:2], 3).shape == (2, 3, SMALL["latent_dim"])


def test_state_dict_round_trip():
    m = small_model(seed=0)
    z, y = batch(16)
    m.initialize(z, y)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p += 0.01 * torch.randn_like(p)
    m2 = small_model(seed=1)
    perm = m2.flow[3].perm
    perm.data = perm.data.flip(0)  # the loaded permutation must override this
    m2.load_state_dict(m.state_dict())
    assert m2.is_initialized  # loading counts as initialized, no initialize() call needed
    for a, b in zip(m.flow.modules(), m2.flow.modules()):
        if hasattr(a, "perm"):
            assert torch.equal(a.perm, b.perm) and torch.equal(a.perm_inv, b.perm_inv)
    with torch.no_grad():
        v, ld = m(z, y)
        v2, ld2 = m2(z, y)
        assert torch.equal(v, v2) and torch.equal(ld, ld2)
        s1 = m.sample(y[:2], 5, generator=torch.Generator().manual_seed(9))
        s2 = m2.sample(y[:2], 5, generator=torch.Generator().manual_seed(9))
        assert torch.equal(s1, s2)


def test_building_keeps_numpy_global_rng():
    np.random.seed(1234)
    expected = np.random.random(3)
    np.random.seed(1234)
    small_model()
    assert np.array_equal(np.random.random(3), expected)
