"""ELBO, importance-sampled log-likelihood and the Trainer (warm-up, early stopping, resume)."""

from __future__ import annotations

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from pyroflows.infer import Trainer, elbo, evaluate, log_likelihood, log_weights
from pyroflows.vae import VAE


class LinearGaussian:
    """z ~ N(0, I_2), x | z ~ N(W z + b, σ² I_3): p(x) = N(b, W Wᵀ + σ² I) exactly."""

    def __init__(self, shift: float = 0.0, stretch: float = 1.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(3, 2, generator=g, dtype=torch.float64)
        self.b = torch.randn(3, generator=g, dtype=torch.float64)
        self.sigma = 0.7
        prec = torch.eye(2, dtype=torch.float64) + self.W.T @ self.W / self.sigma**2
        self.post_cov = torch.linalg.inv(prec)
        self.shift, self.stretch = shift, stretch  # guide = exact posterior, perturbed

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def guide(self, x):
        scale_tril = torch.linalg.cholesky(self.post_cov)
        mean = (x - self.b) @ self.W @ self.post_cov.T / self.sigma**2
        mean = mean + self.shift * scale_tril.diagonal()  # shift in posterior std units
        scale_tril = scale_tril * self.stretch
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=scale_tril))

    def exact(self, x):
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(3, dtype=torch.float64)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)


def test_is_log_likelihood_exact_with_the_true_posterior():
    m = LinearGaussian()
    x = torch.randn(4, 3, dtype=torch.float64) * 2
    ll = log_likelihood(m.model, m.guide, x, num_samples=7, batch_samples=3)
    torch.testing.assert_close(ll, m.exact(x), atol=1e-10, rtol=0)


def test_is_log_likelihood_matches_exact_marginal_with_an_imperfect_guide():
    m = LinearGaussian(shift=0.5, stretch=1.3)
    x = torch.randn(4, 3, dtype=torch.float64) * 2
    ll = log_likelihood(m.model, m.guide, x, num_samples=20000, batch_samples=5000)
    # delta-method standard error of log p̂: sd(w) / (mean(w) √S), from a fresh batch of weights
    w = log_weights(m.model, m.guide, x, num_samples=20000).exp()
    se = w.std(0) / w.mean(0) / math.sqrt(20000)
    assert (se < 0.01).all()
    assert ((ll - m.exact(x)).abs() < 5 * se).all()
    # the ELBO of the imperfect guide is strictly below; IS with S=1 is an ELBO sample
    pyro.set_rng_seed(0)
    elbos = torch.stack([elbo(m.model, m.guide, x) for _ in range(200)])
    assert elbos.mean() < m.exact(x).sum() - 0.1


def test_elbo_matches_trace_elbo_loss():
    vae = VAE((2, 3), latent_dim=3, flow="planar", num_flows=2, hidden_dim=4).double()
    x = torch.bernoulli(torch.full((5, 6), 0.3, dtype=torch.float64))
    pyro.set_rng_seed(4)
    ours = elbo(vae.model, vae.guide, x, 0.5)
    pyro.set_rng_seed(4)
    theirs = pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, x, 0.5)
    assert ours.item() == pytest.approx(-theirs, rel=1e-12)
    assert ours.requires_grad


def test_elbo_rejects_non_reparameterized_guides():
    def model():
        pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="not reparameterizable"):
        elbo(model, model)


def make_trainer(seed_model: int, path=None, **kwargs):
    torch.manual_seed(seed_model)
    vae = VAE((4, 5), latent_dim=3, flow="planar", num_flows=2, hidden_dim=8)
    g = torch.Generator().manual_seed(123)
    data = torch.bernoulli(torch.full((60, 20), 0.3), generator=g)
    opts = {"batch_size": 16, "warmup_epochs": 2, "progress": False, "checkpoint_path": path}
    return Trainer(vae, data[:50], data[50:], **(opts | kwargs))


@pytest.mark.parametrize("optimizer", ["adamax", "adam"])
def test_checkpoint_resume_is_bit_identical(tmp_path, optimizer):
    pyro.set_rng_seed(0)
    straight = make_trainer(0, tmp_path / "a.pt", optimizer=optimizer)
    straight.fit(3)

    pyro.set_rng_seed(0)
    first = make_trainer(0, tmp_path / "b.pt", optimizer=optimizer)
    first.fit(1)
    torch.rand(100)  # disturb the global RNG: resuming must restore it
    pyro.set_rng_seed(99)
    resumed = make_trainer(7, tmp_path / "b.pt", optimizer=optimizer).load(tmp_path / "b.pt")
    assert resumed.epoch == 1
    resumed.fit(3)

    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["module"].items():
        assert torch.equal(value, b["module"][key]), key
    for key, value in straight.module.state_dict().items():  # best-restored modules agree
        assert torch.equal(value, resumed.module.state_dict()[key]), key
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert [h["valid_elbo"] for h in straight.history] == [
        h["valid_elbo"] for h in resumed.history
    ]


def test_adam_takes_the_same_steps_as_torch_adam():
    """The fused update (where supported) is Adam: same parameters as the plain one."""
    fast = make_trainer(0, optimizer="adam")
    plain = make_trainer(0, optimizer="adam")
    plain.optimizer = torch.optim.Adam(plain.module.parameters(), lr=5e-4, eps=1e-7)
    try:
        torch.optim.Adam([nn.Parameter(torch.zeros(1))], fused=True)
        supported = True
    except (RuntimeError, TypeError, ValueError):
        supported = False
    assert bool(fast.optimizer.defaults.get("fused")) == supported
    x = fast.train_data[:16]
    for _ in range(3):
        pyro.set_rng_seed(1)
        fast.step(x, 1.0)
        pyro.set_rng_seed(1)
        plain.step(x, 1.0)
    for (name, a), b in zip(
        fast.module.named_parameters(), plain.module.parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_trainer_uses_the_traced_elbo_when_a_subclass_overrides_model_only():
    """VAE.elbo is the shortcut for VAE's own model and guide; a subclass with another model
    (here a likelihood scaled by 2) must be trained on that model's ELBO."""
    from pyroflows.infer import module_elbo

    class Scaled(VAE):
        def model(self, x, beta=1.0):
            with poutine.scale(scale=2.0):
                super().model(x, beta)

    torch.manual_seed(0)
    vae = Scaled((4, 5), latent_dim=3, flow="planar", num_flows=2, hidden_dim=8).double()
    x = torch.bernoulli(torch.full((6, 20), 0.3, dtype=torch.float64))
    pyro.set_rng_seed(2)
    got = module_elbo(vae, x, 1.0)
    pyro.set_rng_seed(2)
    torch.testing.assert_close(got, elbo(vae.model, vae.guide, x, 1.0))
    pyro.set_rng_seed(2)
    assert not torch.allclose(got, VAE.elbo(vae, x, 1.0))
    plain = VAE((4, 5), latent_dim=3, flow="planar", num_flows=2, hidden_dim=8).double()
    pyro.set_rng_seed(2)
    direct = module_elbo(plain, x, 1.0)
    pyro.set_rng_seed(2)
    torch.testing.assert_close(direct, plain.elbo(x, 1.0))


class Shift(nn.Module):
    """A deterministic 'model' x ~ N(μ, 1): training pulls μ to the train mean (0) and away
    from the validation mean (5), so the validation ELBO falls every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.full((2,), 5.0))

    def model(self, x, beta=1.0):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.mu, 1.0).to_event(1), obs=x)

    def guide(self, x, beta=1.0):
        pass


def test_early_stopping_restores_the_best_parameters():
    train = torch.zeros(10, 2)
    valid = torch.full((10, 2), 5.0)
    trainer = Trainer(
        Shift(), train, valid, lr=0.1, batch_size=5, warmup_epochs=0, early_stopping_epochs=2,
        progress=False,
    )  # fmt: skip
    history = trainer.fit(50)
    assert len(history) == 3 and trainer.stopped
    valid_elbos = [h["valid_elbo"] for h in history]
    assert valid_elbos == sorted(valid_elbos, reverse=True)
    assert trainer.best_elbo == valid_elbos[0]
    assert evaluate(trainer.module, valid)["elbo"] == pytest.approx(valid_elbos[0])


def test_warmup_schedule_and_no_patience_during_warmup():
    trainer = make_trainer(0, warmup_epochs=4)
    assert [trainer.beta(e) for e in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert make_trainer(0, warmup_epochs=0).beta(1) == 1.0
    shift = Trainer(
        Shift(), torch.zeros(10, 2), torch.full((10, 2), 5.0), lr=0.1, batch_size=5,
        warmup_epochs=5, early_stopping_epochs=1, progress=False,
    )  # fmt: skip
    assert len(shift.fit(50)) == 5  # epochs 2-4 are worse but not counted: still warming up


def test_evaluate_reports_elbo_below_log_likelihood():
    pyro.set_rng_seed(0)
    vae = VAE((4, 5), latent_dim=3, flow="planar", num_flows=2, hidden_dim=8)
    x = torch.bernoulli(torch.full((8, 20), 0.3))
    out = evaluate(vae, x, num_samples=200, batch_samples=64)
    assert math.isfinite(out["elbo"]) and out["elbo"] < out["log_likelihood"] < 0


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"lr": 0.0}, ValueError, "lr must be a positive, finite float"),
        ({"lr": math.inf}, ValueError, "lr must be a positive, finite float; got inf"),
        ({"lr": math.nan}, ValueError, "lr must be a positive, finite float; got nan"),
        ({"early_stopping_epochs": -1}, ValueError, "early_stopping_epochs must be a non-neg"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
        ({"warmup_epochs": -1}, ValueError, "warmup_epochs must be a non-negative int"),
        ({"optimizer": "sgd"}, ValueError, "optimizer must be 'adamax' or 'adam'"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every must be a positive int"),
    ],
)
def test_trainer_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        make_trainer(0, **kwargs)
    with pytest.raises(TypeError, match="model"):
        Trainer(nn.Linear(2, 2), torch.zeros(3, 2))


ROWS = torch.bernoulli(torch.full((8, 20), 0.3), generator=torch.Generator().manual_seed(5))


def _with(row: int, col: int, value: float) -> torch.Tensor:
    x = ROWS.clone()
    x[row, col] = value
    return x


def _tiny_vae():
    return VAE((4, 5), latent_dim=3, flow="planar", num_flows=2, hidden_dim=8)


BAD_DATA = [
    ({"train_data": ROWS.numpy()}, TypeError, "train_data must be a torch.Tensor; got ndarray"),
    ({"train_data": ROWS.long()}, TypeError, "train_data must be a floating-point tensor"),
    ({"train_data": ROWS[:0]}, ValueError, r"train_data must be a non-empty \(N, D\) tensor"),
    ({"train_data": ROWS[0]}, ValueError, "train_data must be a non-empty"),
    (
        {"train_data": _with(3, 2, math.nan)},
        ValueError,
        "train_data contains 1 non-finite .*row 3",
    ),
    ({"train_data": _with(1, 0, math.inf)}, ValueError, "train_data contains 1 non-finite"),
    ({"train_data": ROWS * 255}, ValueError, r"train_data must lie in \[0, 1\] for the Bern"),
    ({"train_data": ROWS - 0.5}, ValueError, r"train_data must lie in \[0, 1\]"),
    ({"valid_data": _with(0, 0, -math.inf)}, ValueError, "valid_data contains 1 non-finite"),
    ({"valid_data": ROWS.numpy()}, TypeError, "valid_data must be a torch.Tensor"),
    ({"valid_data": ROWS[:0]}, ValueError, "valid_data must be a non-empty"),
    ({"valid_data": ROWS[:, :10]}, ValueError, "valid_data rows must have the shape"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_DATA)
def test_trainer_rejects_bad_data_before_training(kwargs, exc, match):
    args = {"train_data": ROWS, "valid_data": ROWS[:4]} | kwargs
    with pytest.raises(exc, match=match):
        Trainer(_tiny_vae(), args.pop("train_data"), args.pop("valid_data"), progress=False)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_samples": -1}, ValueError, "num_samples must be a non-negative int"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive int"),
        ({"data": ROWS.numpy()}, TypeError, "data must be a torch.Tensor"),
        ({"data": _with(2, 2, math.nan)}, ValueError, "data contains 1 non-finite"),
        ({"data": ROWS[:0]}, ValueError, "data must be a non-empty"),
    ],
)
def test_evaluate_argument_errors(kwargs, exc, match):
    args = {"data": ROWS} | kwargs
    with pytest.raises(exc, match=match):
        evaluate(_tiny_vae(), args.pop("data"), **args)


def test_grey_levels_in_the_unit_interval_are_accepted():
    Trainer(_tiny_vae(), ROWS * 0.5, progress=False)  # e.g. Frey faces scaled to [0, 1]


def test_non_finite_validation_elbo_is_reported_not_counted_as_no_improvement():
    def poison(record):
        if record["epoch"] == 1:
            with torch.no_grad():
                trainer.module.mu.fill_(math.nan)

    train, valid = torch.zeros(10, 2), torch.full((10, 2), 5.0)
    trainer = Trainer(
        Shift(), train, valid, lr=0.1, batch_size=5, warmup_epochs=0, early_stopping_epochs=3,
        progress=False,
    )  # fmt: skip
    with (
        pyro.validation_enabled(False),  # let the NaN parameter reach the ELBO
        pytest.warns(RuntimeWarning, match="train_elbo is nan at epoch 2: training diverged"),
    ):
        history = trainer.fit(10, on_epoch=poison)
    assert len(history) == 2 and math.isnan(history[1]["valid_elbo"])
    assert trainer.diverged and trainer.stopped and trainer.bad_epochs == 0
    assert trainer.best_elbo == history[0]["valid_elbo"]
    assert torch.isfinite(trainer.module.mu).all()  # the best (epoch 1) parameters


def shift_trainer(**kwargs):
    opts = {"lr": 0.1, "batch_size": 5, "warmup_epochs": 0, "early_stopping_epochs": 0}
    torch.manual_seed(0)
    train, valid = torch.randn(10, 2), torch.full((10, 2), 5.0)
    return Trainer(Shift(), train, valid, progress=False, **(opts | kwargs))


@pytest.mark.parametrize("first", [1, 2, 4])
def test_fit_in_pieces_continues_exactly_as_one_fit(first, tmp_path):
    """The validation ELBO of Shift falls every epoch, so the best state (epoch 1) differs
    from the last: a continued fit must start from the last epoch, not the restored best."""
    pyro.set_rng_seed(0)
    whole = shift_trainer()
    whole.fit(5)
    pyro.set_rng_seed(0)
    pieces = shift_trainer(checkpoint_path=tmp_path / "ck.pt")
    pieces.fit(first)
    assert torch.equal(pieces.module.mu, pieces.best_state["mu"])  # best restored meanwhile
    pieces.fit(5)
    assert [h["valid_elbo"] for h in pieces.history] == [h["valid_elbo"] for h in whole.history]
    assert torch.equal(pieces.module.mu, whole.module.mu)  # both hold the best (epoch 1)
    assert torch.equal(pieces.state_dict()["module"]["mu"], whole.state_dict()["module"]["mu"])
    assert not torch.equal(whole.state_dict()["module"]["mu"], whole.best_state["mu"])
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)  # the last state, to resume
    assert torch.equal(saved["module"]["mu"], whole.state_dict()["module"]["mu"])


def _largest_tensor_middle(path) -> int:
    """Byte offset of the middle of the largest tensor stored in the checkpoint zip."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len + info.compress_size // 2


def test_corrupt_or_truncated_checkpoints_are_detected_on_load(tmp_path):
    path = tmp_path / "ck.pt"
    make_trainer(0, path).fit(1)
    raw = bytearray(path.read_bytes())
    flipped, truncated = tmp_path / "flipped.pt", tmp_path / "truncated.pt"
    raw_flip = raw.copy()
    raw_flip[_largest_tensor_middle(path)] ^= 0xFF  # torch.load alone reads it silently
    flipped.write_bytes(bytes(raw_flip))
    truncated.write_bytes(bytes(raw[: len(raw) // 2]))
    for bad in (flipped, truncated):
        fresh = make_trainer(0)
        before = {k: v.clone() for k, v in fresh.module.state_dict().items()}
        with pytest.raises(ValueError, match=rf"checkpoint '.*{bad.name}' is corrupt"):
            fresh.load(bad)
        assert fresh.epoch == 0
        assert all(torch.equal(v, fresh.module.state_dict()[k]) for k, v in before.items())
    assert make_trainer(0).load(path).epoch == 1


@pytest.mark.parametrize("broken", ["optimizer", "generator", "rng", "missing"])
def test_load_state_dict_is_atomic(tmp_path, broken):
    source = make_trainer(1)
    source.fit(1)
    state = source.state_dict()
    if broken == "optimizer":
        state["optimizer"] = {"state": {}, "param_groups": []}
    elif broken == "generator":
        state["generator"] = torch.zeros(3, dtype=torch.uint8)
    elif broken == "rng":
        state["rng"] = {"torch": torch.get_rng_state()}
    else:
        del state["history"]
    target = make_trainer(0)
    target.fit(1)
    module = copy.deepcopy(target.module.state_dict())
    optim = copy.deepcopy(target.optimizer.state_dict())
    generator, rng = target.generator.get_state(), torch.get_rng_state()
    history = list(target.history)
    with pytest.raises((ValueError, RuntimeError, KeyError, TypeError)):
        target.load_state_dict(state)
    assert all(torch.equal(v, target.module.state_dict()[k]) for k, v in module.items())
    new_optim = target.optimizer.state_dict()["state"]
    assert all(
        torch.equal(optim["state"][i]["exp_avg"], new_optim[i]["exp_avg"]) for i in new_optim
    )
    assert torch.equal(generator, target.generator.get_state())
    assert torch.equal(rng, torch.get_rng_state())
    assert target.history == history and target.epoch == 1


def test_unwritable_checkpoint_path_fails_before_the_first_epoch(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    trainer = make_trainer(0, blocker / "ck.pt")
    with pytest.raises(ValueError, match="checkpoint_path '.*a_file/ck.pt' is not writable"):
        trainer.fit(2)
    assert trainer.epoch == 0 and trainer.history == []
    directory = make_trainer(0, tmp_path)  # a directory is not a checkpoint file
    with pytest.raises(ValueError, match="is not writable"):
        directory.fit(1)
    assert directory.epoch == 0


def test_failed_save_leaves_no_tmp_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    trainer = make_trainer(0, path)
    trainer.fit(1)
    good = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
    assert path.read_bytes() == good


def test_trainer_steps_do_not_sync_the_host(device):
    """On CUDA a training step (and the data-parallel sharding) queues work without waiting
    for it: torch's sync debug mode turns any host sync into an error. Planar VAE: the
    orthogonal Sylvester flow checks its Björck iteration's convergence on the host by
    design (pyroflows/transforms/_sylvester_q.py)."""
    from pyroflows.distributed import rank_batches

    if device.type != "cuda":
        pytest.skip("host syncs are a CUDA matter: run with --device cuda (benchmarks/gpu.sh)")
    trainer = make_trainer(0, device=device)
    x = trainer.train_data[:16]
    trainer.step(x, 1.0)  # lazy initialisation (fused optimizer state) may sync once
    order = torch.randperm(len(trainer.train_data)).to(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.step(x, 0.5)
        for idx, weight in rank_batches(order, 16, 1, 2):
            trainer.step(trainer.train_data[idx], 1.0, weight)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
