r"""Training and evaluation of amortized (flow) VAEs with Pyro.

* :class:`Trainer` — mini-batch training of any objective of :mod:`pyroflows.objectives`
  with KL warm-up, Adamax, early stopping on the validation ELBO, a tqdm progress bar and
  checkpoints that resume bit-identically;
* :func:`evaluate` — mean per-datum ELBO and importance-sampled log-likelihood of a data set.

Both run data-parallel with :mod:`torch.distributed` (see :mod:`pyroflows.distributed`):
the Trainer under ``torchrun`` or with ``distributed=...``, :func:`evaluate` with
``distributed=...``.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyroflows import distributed as _dist
from pyroflows._utils import check_positive_int
from pyroflows.objectives import ELBO, Objective, elbo, get_objective, log_likelihood

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ObjectiveModule", "Trainer", "evaluate", "module_elbo"]


def _owner(cls: type, name: str) -> type | None:
    """The class in ``cls``'s MRO that defines attribute ``name``."""
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def module_elbo(module: nn.Module, x: Tensor, beta: float) -> Tensor:
    """``module.elbo(x, beta)`` where the module defines it (a direct computation, e.g.
    :meth:`pyroflows.vae.VAE.elbo`, without Pyro's tracing), else
    ``elbo(module.model, module.guide, x, beta)``. A subclass that overrides ``model`` or
    ``guide`` but not ``elbo`` gets the traced ELBO of its own model and guide."""
    cls = type(module)
    owner = _owner(cls, "elbo")
    if owner is not None and callable(module.elbo):
        if all(issubclass(owner, _owner(cls, m) or object) for m in ("model", "guide")):
            return module.elbo(x, beta)
    return elbo(module.model, module.guide, x, beta)


class ObjectiveModule(nn.Module):
    r"""A training objective as a module: ``forward(x, beta) -> (value, surrogate)``.

    The :class:`Trainer` computes its loss through this module's ``forward``, so a
    distributed wrapper (``DistributedDataParallel``) sees it and synchronises gradients.
    ``value`` is the objective summed over the mini-batch (a lower bound on
    :math:`\sum_n \log p(x_n)` at ``beta = 1``), ``surrogate`` has the same value and the
    estimator's gradient. The one-particle :class:`~pyroflows.objectives.ELBO` uses
    :func:`module_elbo` (``module.elbo`` where defined, the fast path of
    :class:`~pyroflows.vae.VAE`); every other objective traces ``module.model`` and
    ``module.guide`` with arguments ``(x, beta)``.

    Args:
        module: An ``nn.Module`` with ``model(x, beta)`` and ``guide(x, beta)`` methods.
        objective: A :class:`~pyroflows.objectives.Objective`.
    """

    def __init__(self, module: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.module = module
        self.objective = objective

    def forward(self, x: Tensor, beta: float) -> tuple[Tensor, Tensor]:
        obj = self.objective
        if type(obj) is ELBO and obj.num_particles == 1:
            value = module_elbo(self.module, x, beta)
            return value, value
        w = obj.log_weights(self.module.model, self.module.guide, (x, beta), {})
        return obj.estimate(w)


def _batches(data: Tensor, batch_size: int) -> list[Tensor]:
    return list(torch.split(data, batch_size))


@torch.no_grad()
def evaluate(
    module: nn.Module,
    data: Tensor,
    *,
    num_samples: int = 0,
    batch_size: int = 100,
    batch_samples: int = 500,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    distributed: bool | ProcessGroup | _dist.Context | None = False,
) -> dict[str, float]:
    r"""Mean per-datum ELBO (one sample) and, if ``num_samples > 0``, IS log-likelihood.

    ``module`` has Pyro ``model(x)``/``guide(x)`` methods (e.g. :class:`pyroflows.vae.VAE`).
    Returns ``{"elbo": ..., "log_likelihood": ...}`` in nats per datum (the papers report
    their negatives, −ELBO and NLL).

    Sharded: with ``distributed`` (``True``: the default process group, or a
    ``ProcessGroup``; see :func:`pyroflows.distributed.resolve`; default ``False``, so a
    call on one rank only never waits for the others) every rank passes the same ``data``
    and ``module``, scores its contiguous shard (:func:`~pyroflows.distributed.rank_rows`)
    with its own noise, and the sums and counts are all-reduced: every rank returns the
    same values, the means over all of ``data``.

    Example:
        >>> from pyroflows.vae import VAE
        >>> vae = VAE((28, 28), latent_dim=4, hidden_dim=8)
        >>> x = torch.bernoulli(torch.full((6, 784), 0.1))
        >>> sorted(evaluate(vae, x, num_samples=10))
        ['elbo', 'log_likelihood']
    """
    data = check_data("data", data, module)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int (0: no IS); got {num_samples!r}")
    batch_size = check_positive_int("batch_size", batch_size)
    device = _device(module, device)
    ctx = _dist.resolve(distributed, device)
    rows = data if ctx is None else data[_dist.rank_rows(len(data), ctx.rank, ctx.world_size)]
    quiet = _quiet(progress) or (ctx is not None and ctx.rank != 0)
    was_training = module.training
    module.eval()
    elbo_sum = torch.zeros((), device=device)
    ll_sum = torch.zeros((), device=device)
    bar = tqdm(_batches(rows, batch_size), desc="eval", leave=False, disable=quiet)
    for x in bar:
        x = x.to(device)
        elbo_sum += module_elbo(module, x, 1.0)
        if num_samples > 0:
            ll = log_likelihood(
                module.model, module.guide, x, num_samples=num_samples, batch_samples=batch_samples
            )
            ll_sum += ll.sum()
    module.train(was_training)
    count: float = len(data)
    if ctx is not None:  # one all-reduce of (sums, count)
        sums = torch.stack([elbo_sum, ll_sum, elbo_sum.new_tensor(float(len(rows)))])
        elbo_sum, ll_sum, n = ctx.all_reduce(sums).unbind()
        count = n.item()
    out = {"elbo": elbo_sum.item() / count}
    if num_samples > 0:
        out["log_likelihood"] = ll_sum.item() / count
    return out


def _bounded_in_unit_interval(module: nn.Module) -> bool:
    """Whether ``module`` scores data with a Bernoulli likelihood (the :class:`VAE`)."""
    from pyroflows.vae import VAE

    return isinstance(module, VAE)


def check_data(name: str, x: object, module: nn.Module | None = None) -> Tensor:
    """Return ``x`` if it is a non-empty, finite, floating ``(N, ...)`` tensor, else raise.

    For a Bernoulli VAE the values must also lie in [0, 1] (0/1 pixels, or grey levels
    scored by the cross-entropy). Errors name the argument ``name``.
    """
    if not isinstance(x, Tensor):
        hint = " (convert with torch.as_tensor(x, dtype=torch.float32))" * hasattr(x, "shape")
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}{hint}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor; got dtype {x.dtype} (use .float())"
        )
    if x.dim() < 2 or x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) tensor; got shape {tuple(x.shape)}")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        row = int(bad.reshape(len(x), -1).any(1).nonzero()[0])
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite values (NaN or inf), the first in "
            f"row {row}; clean the data before training"
        )
    if module is not None and _bounded_in_unit_interval(module):
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{name} must lie in [0, 1] for the Bernoulli VAE (binary pixels, or grey "
                f"levels scored by cross-entropy); got values in [{lo:g}, {hi:g}]"
            )
    return x


def _device(module: nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _quiet(progress: bool | None) -> bool:
    """tqdm's ``disable``: explicit ``progress``, else on only when stderr is a terminal."""
    if progress is None:
        return not sys.stderr.isatty()
    return not progress


def _rng_state() -> dict[str, Any]:
    """Global RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "random": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(_tuplify(state["random"])))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


def _optimizer(name: str, params: Iterable[Tensor], lr: float) -> torch.optim.Optimizer:
    """Adamax, or Adam with torch's fused single-pass update where this torch and device
    support it (on a CPU VAE step it cuts the update from ~5 ms to ~1.3 ms); the plain
    implementation otherwise."""
    params = list(params)
    if name == "adamax":
        return torch.optim.Adamax(params, lr=lr, eps=1e-7)
    try:
        return torch.optim.Adam(params, lr=lr, eps=1e-7, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused Adam not supported here
        return torch.optim.Adam(params, lr=lr, eps=1e-7)


class Trainer:
    r"""Mini-batch ELBO training of a Pyro ``model``/``guide`` module, as in the flow papers.

    Each epoch shuffles the training set (a dedicated generator), takes Adamax steps
    (van den Berg et al. 2018: lr 5e-4, eps 1e-7, batch 100) on
    :math:`-[\mathbb E_q \log p(x|z) - \beta_t \mathrm{KL}]` with the warm-up
    :math:`\beta_t = \min(t / T_{\text{warm-up}}, 1)` for epoch :math:`t = 1, 2, \dots`, then
    scores the validation set (β = 1). Training stops when the validation ELBO has not
    improved for ``early_stopping_epochs`` epochs after warm-up, and the best parameters are
    restored. The step maximises ``loss`` (by default the one-sample ELBO: Pyro's
    Trace_ELBO estimator, computed by ``module.elbo(x, beta)`` where the module defines one, as
    :class:`~pyroflows.vae.VAE` does), computed through :class:`ObjectiveModule`'s ``forward``
    so that ``DistributedDataParallel`` sees it, with a torch optimizer over
    ``module.parameters()``; the loss is read back (``.item()``) only every ``log_every``
    steps.

    Args:
        module: An ``nn.Module`` with ``model(x, beta)`` and ``guide(x, beta)`` methods
            (e.g. :class:`pyroflows.vae.VAE`).
        train_data: ``(N, D)`` training tensor.
        valid_data: Optional validation tensor for early stopping.
        batch_size: Mini-batch size (the global one, summed over ranks, when data-parallel).
        lr: Learning rate.
        optimizer: ``"adamax"`` (the Sylvester-flows code) or ``"adam"`` (fused update where
            supported).
        warmup_epochs: Epochs over which β grows linearly to 1 (0 turns warm-up off).
        early_stopping_epochs: Patience in epochs (0 turns early stopping off).
        device: Torch device for the module and data.
        checkpoint_path: Where :meth:`fit` saves a checkpoint.
        checkpoint_every: Save every this many epochs (and after the last one).
        progress: Show a tqdm bar; ``None`` shows it only when stderr is a terminal.
        log_every: Steps between progress-bar updates of the running ELBO.
        seed: Seeds the shuffling generator.
        loss: The training objective: a name (``"elbo"``, ``"stl"``, ``"iwae"``,
            ``"dreg"``) or an :class:`~pyroflows.objectives.Objective` such as
            ``IWAE(num_particles=8, vectorize_particles=True)``. The default one-particle
            ELBO is today's estimator, bit for bit. ``train_elbo`` in the history is the
            objective's value per datum (the IW bound for IWAE and DReG); validation and
            early stopping always use the one-sample ELBO.
        distributed: Data-parallel training with :mod:`torch.distributed`. ``None`` (the
            default): data-parallel when a default process group of more than one rank is
            initialized or the script runs under ``torchrun`` (the group is then initialized
            here: ``nccl`` for CUDA, ``gloo`` otherwise); ``True``: always (any size);
            ``False``: never; a ``ProcessGroup``: over that group. See "Data-parallel" below.

    Data-parallel:
        Every rank builds the Trainer with the same arguments and data. The loss module
        (:attr:`loss_module`) is wrapped in ``DistributedDataParallel``, which broadcasts
        rank 0's parameters and averages the gradients, so every rank takes the same steps.
        ``batch_size`` is the global mini-batch: each epoch every rank draws the
        single-process permutation from the shared shuffling generator (rank 0's state,
        broadcast at construction) and takes its contiguous piece of each global batch
        (:func:`pyroflows.distributed.rank_batches`: no padding, nothing dropped; uneven
        pieces are weighted so the averaged gradient is the union batch's mean). Rank
        ``r``'s Monte-Carlo noise comes from the global RNGs seeded with
        ``pyroflows.distributed.rank_seed(seed, r)`` here. Training and validation sums and
        counts are all-reduced once per epoch, so every rank records the same history and
        takes the same early-stopping decision. :meth:`save` and :meth:`state_dict` are
        collectives (every rank calls them; :meth:`fit` does); rank 0 writes the file,
        which every rank reads in :meth:`load` (a path all ranks see). Only rank 0 shows a
        progress bar. On CUDA, ``device="cuda"`` means the current device
        (``LOCAL_RANK`` under ``torchrun``). DDP runs with its defaults: every parameter
        must get a gradient in every step (as in the VAE).

        A checkpoint holds each rank's RNG states. Resumed on the same number of ranks,
        training continues bit-identically; on another number of ranks, the optimizer
        steps are those of the uninterrupted run (same global batches in the same order,
        β schedule, optimizer and early-stopping state), rank ``r`` continues rank ``r``'s
        noise stream where the checkpoint has one and is seeded with ``rank_seed(seed, r,
        epoch)`` otherwise: only the noise differs (with a deterministic loss the
        parameters agree to rounding).

    Example:
        >>> from pyroflows.vae import VAE
        >>> vae = VAE((28, 28), latent_dim=4, hidden_dim=8, flow="planar", num_flows=2)
        >>> data = torch.bernoulli(torch.full((20, 784), 0.2))
        >>> history = Trainer(vae, data, data[:5], batch_size=10, progress=False).fit(2)
        >>> [h["epoch"] for h in history]
        [1, 2]
    """

    def __init__(
        self,
        module: nn.Module,
        train_data: Tensor,
        valid_data: Tensor | None = None,
        *,
        batch_size: int = 100,
        lr: float = 5e-4,
        optimizer: str = "adamax",
        warmup_epochs: int = 100,
        early_stopping_epochs: int = 100,
        device: str | torch.device = "cpu",
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        progress: bool | None = None,
        log_every: int = 50,
        seed: int = 0,
        loss: str | Objective | None = None,
        distributed: bool | ProcessGroup | _dist.Context | None = None,
    ) -> None:
        for meth in ("model", "guide"):
            if not callable(getattr(module, meth, None)):
                raise TypeError(f"module must have a {meth}(x, beta) method; got {module!r}")
        if isinstance(lr, bool) or not (isinstance(lr, float | int) and 0 < lr < math.inf):
            raise ValueError(f"lr must be a positive, finite float; got {lr!r}")
        for name, v in (
            ("warmup_epochs", warmup_epochs),
            ("early_stopping_epochs", early_stopping_epochs),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int; got {v!r}")
        if optimizer not in ("adamax", "adam"):
            raise ValueError(f"optimizer must be 'adamax' or 'adam'; got {optimizer!r}")
        check_data("train_data", train_data, module)
        if valid_data is not None:
            check_data("valid_data", valid_data, module)
            if valid_data.shape[1:] != train_data.shape[1:]:
                raise ValueError(
                    f"valid_data rows must have the shape of train_data rows "
                    f"{tuple(train_data.shape[1:])}; got {tuple(valid_data.shape[1:])}"
                )
        self._ctx = _dist.resolve(distributed, device)
        self.device = _rank_device(torch.device(device), self._ctx)
        self.module = module.to(self.device)
        self.train_data = train_data.to(self.device)
        self.valid_data = None if valid_data is None else valid_data.to(self.device)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.warmup_epochs = warmup_epochs
        self.early_stopping_epochs = early_stopping_epochs
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.checkpoint_every = check_positive_int("checkpoint_every", checkpoint_every)
        self.progress = progress
        self.log_every = check_positive_int("log_every", log_every)
        self.optimizer = _optimizer(optimizer, module.parameters(), lr)
        self.objective = get_objective(loss)
        self.loss_module = ObjectiveModule(self.module, self.objective)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.best_elbo = -math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0
        self.diverged = False
        self._last_state: dict[str, Tensor] | None = None  # see fit()
        self._ddp: nn.Module | None = None
        if self._ctx is not None:
            self._setup_distributed(self._ctx)

    @property
    def rank(self) -> int:
        """This process's rank in the data-parallel group (0 in a single process)."""
        return 0 if self._ctx is None else self._ctx.rank

    @property
    def world_size(self) -> int:
        """Number of data-parallel processes (1 in a single process)."""
        return 1 if self._ctx is None else self._ctx.world_size

    def _setup_distributed(self, ctx: _dist.Context) -> None:
        """Shared shuffling state, per-rank noise seeds, DDP around the loss module."""
        self.generator.set_state(ctx.broadcast_object(self.generator.get_state()))
        pyro.set_rng_seed(_dist.rank_seed(self.seed, ctx.rank))
        ids = [self.device] if self.device.type == "cuda" else None
        self._ddp = nn.parallel.DistributedDataParallel(
            self.loss_module, device_ids=ids, process_group=ctx.group
        )

    def beta(self, epoch: int) -> float:
        """KL weight of (1-based) ``epoch``: ``min(epoch / warmup_epochs, 1)``."""
        return 1.0 if self.warmup_epochs == 0 else min(epoch / self.warmup_epochs, 1.0)

    def step(self, x: Tensor, beta: float, weight: float | None = None) -> Tensor:
        """One optimizer step on a mini-batch; returns the detached batch objective (no sync).

        The loss is ``-weight * surrogate`` (default ``weight = 1 / len(x)``, the mean per
        datum). Data-parallel, it is computed through ``DistributedDataParallel``, which
        averages the gradients over the ranks: every rank must call ``step`` together.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self._ddp is None:
            value, surrogate = self.loss_module(x, beta)
        else:
            value, surrogate = self._ddp(x, beta)
        loss = -surrogate / x.shape[0] if weight is None else -surrogate * weight
        loss.backward()
        self.optimizer.step()
        return value.detach()

    def train_epoch(self) -> float:
        """Train one epoch; returns the mean training objective per datum (β-weighted)."""
        if self._ctx is not None:
            return self._train_epoch_distributed(self._ctx)
        self.module.train()
        beta = self.beta(self.epoch + 1)
        order = torch.randperm(len(self.train_data), generator=self.generator)
        batches = torch.split(order.to(self.device), self.batch_size)
        total = torch.zeros((), device=self.device)
        desc = f"epoch {self.epoch + 1} (β={beta:.2f})"
        bar = tqdm(batches, desc=desc, leave=False, disable=_quiet(self.progress))
        for i, idx in enumerate(bar):
            total += self.step(self.train_data[idx], beta)
            if (i + 1) % self.log_every == 0 and not bar.disable:
                bar.set_postfix(elbo=f"{total.item() / ((i + 1) * self.batch_size):.2f}")
        self.epoch += 1
        return total.item() / len(self.train_data)

    def _train_epoch_distributed(self, ctx: _dist.Context) -> float:
        """:meth:`train_epoch` on this rank's pieces of the global batches; one all-reduce."""
        self.module.train()
        beta = self.beta(self.epoch + 1)
        order = torch.randperm(len(self.train_data), generator=self.generator)
        pieces = _dist.rank_batches(
            order.to(self.device), self.batch_size, ctx.rank, ctx.world_size
        )
        total = torch.zeros((), device=self.device)
        desc = f"epoch {self.epoch + 1} (β={beta:.2f})"
        quiet = _quiet(self.progress) or ctx.rank != 0
        bar = tqdm(pieces, desc=desc, leave=False, disable=quiet)
        seen = 0
        for i, (idx, weight) in enumerate(bar):
            value = self.step(self.train_data[idx], beta, weight)
            if weight:  # weight 0: a stand-in row that only joins the all-reduce
                total += value
                seen += len(idx)
            if (i + 1) % self.log_every == 0 and not bar.disable:
                bar.set_postfix(elbo=f"{total.item() / max(seen, 1):.2f}")  # rank 0's rows
        self.epoch += 1
        return ctx.all_reduce(total).item() / len(self.train_data)

    def fit(
        self, epochs: int, on_epoch: Callable[[dict[str, float]], None] | None = None
    ) -> list[dict[str, float]]:
        """Train until ``epochs`` epochs in total have run or early stopping triggers.

        ``epochs`` counts from the first epoch of this trainer (or of the checkpoint it was
        loaded from): ``fit(10)`` after 4 epochs runs 6. Returns the per-epoch history
        (``epoch``, ``beta``, ``train_elbo``, ``valid_elbo``, ``seconds``);
        ``on_epoch(record)`` is called after each epoch. An unwritable ``checkpoint_path``
        raises a ``ValueError`` before the first epoch.

        Best state restored: when ``fit`` returns, the module holds the parameters with the
        highest validation ELBO over every epoch run so far, in this call or earlier ones
        (the last parameters without validation data). The trainer keeps the last epoch's
        parameters and the next ``fit`` (or :meth:`save`) continues from those, so
        ``fit(2)`` then ``fit(5)`` trains exactly as ``fit(5)``.

        A training or validation ELBO that is NaN or infinite stops training: the epoch is
        recorded with that value, a ``RuntimeWarning`` names it, :attr:`diverged` is set and
        the best parameters are restored; it is never counted as "no improvement".
        """
        check_positive_int("epochs", epochs)
        if self.checkpoint_path is not None:
            self._on_rank0(_check_writable, self.checkpoint_path)
        if self._last_state is not None:  # continue from the last epoch, not the best one
            self.module.load_state_dict(self._last_state)
            self._last_state = None
        while self.epoch < epochs and not self.stopped:
            self._fit_epoch(epochs, on_epoch)
        if self.best_state is not None:
            self._last_state = copy.deepcopy(self.module.state_dict())
            self.module.load_state_dict(self.best_state)
        return self.history

    def _fit_epoch(self, epochs: int, on_epoch: Callable[[dict[str, float]], None] | None) -> None:
        start = time.perf_counter()
        record = {"epoch": self.epoch + 1, "beta": self.beta(self.epoch + 1)}
        record["train_elbo"] = self.train_epoch()
        if self.valid_data is not None:
            record["valid_elbo"] = self._validate(record["train_elbo"])
        record["seconds"] = time.perf_counter() - start
        self.history.append(record)
        bad = [k for k in ("train_elbo", "valid_elbo") if not math.isfinite(record.get(k, 0.0))]
        if bad:
            self.diverged = True
            warnings.warn(
                f"{bad[0]} is {record[bad[0]]} at epoch {record['epoch']}: training diverged "
                "and stops here; the best validation parameters so far are restored (try a "
                "lower lr)",
                RuntimeWarning,
                stacklevel=3,
            )
        if on_epoch is not None:
            on_epoch(record)
        last = self.epoch >= epochs or self.stopped
        if self.checkpoint_path is not None and (last or self.epoch % self.checkpoint_every == 0):
            self.save(self.checkpoint_path)

    @property
    def stopped(self) -> bool:
        """Whether training has stopped: early stopping triggered, or the ELBO diverged."""
        patience = self.early_stopping_epochs
        return self.diverged or (patience > 0 and self.bad_epochs >= patience)

    def _validate(self, train_elbo: float) -> float:
        """Validation ELBO per datum (β = 1); updates the best state and patience counter.

        A non-finite value (or training ELBO) changes neither: :meth:`fit` reports it.
        """
        value = evaluate(
            self.module,
            self.valid_data,
            batch_size=self.batch_size * 10,
            distributed=self._ctx or False,
        )["elbo"]
        finite = math.isfinite(value) and math.isfinite(train_elbo)
        if finite and value > self.best_elbo:
            self.best_elbo = value
            self.best_state = copy.deepcopy(self.module.state_dict())
            self.bad_epochs = 0
        elif finite and self.epoch >= self.warmup_epochs:
            self.bad_epochs += 1
        self.module.train()
        return value

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically, including the RNG states.

        ``"module"`` holds the parameters of the last epoch (from which training continues),
        ``"best_state"`` the best ones; ``"rng"`` rank 0's global RNG states,
        ``"world_size"`` the number of ranks and, when data-parallel, ``"rng_ranks"`` every
        rank's (gathered: a collective).
        """
        state = self._local_state()
        if self._ctx is None:
            return state | {"world_size": 1}
        ranks = self._ctx.all_gather_object(state["rng"])
        return state | {"rng_ranks": ranks, "world_size": len(ranks)}

    def _local_state(self) -> dict[str, Any]:
        return {
            "module": self._last_state or self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best_elbo": self.best_elbo,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
            "diverged": self.diverged,
            "generator": self.generator.get_state(),
            "rng": _rng_state(),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (module, optimizer, epoch, RNGs, early stopping).

        Atomic: if any part fails to load (missing keys, a module or optimizer state of
        another architecture), the trainer, module, optimizer and RNGs are left unchanged
        and the error is raised.
        """
        missing = sorted(set(_STATE_KEYS) - set(state)) if isinstance(state, dict) else None
        if missing is None or missing:
            raise ValueError(f"not a Trainer state_dict: missing keys {missing or _STATE_KEYS}")
        backup = self._snapshot()
        try:
            self._restore(state)
        except Exception:
            self._restore(backup)
            raise

    def _snapshot(self) -> dict[str, Any]:
        state = copy.deepcopy(self._local_state())
        state["_local_rng"] = state["rng"]
        state["_last_state"] = copy.deepcopy(self._last_state)
        state["module"] = copy.deepcopy(self.module.state_dict())
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        rng = self._rank_rng(state)
        if rng is None:  # a rank the checkpoint did not have
            seed = int(state.get("seed", self.seed))
            pyro.set_rng_seed(_dist.rank_seed(seed, self.rank, int(state["epoch"])))
        else:
            _set_rng_state(rng)
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.best_elbo = float(state["best_elbo"])
        self.best_state = state["best_state"]
        self.bad_epochs = int(state["bad_epochs"])
        self.diverged = bool(state.get("diverged", False))
        self._last_state = state.get("_last_state")

    def _rank_rng(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """This rank's RNG states in ``state`` (a checkpoint of any world size, or a
        :meth:`_snapshot`); ``None`` if it has none for this rank."""
        if "_local_rng" in state:
            return state["_local_rng"]
        if self.rank == 0:
            return state["rng"]
        ranks = state.get("rng_ranks", [])
        return ranks[self.rank] if self.rank < len(ranks) else None

    def save(self, path: str | os.PathLike) -> None:
        """Write a checkpoint atomically to ``path`` (a torch zip file; no ``.tmp`` is left).

        Data-parallel: a collective; rank 0 writes, and an error there is raised on every rank.
        """
        state = self.state_dict()
        self._on_rank0(_write, Path(path), state)

    def _on_rank0(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)`` on rank 0 only; its exception is raised there and, as a
        ``RuntimeError``, on the other ranks (so none waits for a rank that failed)."""
        if self._ctx is None:
            return fn(*args)
        error: Exception | None = None
        if self._ctx.rank == 0:
            try:
                fn(*args)
            except Exception as err:  # re-raised below, on every rank
                error = err
        message = self._ctx.broadcast_object(None if error is None else repr(error))
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"rank 0 failed: {message}")

    def load(self, path: str | os.PathLike) -> Trainer:
        """Resume from a checkpoint written by :meth:`save`; returns ``self``.

        The zip's CRC-32 checksums are verified first: a corrupt or truncated file raises a
        ``ValueError`` naming it, and nothing is changed.
        """
        path = Path(path)
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise ValueError(f"checksum mismatch in {bad}")
            state = torch.load(path, map_location=self.device, weights_only=True)
        except FileNotFoundError:
            raise
        except (zipfile.BadZipFile, ValueError, RuntimeError, OSError, EOFError) as err:
            raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated: {err}") from err
        self.load_state_dict(state)
        return self


def _write(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _rank_device(device: torch.device, ctx: _dist.Context | None) -> torch.device:
    """``cuda`` without an index means this rank's current CUDA device when data-parallel."""
    if ctx is not None and device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


_STATE_KEYS = ("module", "optimizer", "epoch", "history", "best_elbo", "best_state",
               "bad_epochs", "generator", "rng")  # fmt: skip


def _check_writable(path: Path) -> None:
    """Raise a ``ValueError`` naming ``checkpoint_path`` unless a file can be written there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.remove(tmp)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
    except OSError as err:
        raise ValueError(
            f"checkpoint_path {str(path)!r} is not writable ({err.strerror or err}); "
            "choose another path"
        ) from err
