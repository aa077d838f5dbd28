r"""Data-parallel training with :mod:`torch.distributed`: process groups, sharding, seeds.

The :class:`~pyroflows.train.Trainer` and :func:`~pyroflows.train.evaluate` use these
helpers when they run data-parallel; :func:`data_parallel` and :func:`rank_batches` are the
recipe for SVI with a flow guide on large data (global latents, mini-batches sharded
across ranks, as in Pyro's Lightning example).

Conventions, shared by everything here:

* **Process group.** ``distributed=None`` (the default of the Trainer) means
  data-parallel when a default process group is initialized with more than one rank, or
  when the ``torchrun`` environment is set (``WORLD_SIZE`` > 1 and ``MASTER_ADDR``), in
  which case :func:`init_from_env` initializes it (``nccl`` on CUDA, ``gloo`` otherwise);
  ``True`` requires one (any size); ``False`` never; a ``ProcessGroup`` uses that group.
* **Sharding.** ``batch_size`` is the *global* mini-batch: each epoch every rank draws the
  same permutation from the shared shuffling generator (the ``set_epoch`` semantics of
  ``DistributedSampler``), cuts it into the global batches of a single-process run and
  takes its contiguous piece of each (:func:`rank_batches`). Every datum is used exactly
  once per epoch: nothing is padded or dropped when ``N`` or a batch is not divisible by
  the world size; pieces then differ by one row and each rank's loss is weighted by
  ``world_size / len(global batch)`` so that the gradient averaged by
  ``DistributedDataParallel`` is the mean over the union batch, the single-process
  gradient. A rank with no row in a (last, short) batch runs its first row at weight 0 so
  that it still joins the gradient all-reduce.
* **Seeds.** Rank ``r`` draws its Monte-Carlo noise from the global RNGs (torch, random,
  numpy) seeded with :func:`rank_seed` ``(seed, r)``, so the ranks' noise is independent.
"""

from __future__ import annotations

import datetime
import io
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Context",
    "data_parallel",
    "init_from_env",
    "rank_batches",
    "rank_rows",
    "rank_seed",
    "resolve",
]


@dataclass(frozen=True)
class Context:
    """A process group seen from one rank: ``group`` (``None``: the default), ``rank``,
    ``world_size``; thin wrappers of the collectives the Trainer needs."""

    group: Any
    rank: int
    world_size: int

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_object(self, obj: object) -> list[Any]:
        """Every rank's ``obj``, in rank order (tensors, containers and scalars only)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, _dumps(obj), group=self.group)
        return [_loads(b) for b in out]

    def broadcast_object(self, obj: object, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (``src`` is a rank of this group)."""
        box = [_dumps(obj)]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return _loads(box[0])

    def barrier(self) -> None:
        """Wait for every rank of the group."""
        dist.barrier(group=self.group)

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


def _dumps(obj: object) -> bytes:
    """``obj`` as ``torch.save`` bytes: the collectives then pickle plain bytes (pickling
    tensors inside ``all_gather_object`` fails to unpickle in some torch versions)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=True)


def _torchrun_env() -> bool:
    """Whether the ``torchrun`` (env://) variables describe more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def init_from_env(
    device: str | torch.device = "cpu", timeout: datetime.timedelta | None = None
) -> None:
    """Initialize the default process group from the ``torchrun`` environment (env://).

    Backend ``nccl`` for a CUDA ``device`` (and ``torch.cuda.set_device(LOCAL_RANK)``),
    ``gloo`` otherwise. Does nothing if a default group is already initialized.

    Example:
        >>> init_from_env("cpu") if dist.is_initialized() else None
    """
    if dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group("nccl" if cuda else "gloo", **kwargs)


def resolve(distributed: object, device: str | torch.device = "cpu") -> Context | None:
    """The :class:`Context` that ``distributed`` asks for, or ``None`` for one process.

    Args:
        distributed: ``None`` (auto: an initialized default group of more than one rank,
            or the ``torchrun`` environment), ``True`` (required), ``False`` (never), a
            ``torch.distributed.ProcessGroup`` or a :class:`Context`.
        device: Picks the backend if the group has to be initialized here.

    Example:
        >>> resolve(False) is None
        True
    """
    if distributed is False or isinstance(distributed, Context):
        return distributed or None
    if distributed is None or distributed is True:
        ready = dist.is_available() and (dist.is_initialized() or _torchrun_env())
        if not ready:
            if distributed:
                raise ValueError(
                    "distributed=True needs an initialized torch.distributed process group or "
                    "the torchrun environment (WORLD_SIZE, MASTER_ADDR, ...); got neither: "
                    "start with torchrun or call torch.distributed.init_process_group first"
                )
            return None
        init_from_env(device)
        if distributed is None and dist.get_world_size() == 1:
            return None
        return Context(None, dist.get_rank(), dist.get_world_size())
    if dist.is_available() and isinstance(distributed, dist.ProcessGroup):
        return Context(distributed, dist.get_rank(distributed), dist.get_world_size(distributed))
    raise TypeError(
        f"distributed must be None, a bool, a torch.distributed.ProcessGroup or a "
        f"pyroflows.distributed.Context; got {type(distributed).__name__}"
    )


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """A 32-bit seed for ``rank``'s noise: ``SeedSequence([seed, rank, *more])``.

    Independent streams for different ranks, a pure function of its arguments.

    Example:
        >>> rank_seed(0, 1) == rank_seed(0, 1) != rank_seed(0, 0)
        True
    """
    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1)[0])


def rank_batches(
    order: Tensor, batch_size: int, rank: int, world_size: int
) -> list[tuple[Tensor, float]]:
    """This rank's piece of each global mini-batch of ``order`` and its loss weight.

    The global batches are ``torch.split(order, batch_size)`` (those of one process); rank
    ``r`` takes ``torch.tensor_split(batch, world_size)[r]`` and weights its summed loss by
    ``world_size / len(batch)``, so averaging the ranks' gradients gives the gradient of the
    mean over the batch. A rank whose piece is empty gets the batch's first row at weight 0.
    No host sync: sizes come from shapes.

    Example:
        >>> [(i.tolist(), w) for i, w in rank_batches(torch.arange(5), 4, 1, 2)]
        [([2, 3], 0.5), ([4], 0.0)]
    """
    out = []
    for batch in torch.split(order, batch_size):
        piece = torch.tensor_split(batch, world_size)[rank]
        if len(piece) == 0:
            out.append((batch[:1], 0.0))
        else:
            out.append((piece, world_size / len(batch)))
    return out


def rank_rows(n: int, rank: int, world_size: int) -> slice:
    """Rows ``rank`` scores when ``n`` rows are split into contiguous, near-equal shards.

    Example:
        >>> [rank_rows(5, r, 2) for r in range(2)]
        [slice(0, 3, None), slice(3, 5, None)]
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def data_parallel(
    loss_module: nn.Module, distributed: object = True, **ddp_kwargs: Any
) -> nn.Module:
    r"""Wrap a loss module in ``DistributedDataParallel`` for data-parallel SVI.

    ``loss_module`` is a module whose ``forward`` returns the loss, e.g. Pyro's
    ``Trace_ELBO()(model, guide)`` (an ``ELBOModule``) or a
    :class:`~pyroflows.train.ObjectiveModule`; gradients of losses computed through the
    wrapper's ``forward`` are averaged over the ranks, and its parameters are broadcast from
    rank 0 when wrapping, so with the same optimizer they stay identical on every rank.
    Lazily created parameters (autoguides) must exist first: call ``loss_module`` once on a
    mini-batch before wrapping. For CUDA modules ``device_ids`` defaults to the module's
    device.

    Recipe for a flow guide with global latents on large data (``pyro.settings.set(
    module_local_params=True)`` so the parameters live on the modules, as in Pyro's
    Lightning example)::

        with pyro.plate("data", N, subsample=idx):   # in the model: idx = this rank's rows
            ...
        loss = data_parallel(Trace_ELBO()(model, guide))
        for idx, w in rank_batches(torch.randperm(N, generator=g), B, rank, world):
            optim.zero_grad(); loss(x[idx], idx).backward(); optim.step()

    Each rank's loss is then an unbiased estimate of the full-data negative ELBO (the plate
    scales by ``N / len(idx)``), and DDP averages the ranks' gradients.

    Example:
        >>> data_parallel(nn.Linear(2, 1), distributed=False)
        Linear(in_features=2, out_features=1, bias=True)
    """
    ctx = resolve(distributed)
    if ctx is None:
        return loss_module
    param = next(loss_module.parameters(), None)
    if param is None:
        raise ValueError(
            "loss_module has no parameters yet: call it once on a mini-batch (autoguides "
            "create theirs on the first call) before wrapping it"
        )
    if param.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [param.device])
    return nn.parallel.DistributedDataParallel(loss_module, process_group=ctx.group, **ddp_kwargs)
