"""Data-parallel training on CPU with gloo: 2 processes forked from the test process.

Each test runs a rank function in 2 processes (``torch.multiprocessing`` with the fork start
method, so the children start in well under a second), with a free port and a timeout:
a hang fails the test instead of blocking CI. The ranks write their results to files that
the test compares with a single-process reference.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn

from pyroflows import AutoFlowGuide
from pyroflows.distributed import data_parallel, rank_batches, rank_rows, rank_seed
from pyroflows.objectives import elbo
from pyroflows.train import Trainer, evaluate
from pyroflows.vae import VAE

TIMEOUT = 90.0
#: Trainer and evaluate accumulate ELBO sums in float32 (unchanged single-process path), so
#: sums over other shards agree with the single-process value to float32 rounding only.
ELBO_RTOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, out, args):
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = fn(rank, world_size, out, *args)
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def run_ranks(fn, out: Path, *args, world_size: int = 2, timeout: float = TIMEOUT) -> list:
    """Run ``fn(rank, world_size, out, *args)`` in ``world_size`` gloo processes; return
    their results in rank order. Fails (and kills the ranks) after ``timeout`` seconds."""
    ctx = mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), out, args),
        nprocs=world_size,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__}: the ranks did not finish in {timeout} s (a hang?)")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


class DeltaAE(nn.Module):
    """A deterministic loss through the whole Pyro path: a Delta guide ``z = enc(x)``,
    prior N(0, I), ``x | z ~ N(dec(z), 1)`` (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 2).double()
        self.dec = nn.Linear(2, 4).double()

    def model(self, x, beta=1.0):
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):
                prior = dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1)
                z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(self.dec(z), 1.0).to_event(1), obs=x)

    def guide(self, x, beta=1.0):
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):
                pyro.sample("z", dist.Delta(self.enc(x)).to_event(1))


def delta_data(n: int = 29) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 4, generator=g, dtype=torch.float64)


def delta_trainer(distributed, path=None, **kwargs) -> Trainer:
    torch.manual_seed(0)
    data = delta_data()
    opts = {"batch_size": 4, "warmup_epochs": 2, "progress": False, "lr": 0.05}
    opts |= {"early_stopping_epochs": 0, "checkpoint_path": path, "distributed": distributed}
    return Trainer(DeltaAE(), data[:21], data[21:], **(opts | kwargs))


def tiny_vae_trainer(distributed, path=None) -> Trainer:
    torch.manual_seed(0)
    vae = VAE((4, 5), latent_dim=3, flow="planar", num_flows=2, hidden_dim=8)
    g = torch.Generator().manual_seed(123)
    data = torch.bernoulli(torch.full((39, 20), 0.3), generator=g)
    return Trainer(
        vae, data[:29], data[29:], batch_size=4, warmup_epochs=2, progress=False,
        checkpoint_path=path, distributed=distributed,
    )  # fmt: skip


# ----------------------------------------------------------------- pure helpers (no processes)
def test_rank_batches_cover_every_row_once_and_weight_to_the_union_mean():
    order = torch.randperm(29, generator=torch.Generator().manual_seed(0))
    for world in (1, 2, 3):
        pieces = [rank_batches(order, 4, r, world) for r in range(world)]
        assert len({len(p) for p in pieces}) == 1  # same number of steps on every rank
        used = torch.cat([i for p in pieces for i, w in p if w > 0])
        assert sorted(used.tolist()) == list(range(29))
        for step in zip(*pieces, strict=True):  # weights: world / len(global batch)
            size = sum(len(i) for i, w in step if w > 0)
            assert all(w in (0.0, world / size) for _, w in step)
    assert rank_batches(torch.arange(5), 4, 1, 2)[1] == (torch.tensor([4]), 0.0)  # stand-in
    assert [rank_rows(7, r, 3) for r in range(3)] == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert len({rank_seed(0, r) for r in range(8)}) == 8


def test_single_process_trainer_is_not_distributed():
    trainer = delta_trainer(None)
    assert trainer.world_size == 1 and trainer.rank == 0 and trainer._ddp is None
    with pytest.raises(ValueError, match="distributed=True needs an initialized"):
        delta_trainer(True)
    with pytest.raises(TypeError, match="distributed must be None, a bool"):
        delta_trainer("gloo")


# ------------------------------------------- 2-process tests (default run: ~0.5 s each, ~3 s all)
def _gradients_and_parameters(rank, world, out):
    # DDP-averaged gradient of one uneven global batch (7 rows: 4 + 3) through Trainer.step
    trainer = delta_trainer(True, batch_size=7)
    idx, weight = rank_batches(torch.arange(7), 7, rank, world)[0]
    trainer.step(trainer.train_data[idx], 0.5, weight)
    grads = {n: p.grad.clone() for n, p in trainer.module.named_parameters()}
    # a stochastic VAE trained 2 epochs (29 rows, batch 4: an empty piece in the last batch)
    vae = tiny_vae_trainer(True)
    vae.fit(2)
    return {"grads": grads, "vae": vae.state_dict()["module"], "history": vae.history}


def test_ddp_gradients_equal_the_union_batch_and_ranks_stay_identical(tmp_path):
    """Default-run smoke test: 2 gloo ranks; (1) the DDP-averaged gradient of an uneven batch
    equals the single-process gradient of the union batch to 1e-12 (float64, deterministic
    loss); (2) after two epochs of a stochastic VAE, parameters are bit-identical on both
    ranks and both ranks recorded the same history."""
    r0, r1 = run_ranks(_gradients_and_parameters, tmp_path)
    ref = delta_trainer(False)
    x = ref.train_data[:7]
    (-elbo(ref.module.model, ref.module.guide, x, 0.5) / 7).backward()
    for name, p in ref.module.named_parameters():
        for r in (r0, r1):
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=0, atol=1e-12)
    for key, value in r0["vae"].items():
        assert torch.equal(value, r1["vae"][key]), key
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in r0["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in r1["history"]]
    assert all(math.isfinite(h["valid_elbo"]) for h in r0["history"])


def _checkpoints(rank, world, out, stage):
    if stage == "two-rank":  # uninterrupted 2-rank runs, checkpointed at epoch 2
        det = delta_trainer(True, out / "det2.pt")
        det.fit(2)
        det.fit(5)
        vae = tiny_vae_trainer(True, out / "vae2.pt")
        vae.fit(2)
        vae.fit(4)
        return {"det": det.state_dict(), "vae": vae.state_dict()}
    if stage == "resume":  # same size: resume the 2-rank VAE checkpoint of epoch 2
        vae = tiny_vae_trainer(True).load(out / "vae2-epoch2.pt")
        vae.fit(4)
        vae_state = vae.state_dict()  # the RNG states right after training, as in two-rank
        det = delta_trainer(True).load(out / "det1-epoch2.pt")  # 1 rank -> 2 ranks
        det.fit(5)
        return {"vae": vae_state, "det_from_1": det.state_dict()}
    raise ValueError(stage)


def _assert_close_states(a: dict, b: dict, atol: float) -> None:
    assert a["epoch"] == b["epoch"]
    for key, value in a["module"].items():
        torch.testing.assert_close(value, b["module"][key], rtol=0, atol=atol, msg=key)
    for ha, hb in zip(a["history"], b["history"], strict=True):
        for k in ("epoch", "beta", "train_elbo", "valid_elbo"):
            assert ha[k] == pytest.approx(hb[k], rel=ELBO_RTOL), k


def test_checkpoints_resume_across_world_sizes(tmp_path, monkeypatch):
    """What "continues as the uninterrupted run" means, checked here:

    * same size (2 -> 2 ranks, stochastic VAE): bit-identical parameters, optimizer state,
      history and RNG states at the end (each rank's RNG states are in the checkpoint);
    * 2 -> 1 and 1 -> 2 ranks (deterministic loss, float64): the same optimizer steps, so the
      parameters agree to 1e-10 (the all-reduce sums in another order than one process);
      with Monte-Carlo noise only the noise differs (rank r continues rank r's stream, a new
      rank gets rank_seed). The ELBOs in the history are float32 sums (ELBO_RTOL).
    """
    # keep a copy of each checkpoint of epoch 2 (the forked ranks inherit the patch)
    real_save = Trainer.save

    def keep_epoch_2(self, path):
        real_save(self, path)
        if self.epoch == 2 and self.rank == 0:
            target = Path(path).with_name(Path(path).stem + "-epoch2.pt")
            target.write_bytes(Path(path).read_bytes())

    monkeypatch.setattr(Trainer, "save", keep_epoch_2)
    two = run_ranks(_checkpoints, tmp_path, "two-rank")
    assert (tmp_path / "vae2-epoch2.pt").exists() and (tmp_path / "det2-epoch2.pt").exists()
    # 2 ranks -> 1 process (a plain, single-process Trainer)
    one = delta_trainer(False).load(tmp_path / "det2-epoch2.pt")
    one.fit(5)
    _assert_close_states(one.state_dict(), two[0]["det"], atol=1e-10)
    # 1 process -> 2 ranks, against an uninterrupted single-process run
    single = delta_trainer(False, tmp_path / "det1.pt")
    single.fit(5)
    assert torch.load(tmp_path / "det1-epoch2.pt", weights_only=True)["epoch"] == 2
    resumed = run_ranks(_checkpoints, tmp_path, "resume")
    _assert_close_states(resumed[0]["det_from_1"], single.state_dict(), atol=1e-10)
    # 2 ranks -> 2 ranks: bit-identical
    for r in (0, 1):
        a, b = two[r]["vae"], resumed[r]["vae"]
        strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in s["history"]]
                 for s in (a, b)]  # fmt: skip
        assert strip[0] == strip[1]
        for key, value in a["module"].items():
            assert torch.equal(value, b["module"][key]), key
        for i, s in a["optimizer"]["state"].items():
            assert torch.equal(s["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
        for ra, rb in zip(a["rng_ranks"], b["rng_ranks"], strict=True):
            assert torch.equal(ra["torch"], rb["torch"])


class Shift(nn.Module):
    """x ~ N(μ, 1): training pulls μ from 5 to the train mean 0 (deterministic loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.full((2,), 5.0, dtype=torch.float64))

    def model(self, x, beta=1.0):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(self.mu, 1.0).to_event(1), obs=x)

    def guide(self, x, beta=1.0):
        pass


def shift_trainer(distributed, progress=False) -> Trainer:
    """Validation rows at -5 (rank 0's shard) and +5 (rank 1's): the global validation ELBO
    improves as μ falls from 5 to 0 while rank 1's local one gets worse every epoch."""
    train = torch.zeros(10, 2, dtype=torch.float64)
    valid = torch.cat([torch.full((5, 2), -5.0), torch.full((5, 2), 5.0)]).double()
    return Trainer(
        Shift(), train, valid, lr=0.5, batch_size=5, warmup_epochs=0, early_stopping_epochs=2,
        progress=progress, distributed=distributed,
    )  # fmt: skip


def _early_stopping(rank, world, out):
    trainer = shift_trainer(True, progress=True)
    local = []
    shard = trainer.valid_data[rank_rows(10, rank, world)]
    with contextlib.redirect_stderr(io.StringIO()) as err:  # progress bars: rank 0 only
        trainer.fit(8, on_epoch=lambda h: local.append(evaluate(trainer.module, shard)["elbo"]))
    bars = err.getvalue()
    return {"history": trainer.history, "local": local, "epoch": trainer.epoch, "bars": bars}


def test_early_stopping_is_a_consensus_without_hang(tmp_path):
    r0, r1 = run_ranks(_early_stopping, tmp_path, timeout=60.0)
    assert "epoch 1" in r0["bars"] and r1["bars"] == ""  # progress=True: a bar on rank 0 only
    local = r1["local"][:3]  # rank 1's own validation ELBO falls: alone it would stop
    assert local[0] > local[1] > local[2]
    # ...after epoch 3 (patience 2), but the all-reduced ELBO decides, alike on both ranks
    single = shift_trainer(False)
    single.fit(8)
    for r in (r0, r1):
        assert r["epoch"] == single.epoch
        got = [h["valid_elbo"] for h in r["history"]]
        assert got == pytest.approx([h["valid_elbo"] for h in single.history], rel=ELBO_RTOL)
    assert single.epoch > 3


VAE_DATA = torch.bernoulli(torch.full((9, 20), 0.3), generator=torch.Generator().manual_seed(1))


class ExactPosterior(nn.Module):
    """z ~ N(0, 1), x | z ~ N(z, 1) with the exact posterior guide N(x/2, 1/2): every
    importance weight is p(x) exactly, so ELBO = IS log-likelihood = log N(x; 0, 2)."""

    def model(self, x, beta=1.0):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(self, x, beta=1.0):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.5**0.5).to_event(1))


def _sharded_evaluate(rank, world, out, data):
    vae_data = VAE_DATA
    torch.manual_seed(0)
    vae = VAE((4, 5), latent_dim=3, flow="planar", num_flows=2, hidden_dim=8)
    pyro.set_rng_seed(rank_seed(0, rank))
    return {
        "exact": evaluate(
            ExactPosterior(), data, num_samples=6, batch_samples=4, distributed=True
        ),
        "vae": evaluate(vae, vae_data, num_samples=500, batch_size=3, distributed=True),
    }


def test_sharded_is_log_likelihood_equals_the_single_process_value(tmp_path):
    data = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]  # 4 + 3 rows on 2 ranks
    r0, r1 = run_ranks(_sharded_evaluate, tmp_path, data)
    exact = dist.Normal(0.0, 2**0.5).log_prob(data).mean().item()
    single = evaluate(ExactPosterior(), data, num_samples=6, batch_samples=4)
    for r in (r0, r1):
        assert r["exact"]["log_likelihood"] == pytest.approx(
            single["log_likelihood"], rel=ELBO_RTOL
        )
        assert r["exact"]["elbo"] == pytest.approx(exact, rel=ELBO_RTOL)
        assert single["elbo"] == pytest.approx(exact, rel=ELBO_RTOL)
    assert r0["vae"] == r1["vae"]  # all-reduced: the same numbers on every rank
    torch.manual_seed(0)
    vae = VAE((4, 5), latent_dim=3, flow="planar", num_flows=2, hidden_dim=8)
    vae_data = VAE_DATA
    ref = evaluate(vae, vae_data, num_samples=500, batch_size=3)  # other noise: MC agreement
    assert r0["vae"]["log_likelihood"] == pytest.approx(ref["log_likelihood"], abs=0.5)


def regression(x, y=None, size=None):
    """Bayesian linear regression with global latents and a subsampled data plate."""
    w = pyro.sample("w", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
    with pyro.plate("data", size or len(x), subsample_size=len(x)):
        pyro.sample("y", dist.Normal(x @ w, 0.5), obs=y)


def svi_data():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    return x, x @ torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5 * torch.randn(
        40, generator=g, dtype=torch.float64
    )


def make_svi_loss(x, y):
    pyro.set_rng_seed(0)
    guide = AutoFlowGuide(regression, flow="planar", num_flows=2)
    loss = Trace_ELBO()(regression, guide)
    loss(x[:4], y[:4], 40)  # create the guide's parameters
    return loss


def _svi(rank, world, out):
    x, y = svi_data()
    with pyro.settings.context(module_local_params=True):
        loss = make_svi_loss(x, y)
        ddp = data_parallel(loss)
        optim = torch.optim.Adam(ddp.parameters(), lr=0.05)
        grads = None
        for epoch in range(3):
            order = torch.randperm(40, generator=torch.Generator().manual_seed(epoch))
            for idx, _ in rank_batches(order, 8, rank, world):  # equal pieces: 4 + 4
                pyro.set_rng_seed(100 + epoch)  # the same noise on every rank: see the test
                optim.zero_grad()
                ddp(x[idx], y[idx], 40).backward()
                if grads is None:
                    grads = {n: p.grad.clone() for n, p in loss.named_parameters()}
                optim.step()
    return {"grads": grads, "params": {n: p.detach() for n, p in loss.named_parameters()}}


def test_flow_guide_svi_with_sharded_subsamples(tmp_path):
    """AutoFlowGuide SVI on global latents, mini-batches sharded across 2 ranks with the
    subsampled plate. With the same noise on both ranks (one global z draw), the DDP-averaged
    gradient is the single-process gradient of the union mini-batch (1e-12, float64); the
    parameters are identical on both ranks after 15 steps."""
    r0, r1 = run_ranks(_svi, tmp_path)
    x, y = svi_data()
    with pyro.settings.context(module_local_params=True):
        loss = make_svi_loss(x, y)
        order = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:8]
        pyro.set_rng_seed(100)
        loss(x[order], y[order], 40).backward()
        for n, p in loss.named_parameters():
            torch.testing.assert_close(r0["grads"][n], p.grad, rtol=0, atol=1e-12, msg=n)
    for n, p in r0["params"].items():
        assert torch.equal(p, r1["params"][n]), n


@pytest.mark.slow
def test_torchrun_runs_the_cli_on_two_processes(tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_port", str(free_port()), "-m", "pyroflows", "vae", "--epochs", "2",
        "--num-samples", "4", "--test-subset", "10", "--hidden-dim", "16", "--latent-dim", "4",
        "--flow", "planar", "--num-flows", "2", "--no-progress", "--output-dir", str(out),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_run"] == 2
    assert math.isfinite(results["test_log_likelihood"])
    assert proc.stderr.count("test ELBO") == 1  # rank 0 logs, once
