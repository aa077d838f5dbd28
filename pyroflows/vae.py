r"""Amortized flow VAEs: a flow encoder for Pyro guides and a Bernoulli VAE built on it.

:class:`FlowEncoder` turns any network :math:`x \mapsto h` into the amortized posterior of
the flow-VAE papers, :math:`q(z|x) = T_K \circ \dots \circ T_1\, \#\,
\mathcal N(\mu(h), \sigma(h)^2)`, where the parameters of every flow :math:`T_k` are
linear functions of :math:`h` (Rezende & Mohamed 2015; van den Berg et al. 2018).
:class:`VAE` adds the Bernoulli decoder, the prior and the Pyro ``model``/``guide`` pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import Tensor, nn
from torch.distributions import Transform
from torch.nn import functional as F

from pyroflows._utils import check_positive_int
from pyroflows.transforms import CONDITIONAL_FLOWS, ConditionalPlanarStack
from pyroflows.transforms._base import Reverse, needs_permutation

__all__ = [
    "ARCHITECTURES",
    "FlowEncoder",
    "GatedConv2d",
    "GatedConvTranspose2d",
    "GatedDense",
    "VAE",
    "conv_decoder",
    "conv_encoder",
    "mlp_decoder",
    "mlp_encoder",
]

ARCHITECTURES = ("mlp", "conv")
"""Encoder/decoder architectures accepted by :class:`VAE`."""


def _flow_kwargs(name: str) -> dict[str, Any]:
    """Paper defaults: a linear map from h (``hidden_dims=[]``); IAF: a 320-wide MADE."""
    if name.startswith("iaf"):
        return {"hidden_dims": [320]}
    return {"hidden_dims": []}


class FlowEncoder(nn.Module):
    r"""Amortized posterior :math:`q(z|x)`: a Gaussian followed by K conditional flows.

    ``net`` maps ``x`` of shape ``(*batch, ...)`` to ``h`` of shape ``(*batch, hidden_dim)``.
    Linear heads give :math:`\mu(h)` and :math:`\sigma(h) = \mathrm{softplus}(\cdot) +
    \sigma_{\min}`; each flow is ``CONDITIONAL_FLOWS[flow](latent_dim, hidden_dim,
    hidden_dims=[])`` conditioned on ``h``, i.e. its parameters are a linear function of
    ``h`` as in the papers. Calling the encoder returns a
    :class:`pyro.distributions.TransformedDistribution` with batch shape ``batch`` and event
    shape ``(latent_dim,)``, so ``pyro.sample`` under ``pyro.plate`` works as usual and
    :class:`~pyro.infer.Trace_ELBO` scores :math:`\log q(z|x) = \log \mathcal N(z_0) -
    \sum_k \log|\det \partial z_k / \partial z_{k-1}|` (read from the cache, no inversion).
    Between autoregressive or triangular layers (``iaf``, ``iaf-gated``,
    ``sylvester-triangular``) a parameter-free reversal permutation is inserted. For
    ``flow="planar"`` with linear heads the K layers are one
    :class:`~pyroflows.transforms.ConditionalPlanarStack` (the same family, one matmul for
    all K parameter sets and one autograd node for the stack).

    Args:
        net: Module mapping ``x`` to ``h``.
        hidden_dim: Size of ``h``.
        latent_dim: Size of ``z``.
        flow: A key of :data:`pyroflows.transforms.CONDITIONAL_FLOWS`, or ``"none"``.
        num_flows: Number of flow layers K (ignored for ``"none"``).
        flow_kwargs: Extra keyword arguments for the flow constructor (default
            ``hidden_dims=[]``; ``[320]`` for IAF's MADE).
        min_scale: Lower bound of :math:`\sigma`.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> encoder = FlowEncoder(nn.Sequential(nn.Linear(6, 8), nn.ReLU()), 8, 2, "planar", 3)
        >>> decoder = nn.Linear(2, 6)
        >>> def model(x):
        ...     with pyro.plate("data", x.shape[0]):
        ...         z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        ...         pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)
        >>> def guide(x):
        ...     pyro.module("encoder", encoder)
        ...     with pyro.plate("data", x.shape[0]):
        ...         return pyro.sample("z", encoder(x))
        >>> x = torch.bernoulli(torch.full((5, 6), 0.5))
        >>> guide(x).shape
        torch.Size([5, 2])
        >>> loss = pyro.infer.Trace_ELBO().loss(model, guide, x)  # includes the log-dets
    """

    def __init__(
        self,
        net: nn.Module,
        hidden_dim: int,
        latent_dim: int,
        flow: str = "planar",
        num_flows: int = 4,
        flow_kwargs: dict[str, Any] | None = None,
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module; got {type(net).__name__}")
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        if flow != "none" and flow not in CONDITIONAL_FLOWS:
            choices = ["none", *sorted(CONDITIONAL_FLOWS)]
            raise ValueError(f"flow must be one of {choices}; got {flow!r}")
        if not (isinstance(min_scale, float | int) and 0 < min_scale < math.inf):
            raise ValueError(f"min_scale must be a positive finite float; got {min_scale!r}")
        self.flow = flow
        self.num_flows = 0 if flow == "none" else check_positive_int("num_flows", num_flows)
        self.min_scale = float(min_scale)
        self.net = net
        self.loc = nn.Linear(hidden_dim, latent_dim)
        self.scale = nn.Linear(hidden_dim, latent_dim)
        kwargs = _flow_kwargs(flow) | dict(flow_kwargs or {})
        if flow == "planar" and kwargs == {"hidden_dims": []}:
            # the same K linear-head layers, emitted by one matmul and run as one autograd node
            flows = [ConditionalPlanarStack(latent_dim, hidden_dim, self.num_flows)]
        else:
            flows = [
                CONDITIONAL_FLOWS[flow](latent_dim, hidden_dim, **kwargs)
                for _ in range(self.num_flows)
            ]
        self.flows = nn.ModuleList(flows)

    def hidden(self, x: Tensor) -> Tensor:
        """The encoder's hidden state ``h = net(x)``, shape ``(*batch, hidden_dim)``."""
        return self.net(x)

    def transforms(self, h: Tensor) -> list[Transform]:
        """The K flows conditioned on ``h`` (with reversals between autoregressive layers)."""
        out: list[Transform] = []
        for k, flow in enumerate(self.flows):
            if k > 0 and needs_permutation(self.flows[k - 1]) and needs_permutation(flow):
                out.append(Reverse())
            out.append(flow.condition(h))
        return out

    def forward(self, x: Tensor) -> dist.TransformedDistribution:
        """Return :math:`q(z|x)` with batch shape ``x.shape[:-1]`` (``(*batch,)`` of ``h``)."""
        h = self.hidden(x)
        loc = self.loc(h)  # (*batch, latent_dim)
        scale = F.softplus(self.scale(h)) + self.min_scale
        base = dist.Independent(dist.Normal(loc, scale, validate_args=False), 1)
        return dist.TransformedDistribution(base, self.transforms(h), validate_args=False)

    def extra_repr(self) -> str:
        return f"flow={self.flow!r}, num_flows={self.num_flows}, latent_dim={self.latent_dim}"


class GatedDense(nn.Module):
    r"""Gated dense layer :math:`h = (W x + b) \odot \sigma(V x + c)` (Dauphin et al. 2017).

    Example:
        >>> GatedDense(4, 3)(torch.zeros(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        # W and V stacked in one layer (same init as two: it depends on in_features only),
        # so one matrix product per call instead of two
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, x: Tensor) -> Tensor:
        h, g = self.linear(x).chunk(2, dim=-1)
        return h * torch.sigmoid(g)


class GatedConv2d(nn.Module):
    r"""Gated convolution :math:`h = \mathrm{conv}_h(x) \odot \sigma(\mathrm{conv}_g(x))`.

    Example:
        >>> GatedConv2d(1, 4, 5, 2, 2)(torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3, 4, 14, 14])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int,
        padding: int,
    ) -> None:
        super().__init__()
        self.h = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        self.g = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class GatedConvTranspose2d(nn.Module):
    r"""Gated transposed convolution, the decoder's counterpart of :class:`GatedConv2d`.

    Example:
        >>> GatedConvTranspose2d(4, 2, 5, 2, 2, 1)(torch.zeros(3, 4, 7, 7)).shape
        torch.Size([3, 2, 14, 14])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int,
        padding: int,
        output_padding: int = 0,
    ) -> None:
        super().__init__()
        args = (in_channels, out_channels, kernel_size, stride, padding, output_padding)
        self.h = nn.ConvTranspose2d(*args)
        self.g = nn.ConvTranspose2d(*args)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


class _Images(nn.Module):
    """Apply a conv net to flat vectors ``(*batch, prod(in_shape))``, giving ``(*batch, out)``."""

    def __init__(self, net: nn.Module, in_shape: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        self.net = net
        self.in_shape = in_shape
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x.reshape(-1, *self.in_shape))
        return y.reshape(*x.shape[:-1], self.out_dim)


def _last_kernel(shape: tuple[int, int]) -> tuple[int, int]:
    if shape not in ((28, 28), (28, 20)):
        raise ValueError(f"the conv architecture supports 28x28 or 28x20 images; got {shape}")
    return (7, 7) if shape == (28, 28) else (7, 5)


def mlp_encoder(input_dim: int, hidden_dim: int = 300) -> nn.Module:
    """Two gated dense layers of ``hidden_dim`` units (Tomczak & Welling 2018's MLP).

    Example:
        >>> mlp_encoder(784)(torch.zeros(2, 784)).shape
        torch.Size([2, 300])
    """
    return nn.Sequential(GatedDense(input_dim, hidden_dim), GatedDense(hidden_dim, hidden_dim))


def mlp_decoder(latent_dim: int, output_dim: int, hidden_dim: int = 300) -> nn.Module:
    """Two gated dense layers and a linear map to the Bernoulli logits.

    Example:
        >>> mlp_decoder(64, 784)(torch.zeros(5, 2, 64)).shape
        torch.Size([5, 2, 784])
    """
    return nn.Sequential(
        GatedDense(latent_dim, hidden_dim),
        GatedDense(hidden_dim, hidden_dim),
        nn.Linear(hidden_dim, output_dim),
    )


def conv_encoder(shape: tuple[int, int] = (28, 28)) -> nn.Module:
    """Gated-conv encoder of van den Berg et al. (2018) to a 256-dim ``h``.

    Example:
        >>> conv_encoder()(torch.zeros(2, 784)).shape
        torch.Size([2, 256])
    """
    net = nn.Sequential(
        GatedConv2d(1, 32, 5, 1, 2),
        GatedConv2d(32, 32, 5, 2, 2),
        GatedConv2d(32, 64, 5, 1, 2),
        GatedConv2d(64, 64, 5, 2, 2),
        GatedConv2d(64, 64, 5, 1, 2),
        GatedConv2d(64, 256, _last_kernel(shape), 1, 0),
    )
    return _Images(net, (1, *shape), 256)


def conv_decoder(latent_dim: int, shape: tuple[int, int] = (28, 28)) -> nn.Module:
    """Gated transposed-conv decoder of van den Berg et al. (2018) to Bernoulli logits.

    Example:
        >>> conv_decoder(64)(torch.zeros(3, 2, 64)).shape
        torch.Size([3, 2, 784])
    """
    net = nn.Sequential(
        GatedConvTranspose2d(latent_dim, 64, _last_kernel(shape), 1, 0),
        GatedConvTranspose2d(64, 64, 5, 1, 2),
        GatedConvTranspose2d(64, 32, 5, 2, 2, 1),
        GatedConvTranspose2d(32, 32, 5, 1, 2),
        GatedConvTranspose2d(32, 32, 5, 2, 2, 1),
        GatedConvTranspose2d(32, 32, 5, 1, 2),
        nn.Conv2d(32, 1, 1, 1, 0),
    )
    return _Images(net, (latent_dim, 1, 1), shape[0] * shape[1])


class VAE(nn.Module):
    r"""Bernoulli VAE with a flow posterior: :math:`p(z) = \mathcal N(0, I)`,
    :math:`p(x|z) = \mathrm{Bernoulli}(\mathrm{logits} = f(z))`, :math:`q(z|x)` a
    :class:`FlowEncoder`.

    ``model(x, beta)`` and ``guide(x, beta)`` are an ordinary Pyro pair for
    :class:`~pyro.infer.SVI`; ``beta`` scales the latent site (KL warm-up:
    :math:`\mathbb E_q[\log p(x|z)] - \beta\, \mathrm{KL}`), ``x`` has shape ``(N, H * W)``.

    Args:
        shape: Image shape ``(H, W)``.
        latent_dim: Size of ``z`` (64 in the Sylvester-flows paper).
        flow: A key of :data:`~pyroflows.transforms.CONDITIONAL_FLOWS` or ``"none"``.
        num_flows: Number of flow layers K.
        architecture: ``"mlp"`` (two gated dense layers of ``hidden_dim``) or ``"conv"``
            (the paper's gated convolutions; ``h`` has 256 units).
        hidden_dim: Width of the MLP.
        flow_kwargs: Extra keyword arguments for the flow constructor.

    Example:
        >>> vae = VAE((28, 28), latent_dim=8, flow="planar", num_flows=2, hidden_dim=16)
        >>> x = torch.bernoulli(torch.full((3, 784), 0.5))
        >>> loss = pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, x)
        >>> vae.sample(2).shape
        torch.Size([2, 784])
    """

    def __init__(
        self,
        shape: Sequence[int] = (28, 28),
        latent_dim: int = 64,
        flow: str = "none",
        num_flows: int = 4,
        architecture: str = "mlp",
        hidden_dim: int = 300,
        flow_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if len(shape) != 2:
            raise ValueError(f"shape must be (H, W); got {shape!r}")
        self.shape = (
            check_positive_int("shape[0]", shape[0]),
            check_positive_int("shape[1]", shape[1]),
        )
        self.input_dim = self.shape[0] * self.shape[1]
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        if architecture == "mlp":
            check_positive_int("hidden_dim", hidden_dim)
            net, h_dim = mlp_encoder(self.input_dim, hidden_dim), hidden_dim
            self.decoder = mlp_decoder(latent_dim, self.input_dim, hidden_dim)
        elif architecture == "conv":
            net, h_dim = conv_encoder(self.shape), 256
            self.decoder = conv_decoder(latent_dim, self.shape)
        else:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}; got {architecture!r}")
        self.architecture = architecture
        self.encoder = FlowEncoder(net, h_dim, latent_dim, flow, num_flows, flow_kwargs)
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    def prior(self) -> dist.Distribution:
        """The prior :math:`\\mathcal N(0, I)` on ``z``."""
        loc = self._zero.expand(self.latent_dim)
        return dist.Independent(dist.Normal(loc, 1.0, validate_args=False), 1)

    def likelihood(self, z: Tensor) -> dist.Distribution:
        """:math:`p(x|z)`, independent Bernoulli pixels with batch shape ``z.shape[:-1]``."""
        return dist.Independent(dist.Bernoulli(logits=self.decoder(z), validate_args=False), 1)

    def model(self, x: Tensor, beta: float = 1.0) -> None:
        """Pyro model :math:`p(x, z)`; the latent site ``"z"`` is scaled by ``beta``."""
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x: Tensor, beta: float = 1.0) -> Tensor:
        """Pyro guide :math:`q(z|x)` from the :class:`FlowEncoder`; returns ``z``."""
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):
                return pyro.sample("z", self.encoder(x))

    def elbo(self, x: Tensor, beta: float = 1.0) -> Tensor:
        r"""One-sample :math:`\sum_n \log p(x_n|z_n) + \beta[\log p(z_n) - \log q(z_n|x_n)]`.

        The value of :func:`pyroflows.infer.elbo` ``(self.model, self.guide, x, beta)`` (the
        same draw of :math:`z` for the same RNG state), computed directly, without Pyro's
        tracing: :class:`~pyroflows.infer.Trainer` uses it, which saves ~1 ms per CPU step.
        A subclass that overrides ``model`` or ``guide`` but not this method is trained with
        the traced ELBO of its own model and guide instead.
        """
        q = self.encoder(x)
        z = q.rsample()
        kl_term = self.prior().log_prob(z) - q.log_prob(z)
        return (self.likelihood(z).log_prob(x) + beta * kl_term).sum()

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Pixel probabilities of :math:`p(x|z)` at one :math:`z \\sim q(z|x)`."""
        return torch.sigmoid(self.decoder(self.encoder(x).sample()))

    @torch.no_grad()
    def sample(self, num_samples: int) -> Tensor:
        """Pixel probabilities of :math:`p(x|z)` at ``num_samples`` prior draws."""
        z = self.prior().sample((check_positive_int("num_samples", num_samples),))
        return torch.sigmoid(self.decoder(z))
