"""The shared training loop: exact resume, NaN guard, configuration check, best checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from invariscope.atomic import file_sha
from invariscope.provenance import checkpoint_sha, existing_checkpoint
from invariscope.stages.training import BatchStream, CheckpointMismatchError, NonFiniteLossError, load_best, train


def _setup(small_dataset, lr=1e-2):
    torch.manual_seed(0)
    model = nn.Conv2d(1, 1, 3, padding=1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    stream = BatchStream(small_dataset, 16, batch_size=2, seed=7, steps_per_epoch=4)

    def step_fn(step, batch):
        x, y = batch
        noise = 0.01 * torch.randn_like(x)  # uses the per-step seed
        loss = nn.functional.mse_loss(model(x + noise), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    return model, opt, stream, step_fn


def test_interrupted_run_resumes_exactly(small_dataset, tmp_path):
    model, opt, stream, step_fn = _setup(small_dataset)
    train(step_fn, stream.iterate_from, 10, tmp_path / "a", {"m": model}, {"o": opt}, "fp", seed=1,
          checkpoint_every=5, progress=False)
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, stream, step_fn = _setup(small_dataset)
    train(step_fn, stream.iterate_from, 5, tmp_path / "b", {"m": model}, {"o": opt}, "fp", seed=1,
          checkpoint_every=5, progress=False)
    model, opt, stream, step_fn = _setup(small_dataset)  # a fresh process
    res = train(step_fn, stream.iterate_from, 10, tmp_path / "b", {"m": model}, {"o": opt}, "fp",
                seed=1, checkpoint_every=5, progress=False)
    assert res.resumed_from == 5
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b)


def test_finished_run_is_not_recomputed(small_dataset, tmp_path):
    model, opt, stream, step_fn = _setup(small_dataset)
    train(step_fn, stream.iterate_from, 4, tmp_path, {"m": model}, {"o": opt}, "fp", seed=1,
          checkpoint_every=2, progress=False)

    def fail(step, batch):
        raise AssertionError("must not train again")

    res = train(fail, stream.iterate_from, 4, tmp_path, {"m": model}, {"o": opt}, "fp", seed=1,
                progress=False)
    assert res.steps == 4 and res.resumed_from == 4


def test_nan_loss_stops_and_keeps_last_good_checkpoint(small_dataset, tmp_path):
    model, opt, stream, step_fn = _setup(small_dataset)

    def exploding(step, batch):
        out = step_fn(step, batch)
        return {"loss": float("nan")} if step == 6 else out

    with pytest.raises(NonFiniteLossError, match=r"loss loss became nan at step 6.*last.pt \(step 5\)"):
        train(exploding, stream.iterate_from, 10, tmp_path, {"m": model}, {"o": opt}, "fp", seed=1,
              checkpoint_every=5, progress=False)
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 5


def test_checkpoint_from_other_configuration_is_refused(small_dataset, tmp_path):
    model, opt, stream, step_fn = _setup(small_dataset)
    train(step_fn, stream.iterate_from, 2, tmp_path, {"m": model}, {"o": opt}, "config-A", seed=1,
          checkpoint_every=2, progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"last.pt was written by another configuration"):
        train(step_fn, stream.iterate_from, 4, tmp_path, {"m": model}, {"o": opt}, "config-B",
              seed=1, progress=False)


def test_best_checkpoint_follows_validation(small_dataset, tmp_path):
    model, opt, stream, step_fn = _setup(small_dataset)
    scores = iter([0.1, 0.9, 0.3, 0.2])
    res = train(step_fn, stream.iterate_from, 8, tmp_path, {"m": model}, {"o": opt}, "fp", seed=1,
                checkpoint_every=2, validate_fn=lambda: next(scores), progress=False)
    assert res.best_step == 4 and res.best_metric == 0.9
    assert load_best(tmp_path, {"m": model}, "fp") == 4
    assert existing_checkpoint(tmp_path, "m", "run it") == tmp_path / "best.pt"
    (tmp_path / "best.pt").unlink()
    assert existing_checkpoint(tmp_path, "m", "run it") == tmp_path / "last.pt"
    (tmp_path / "last.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of m in .*: train it first \(run it\)"):
        existing_checkpoint(tmp_path, "m", "run it")


def test_deleted_best_checkpoint_is_restored_from_last(small_dataset, tmp_path):
    """The workflow deletes a job's outputs (best.pt) before it reruns an interrupted job: the
    resumed run restores the best weights it had, not the last ones."""
    model, opt, stream, step_fn = _setup(small_dataset)
    scores = iter([0.1, 0.9, 0.3, 0.2])
    train(step_fn, stream.iterate_from, 6, tmp_path, {"m": model}, {"o": opt}, "fp", seed=1,
          checkpoint_every=2, validate_fn=lambda: next(scores), progress=False)
    best_weights = torch.load(tmp_path / "best.pt", weights_only=False)["modules"]["m"]
    identity, file_hash = checkpoint_sha(tmp_path / "best.pt"), file_sha(tmp_path / "best.pt")
    (tmp_path / "best.pt").unlink()
    model, opt, stream, step_fn = _setup(small_dataset)  # a fresh process resumes at step 6
    res = train(step_fn, stream.iterate_from, 8, tmp_path, {"m": model}, {"o": opt}, "fp", seed=1,
                checkpoint_every=2, validate_fn=lambda: next(scores), progress=False)
    assert res.resumed_from == 6 and res.best_step == 4
    # other bytes, the same weights: what reads this checkpoint stays valid
    assert file_sha(tmp_path / "best.pt") != file_hash and checkpoint_sha(tmp_path / "best.pt") == identity
    assert checkpoint_sha(tmp_path / "last.pt") != identity  # other weights (and step)
    assert load_best(tmp_path, {"m": model}, "fp") == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, best_weights[k])


def test_batch_stream_is_addressable_by_step(small_dataset):
    stream = BatchStream(small_dataset, 16, batch_size=2, seed=3, steps_per_epoch=3)
    full = [x for (x, _), _ in zip(stream.iterate_from(0), range(7))]
    tail = [x for (x, _), _ in zip(stream.iterate_from(4), range(3))]
    assert all(torch.equal(a, b) for a, b in zip(full[4:], tail))
