"""Density estimation with flows: a flow as a Pyro model of data, fitted by maximum
likelihood with the :class:`~pyroflows.train.Trainer`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import Transform

from pyroflows._utils import check_hidden_dims, check_positive_int
from pyroflows.transforms import FLOWS, initialize_actnorm
from pyroflows.transforms._base import interleave_permutations


def _owner(t: object) -> nn.Module | None:
    """The module holding ``t``'s parameters (an inverted Pyro transform keeps it in ``_inv``)."""
    owner = t if isinstance(t, nn.Module) else getattr(t, "_inv", None)
    return owner if isinstance(owner, nn.Module) else None


class FlowDensity(nn.Module):
    r"""The density of data under a flow: :math:`x = T(z)`, :math:`z \sim N(0, I_D)`, so
    :math:`\log p(x) = \log N(T^{-1}(x); 0, I) + \log|\det J_{T^{-1}}(x)|`.

    A Pyro model with the data as its only (observed) site and no latent variables, so its
    ELBO, with the empty guide, is the exact log-likelihood: the
    :class:`~pyroflows.train.Trainer` fits it by maximum likelihood on mini-batches, with
    early stopping on a validation set, checkpoints and data-parallel training, as it fits a
    VAE (use ``warmup_epochs=0``: there is no KL term to anneal). Scoring data takes the
    flows' inverse direction: one pass for coupling layers and MAF, D passes for IAF.

    Args:
        flows: The layers, applied base → data in order (``TransformModule`` s, Pyro
            transforms, or their ``.inv``); their parameters become this module's.
        input_dim: Dimension D of the data; read from the first layer's ``input_dim`` when
            omitted.

    Example:
        >>> from pyroflows import Trainer
        >>> density = FlowDensity.from_family("realnvp", 2, num_flows=2, hidden_dims=[8])
        >>> trainer = Trainer(density, torch.randn(64, 2), batch_size=32, warmup_epochs=0)
        >>> len(trainer.fit(2))
        2
        >>> density.log_prob(torch.zeros(3, 2)).shape
        torch.Size([3])
    """

    def __init__(self, flows: Sequence[Transform], input_dim: int | None = None) -> None:
        super().__init__()
        flows = list(flows)
        bad = [t for t in flows if not isinstance(t, Transform)]
        if bad:
            raise TypeError(f"flows must be torch Transforms; got {type(bad[0]).__name__}")
        if input_dim is None:
            input_dim = next((getattr(t, "input_dim", None) for t in flows), None)
            if input_dim is None:
                raise ValueError("input_dim is needed: the first flow has no input_dim")
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.flows = flows
        self.layers = nn.ModuleList(m for m in map(_owner, flows) if m is not None)
        self.register_buffer("base_loc", torch.zeros(self.input_dim))

    @classmethod
    def from_family(
        cls,
        family: str,
        input_dim: int,
        num_flows: int = 4,
        hidden_dims: Sequence[int] | None = None,
    ) -> FlowDensity:
        """``num_flows`` layers of a registered family (:data:`~pyroflows.transforms.FLOWS`),
        with a reversal between layers that need one; ``hidden_dims`` goes to families with
        a conditioner network (coupling, MAF, IAF)."""
        if family not in FLOWS:
            raise ValueError(f"family must be one of {sorted(FLOWS)}; got {family!r}")
        check_positive_int("num_flows", num_flows)
        make = FLOWS[family]
        if hidden_dims is not None:
            hidden = check_hidden_dims(hidden_dims, [])
            make = _with_hidden(make, hidden)
        return cls(interleave_permutations([make(input_dim) for _ in range(num_flows)]), input_dim)

    def distribution(self) -> dist.TransformedDistribution:
        """:math:`p(x)`: N(0, I) pushed through the flows (on this module's device/dtype)."""
        base = dist.Normal(self.base_loc, torch.ones_like(self.base_loc)).to_event(1)
        return dist.TransformedDistribution(base, self.flows)

    def log_prob(self, x: Tensor) -> Tensor:
        """:math:`\\log p(x)` of data ``(*batch, D)``, shape ``batch``."""
        return self.distribution().log_prob(x)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Draws of shape ``(*sample_shape, D)``."""
        return self.distribution().sample(sample_shape)

    def initialize_actnorm(self, data: Tensor) -> FlowDensity:
        """Data-dependent initialisation of every actnorm layer (explicit, reproducible; see
        :func:`~pyroflows.transforms.initialize_actnorm`); returns ``self``."""
        initialize_actnorm(self.flows, data.to(self.base_loc))
        return self

    def model(self, x: Tensor, beta: float = 1.0) -> None:
        """The data as one observed site in a plate (``beta`` is unused: there is no KL)."""
        pyro.module("flow_density", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", self.distribution(), obs=x)

    def guide(self, x: Tensor, beta: float = 1.0) -> None:
        """No latent variables: the empty guide."""

    def elbo(self, x: Tensor, beta: float = 1.0) -> Tensor:
        """The ELBO of the empty guide, which is exact: :math:`\\sum_n \\log p(x_n)`."""
        return self.log_prob(x).sum()


def _with_hidden(make: Callable[..., Transform], hidden: list[int]) -> Callable[[int], Transform]:
    """``make`` with the conditioner widths ``hidden``; a family without them is an error."""

    def build(input_dim: int) -> Transform:
        try:
            return make(input_dim, hidden)
        except TypeError as err:
            raise ValueError("hidden_dims: this family has no conditioner network") from err

    return build
