"""Shared machinery of the coupling flows (NICE, RealNVP, spline): conditioner and split."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor, nn

from pyroflows._utils import check_context, check_hidden_dims, check_positive_int
from pyroflows.transforms._base import FlowModule, ParamFlow
from pyroflows.transforms.made import MadeLayers, made_forward

# (x_b, raw (*batch, D_b, P)) -> (y_b, ladj (*batch,) or None), and its inverse
# (y_b, raw) -> (x_b, ladj of the forward map at x_b, or None)
Elementwise = Callable[[Tensor, Tensor], tuple[Tensor, Tensor | None]]
ElementwisePair = tuple[Elementwise, Elementwise]


class CouplingNet(nn.Module):
    """MLP (ReLU) from the conditioning half, and optionally a context, to raw parameters.

    The context enters the first layer through an unmasked linear map, computed once per
    ``weights(context)`` as a batched bias, so the layers run through :func:`made_forward`
    (no concatenation of ``x`` and the context, which may have different batch shapes).
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dims: Sequence[int], context_dim: int = 0
    ) -> None:
        super().__init__()
        dims = [in_dim, *hidden_dims, out_dim]
        self.weight = nn.ParameterList(
            nn.Parameter(torch.empty(o, i)) for i, o in zip(dims[:-1], dims[1:], strict=True)
        )
        self.bias = nn.ParameterList(nn.Parameter(torch.empty(o)) for o in dims[1:])
        self.context = nn.Parameter(torch.empty(dims[1], context_dim)) if context_dim else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default uniform init, the last layer shrunk by 1e-2 and its bias zeroed,
        so the raw parameters start near 0 (each family's identity)."""
        n = len(self.weight)
        for k, (w, b) in enumerate(zip(self.weight, self.bias, strict=True)):
            fan_in = w.shape[1] + (
                self.context.shape[1] if k == 0 and self.context is not None else 0
            )
            bound = 1 / math.sqrt(max(fan_in, 1))
            with torch.no_grad():
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)
                if k == 0 and self.context is not None:
                    self.context.uniform_(-bound, bound)
                if k == n - 1:
                    w.mul_(1e-2)
                    b.zero_()
                    if k == 0 and self.context is not None:
                        self.context.mul_(1e-2)

    def weights(self, context: Tensor | None = None) -> MadeLayers:
        """``(weight, bias)`` per layer; the first bias is ``(*batch, H)`` with a context."""
        layers = list(zip(self.weight, self.bias, strict=True))
        if context is not None and self.context is not None:
            w0, b0 = layers[0]
            layers[0] = (w0, b0 + context @ self.context.T)
        return tuple(layers)


def coupling_forward(
    x: Tensor, layers: MadeLayers, split: int, pair: ElementwisePair
) -> tuple[Tensor, Tensor]:
    """y_a = x_a, y_b = f(x_b; θ(x_a)) with a = ``[:split]``; log|det J| = Σ log f'."""
    xa, xb = x[..., :split], x[..., split:]
    raw = made_forward(xa, layers).unflatten(-1, (xb.shape[-1], -1))  # (*batch, D_b, P)
    yb, ladj = pair[0](xb, raw)
    if ladj is None:
        ladj = yb.new_zeros(yb.shape[:-1])
    return torch.cat([xa.expand(*yb.shape[:-1], split), yb], -1), ladj


def coupling_inverse(
    y: Tensor, layers: MadeLayers, split: int, pair: ElementwisePair
) -> tuple[Tensor, Tensor]:
    """x_a = y_a, x_b = f⁻¹(y_b; θ(y_a)): one conditioner pass, like the forward; returns
    ``(x, log|det ∂y/∂x|)`` (θ is the same in both directions, so the log-det comes free)."""
    ya, yb = y[..., :split], y[..., split:]
    raw = made_forward(ya, layers).unflatten(-1, (yb.shape[-1], -1))
    xb, ladj = pair[1](yb, raw)
    if ladj is None:
        ladj = xb.new_zeros(xb.shape[:-1])
    return torch.cat([ya.expand(*xb.shape[:-1], split), xb], -1), ladj


class CouplingFlow(FlowModule):
    """Base of the coupling layers: identity on the first ``D // 2`` coordinates, an
    elementwise bijection of the rest with parameters from an MLP of the first part.

    Subclasses set ``params_per_dim`` and return the elementwise pair from ``elementwise``.
    ``coupling = True``: stacks reverse the coordinates between layers (so the halves
    alternate and every coordinate is transformed), see ``needs_permutation``.
    """

    coupling = True
    params_per_dim: int
    forward_fn = staticmethod(coupling_forward)
    inverse_fn = staticmethod(coupling_inverse)
    inverse_ladj = True

    def __init__(self, input_dim: int, hidden_dims: Sequence[int] | None = None) -> None:
        super().__init__(cache_size=1)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.split = input_dim // 2
        hidden = check_hidden_dims(hidden_dims, [10 * input_dim])
        out = (input_dim - self.split) * self.params_per_dim
        self.net = CouplingNet(self.split, out, hidden)

    def reset_parameters(self) -> None:
        """Near-identity start: the conditioner's last layer is scaled down, its bias 0."""
        self.net.reset_parameters()

    def elementwise(self) -> ElementwisePair:
        raise NotImplementedError

    def params(self) -> tuple:
        return self.net.weights(), self.split, self.elementwise()


class ConditionalCouplingFlow(ConditionalTransformModule):
    """Conditional coupling: the conditioner also takes a context vector (first layer)."""

    coupling = True
    params_per_dim: int

    def __init__(
        self, input_dim: int, context_dim: int, hidden_dims: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.context_dim = check_positive_int("context_dim", context_dim)
        self.split = input_dim // 2
        hidden = check_hidden_dims(hidden_dims, [10 * input_dim])
        out = (input_dim - self.split) * self.params_per_dim
        self.net = CouplingNet(self.split, out, hidden, context_dim)

    def reset_parameters(self) -> None:
        """Near-identity start, as :meth:`CouplingFlow.reset_parameters`."""
        self.net.reset_parameters()

    def elementwise(self) -> ElementwisePair:
        raise NotImplementedError

    def condition(self, context: Tensor) -> ParamFlow:
        check_context(context, self.context_dim)
        params = (self.net.weights(context), self.split, self.elementwise())
        name = type(self).__name__
        return ParamFlow(
            coupling_forward, coupling_inverse, params, name, self.input_dim, inverse_ladj=True
        )
