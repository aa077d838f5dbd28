r"""An amortized flow autoguide for hierarchical models with local latent variables.

:class:`AutoAmortizedFlowGuide` splits a model's latent sites at one plate (the *local
plate*, typically the subsampled plate of groups or data points): the sites outside it get
a global :class:`~pyroflows.AutoFlowGuide`, and the sites inside it get an amortized
conditional flow :math:`q(z_i \mid x_i, \theta)` shared by all plate members, whose context is
an encoding of member :math:`i`'s data and the sampled global latents :math:`\theta`. The
number of guide parameters does not depend on the plate size, so the guide trains on
mini-batches of ``pyro.plate(name, N, subsample_size=B)`` in time independent of N.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import Transform, biject_to

from pyroflows._utils import check_positive_int
from pyroflows.guides import AutoFlowGuide, _check_init_scale
from pyroflows.transforms import CONDITIONAL_FLOWS
from pyroflows.vae import FlowEncoder

__all__ = ["AutoAmortizedFlowGuide"]

_MIN_SCALE = 1e-4


class _Found(Exception):
    """Raised by :class:`_Discover` once it has seen everything it looks for."""


class _Discover(Messenger):
    """Record a plate's subsample indices and the observed values of some sites.

    ``indices`` (optional) forces the plate's subsample. Raises :class:`_Found` as soon as
    the indices and every site in ``observed`` have been seen, so the rest of the model
    does not run.
    """

    def __init__(self, plate: str, observed: Sequence[str], indices: Tensor | None) -> None:
        super().__init__()
        self.plate, self.indices = plate, indices
        self.missing = {plate, *observed}
        self.sites: dict[str, Message] = {}

    def _pyro_sample(self, msg: Message) -> None:
        if msg["name"] != self.plate or not site_is_subsample(msg) or msg["value"] is not None:
            return
        fn = msg["fn"]
        if self.indices is not None:
            msg["value"] = self.indices
        elif fn.subsample_size is not None and fn.subsample_size < fn.size:
            msg["value"] = _random_subset(fn.size, fn.subsample_size, fn.device)

    def _pyro_post_sample(self, msg: Message) -> None:
        name = msg["name"]
        if name in self.missing and (name != self.plate or site_is_subsample(msg)):
            self.sites[name] = msg.copy()
            self.missing.discard(name)
            if not self.missing:
                raise _Found


def _random_subset(size: int, subsample_size: int, device: torch.device | str) -> Tensor:
    """A uniformly random ``subsample_size``-subset of ``range(size)`` in O(subsample_size).

    The distribution of Pyro's ``torch.randperm(size)[:subsample_size]``, without its O(size)
    cost per step: the distinct values of a few more than ``subsample_size`` uniform draws are
    a uniformly random subset (of random size, by symmetry), and a random ``subsample_size``
    of them is a uniformly random ``subsample_size``-subset. Small plates use ``randperm``.
    """
    if size <= 32 * subsample_size:
        return torch.randperm(size, device=device)[:subsample_size]
    extra = 16 + 2 * subsample_size**2 // size  # > twice the expected number of collisions
    while True:
        distinct = torch.randint(size, (subsample_size + extra,), device=device).unique()
        if len(distinct) >= subsample_size:
            pick = torch.randperm(len(distinct), device=device)[:subsample_size]
            return distinct[pick]


class _SkipMLP(nn.Module):
    """``h = [x - s, mlp(x - s)]``: an MLP with its input passed through, so linear maps of
    ``x`` are exactly representable by the linear heads of :class:`~pyroflows.vae.FlowEncoder`.

    The shifts ``s`` (buffers, zero until :meth:`AutoAmortizedFlowGuide.precondition_globals`
    centres the globals in the context) are separate for the MLP's input (``shift``) and the
    passed-through copy (``skip_shift``), which the layers reading ``h`` compensate.
    """

    def __init__(self, in_dim: int, hidden_dims: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim, *hidden_dims]
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.ELU()]
        self.mlp = nn.Sequential(*layers)  # empty for hidden_dims=(): h = x - s
        self.in_dim = in_dim
        self.out_dim = in_dim + (hidden_dims[-1] if hidden_dims else 0)
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("skip_shift", torch.zeros(in_dim))

    def forward(self, x: Tensor) -> Tensor:
        if not len(self.mlp):
            return x - self.skip_shift  # (*batch, in_dim)
        hidden = self.mlp(x - self.shift)
        return torch.cat([x - self.skip_shift, hidden], dim=-1)  # (*batch, out_dim)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        for name in ("shift", "skip_shift"):  # a state saved before the shifts existed
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args)


@torch.no_grad()
def _center_context(local: nn.Module, shift: Tensor, probe: Tensor) -> bool:
    """Set the context shift of ``local``'s :class:`_SkipMLP` to ``shift`` (in_dim,),
    re-expressing the layers that read the shifted values so that ``local``'s function is
    unchanged: the MLP's first layer, and every ``nn.Linear`` outside the net whose input is
    ``h`` (the heads, the flows' context layers). Checked on ``probe`` contexts; if a layer
    reading ``h`` is not such a linear map, only the MLP's input is centred. Returns whether
    the passed-through copy was centred too."""
    net = local.net
    before = _local_outputs(local, probe)
    if len(net.mlp):
        first = net.mlp[0]
        first.bias += first.weight @ (shift - net.shift)
        net.shift.copy_(shift)
    readers = [
        m for name, m in local.named_modules()
        if isinstance(m, nn.Linear) and not name.startswith("net.")
        and m.in_features == net.out_dim and m.bias is not None
    ]  # fmt: skip
    delta = shift - net.skip_shift
    for m in readers:
        m.bias += m.weight[:, : net.in_dim] @ delta
    net.skip_shift.copy_(shift)
    if _same(before, _local_outputs(local, probe)):
        return True
    for m in readers:  # a reader that is not one linear map of h: undo the copy's shift
        m.bias -= m.weight[:, : net.in_dim] @ delta
    net.skip_shift.sub_(delta)
    return False


def _local_outputs(local: nn.Module, probe: Tensor) -> list[Tensor]:
    """The local guide's base location and scale and the log-density of fixed points."""
    q = local(probe)
    z = (
        torch.linspace(-2.0, 2.0, q.event_shape[-1])
        .to(probe)
        .expand(q.batch_shape + q.event_shape)
    )
    return [q.base_dist.base_dist.loc, q.base_dist.base_dist.scale, q.log_prob(z)]


def _same(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-4) for x, y in zip(a, b, strict=True))


def _to_members(value: Tensor, dim: int) -> Tensor:
    """Move the plate dimension ``dim`` (negative) first and flatten the rest: ``(B, d)``."""
    moved = value.movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1)


def _from_members(flat: Tensor, rest: torch.Size, dim: int) -> Tensor:
    """Inverse of :func:`_to_members`: ``(*batch, B, d)`` to values with the plate at ``dim``."""
    value = flat.reshape(flat.shape[:-1] + rest)  # (*batch, B, *rest)
    return value.movedim(-len(rest) - 1, dim)


def _plate_frame(site: Message, plate: str) -> Any:
    return next((f for f in site["cond_indep_stack"] if f.name == plate), None)


def _subsampled(frame: Any) -> bool:
    return frame.vectorized and frame.full_size not in (None, frame.size)


class _LocalSite:
    """Layout of one local latent site: its transform and where its plate dimension is."""

    def __init__(self, name: str, site: Message, frame: Any) -> None:
        self.name, self.site = name, site
        self.transform: Transform = biject_to(site["fn"].support)
        self.event_dim = site["fn"].event_dim
        unconstrained = self.transform.inv(site["value"].detach())
        self.dim = frame.dim - self.transform.domain.event_dim  # plate dim of the value
        moved = unconstrained.movedim(self.dim, 0)
        self.rest, self.size = moved.shape[1:], math.prod(moved.shape[1:])
        self.init = moved.reshape(moved.shape[0], -1).mean(0)  # (size,)

    def delta(self, flat: Tensor) -> dist.Delta:
        """The site's value from its slice ``(B, size)`` of the packed local latent, with the
        log-density correction :math:`-\\log|\\det J|` of ``biject_to`` (as AutoContinuous)."""
        unconstrained = _from_members(flat, self.rest, self.dim)
        value = self.transform(unconstrained)
        if poutine.get_mask() is False:
            return dist.Delta(value, log_density=0.0, event_dim=self.event_dim)
        ladj = self.transform.inv.log_abs_det_jacobian(value, unconstrained)
        ladj = sum_rightmost(ladj, ladj.dim() - value.dim() + self.event_dim)
        return dist.Delta(value, log_density=ladj, event_dim=self.event_dim)


def _check_encoder(encoder: object) -> None:
    if encoder is not None and not callable(encoder):
        raise TypeError(
            "encoder must be None (an MLP on the plate's observed data) or a callable "
            f"encoder(indices, *args, **kwargs) -> (B, C) tensor; got {type(encoder).__name__}"
        )


def _check_hidden_dims(hidden_dims: object) -> tuple[int, ...]:
    if isinstance(hidden_dims, (int, str)) or not isinstance(hidden_dims, Sequence):
        raise TypeError(f"hidden_dims must be a sequence of positive ints; got {hidden_dims!r}")
    for h in hidden_dims:
        check_positive_int("every entry of hidden_dims", h)
    return tuple(hidden_dims)


def _softplus_inv(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class AutoAmortizedFlowGuide(AutoGuide):
    r"""Global flow guide plus an amortized conditional flow for the sites of one plate.

    The latent sites outside the plate ``local_plate`` (the *globals* :math:`\theta`) get an
    :class:`~pyroflows.AutoFlowGuide` over the model blocked to them. The sites inside it (the
    *locals* :math:`z_i` of plate member :math:`i`, mapped to unconstrained space with
    ``biject_to`` and flattened into one vector per member) get

    .. math::
        q(z_i \mid x_i, \theta) = T_K \circ \dots \circ T_1 \,\#\,
        \mathcal N\big(\mu(h_i), \sigma(h_i)^2\big), \qquad
        h_i = [c_i, \mathrm{MLP}(c_i)], \quad c_i = [e(x_i), \theta],

    a :class:`~pyroflows.vae.FlowEncoder` whose K conditional flows
    (:data:`pyroflows.transforms.CONDITIONAL_FLOWS`) and Gaussian heads are functions of the
    context :math:`h_i`. By default :math:`e(x_i)` is member :math:`i`'s slice of every
    observed site in the plate, flattened and standardised (with the mean and sd of the first
    call's slice); ``encoder`` replaces it by any function of the subsample indices and the
    model's arguments. With ``condition_on_globals`` the context also holds the sampled
    globals (unconstrained), so the guide is the joint :math:`q(\theta) \prod_i q(z_i \mid
    x_i, \theta)` and can represent the posterior dependence of the locals on the globals.
    The guide's size does not depend on the plate size N.

    Subsampling works as in the model: each call runs the model (blocked, with prior draws,
    stopping once the plate's observed sites are seen) to learn which members the plate
    ``pyro.plate(name, N, subsample_size=B)`` or ``pyro.plate(name, N, subsample=idx)``
    selects, and enters a plate with those indices, so the model replays them and the plate's
    ``N / B`` scaling gives an unbiased ELBO. A random subsample is drawn in O(B) time (a
    uniformly random B-subset, as Pyro's ``randperm(N)[:B]`` but without its O(N) cost), so
    a step costs the same for any N. Works with :class:`~pyro.infer.SVI`,
    :class:`~pyro.infer.Predictive` and ``state_dict``; :meth:`median` and :meth:`quantiles`
    return the global sites.

    Note:
        Parameters are created on the first call. One subsampled plate is supported (other
        plates, nested or not, may hold local sites only if they are not subsampled) and the
        local sites must be continuous. Vectorized particles work
        (``Trace_ELBO(vectorize_particles=True)``, :class:`pyroflows.SAGA_ELBO`): each
        particle's globals condition its own locals. :class:`pyroflows.VI` fits this guide
        (SAGA steps under subsampling, a stopping rule on common random numbers, the joint
        PSIS k-hat over all N members; see :mod:`pyroflows._vi_amortized`).

    Args:
        model: A Pyro model with continuous latent sites.
        local_plate: Name of the plate whose sites are amortized. ``None``: the only
            subsampled plate that holds latent sites (or, without subsampling, the only
            plate that does).
        encoder: ``None`` for the default (the flattened observed data of each member), or a
            callable ``encoder(indices, *args, **kwargs)`` returning a ``(B, C)`` tensor for
            the ``B`` subsample ``indices``. An ``nn.Module`` encoder is trained with the
            guide; a plain function must register its own parameters (``pyro.module``).
        flow: Flow of the global :class:`~pyroflows.AutoFlowGuide`.
        num_flows: Number of flow layers of the global guide.
        base: ``"diagonal"`` or ``"full"`` base of the global guide.
        local_flow: A key of :data:`pyroflows.transforms.CONDITIONAL_FLOWS`, or ``"none"``
            for a Gaussian :math:`q(z_i \mid x_i, \theta)`.
        num_local_flows: Number of conditional flow layers K.
        hidden_dims: Widths of the context MLP's hidden layers (ELU).
        condition_on_globals: Put the sampled global latents into the context.
        init_loc_fn: Per-site initialisation (Pyro's ``init_to_*``); the local base mean
            starts at the members' average initial value.
        init_scale: Initial standard deviation of both guides in unconstrained space.

    Example:
        >>> import pyro, pyro.distributions as dist
        >>> pyro.clear_param_store()
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        ...     with pyro.plate("groups", len(y), subsample_size=4) as idx:
        ...         theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        ...         pyro.sample("y", dist.Normal(theta, 1.0), obs=y[idx])
        >>> guide = AutoAmortizedFlowGuide(model, num_flows=1, num_local_flows=1)
        >>> sample = guide(torch.randn(100))
        >>> sample["mu"].shape, sample["theta"].shape
        (torch.Size([]), torch.Size([4]))
        >>> loss = pyro.infer.Trace_ELBO().loss(model, guide, torch.randn(100))

    References:
        | Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
        | https://arxiv.org/abs/1505.05770
        | Amortized Variational Inference for Simple Hierarchical Models
        | (Agrawal & Domke, 2021) https://arxiv.org/abs/2111.03144
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        local_plate: str | None = None,
        encoder: Callable[..., Tensor] | None = None,
        flow: str | Callable[..., Transform] = "iaf",
        num_flows: int = 4,
        base: str = "diagonal",
        local_flow: str = "planar",
        num_local_flows: int = 4,
        hidden_dims: Sequence[int] = (64, 64),
        condition_on_globals: bool = True,
        init_loc_fn: Callable[[dict], Tensor] = init_to_median,
        init_scale: float = 0.1,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable; got {type(model).__name__}")
        if local_plate is not None and not isinstance(local_plate, str):
            raise TypeError(f"local_plate must be a plate name (str) or None; got {local_plate!r}")
        _check_encoder(encoder)
        if local_flow != "none" and local_flow not in CONDITIONAL_FLOWS:
            choices = ["none", *sorted(CONDITIONAL_FLOWS)]
            raise ValueError(f"local_flow must be one of {choices}; got {local_flow!r}")
        if not callable(init_loc_fn):
            raise TypeError(f"init_loc_fn must be callable; got {init_loc_fn!r}")
        self._global_kwargs = dict(
            flow=flow, num_flows=num_flows, base=base, init_loc_fn=init_loc_fn,
            init_scale=init_scale,
        )  # fmt: skip
        AutoFlowGuide(lambda: None, **self._global_kwargs)  # validates them now
        self.local_plate = local_plate
        self.local_flow = local_flow
        self.num_local_flows = check_positive_int("num_local_flows", num_local_flows)
        self.hidden_dims = _check_hidden_dims(hidden_dims)
        self.condition_on_globals = bool(condition_on_globals)
        self.init_loc_fn = init_loc_fn
        self._init_scale = _check_init_scale(init_scale)
        super().__init__(model)
        self.__dict__["_forced_members"] = None  # set by _use_members(); not state
        self.__dict__["_context_centered"] = False  # set by precondition_globals()
        self._encoder = encoder
        if isinstance(encoder, nn.Module):
            self.encoder = encoder  # registered: trained and saved with the guide

    # ------------------------------------------------------------------ setup
    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._setup_prototype(*args, **kwargs)
            model = InitMessenger(self.init_loc_fn)(self.model)
            trace = poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)
            self._split_sites(trace)
            self._build_global_guide(*args, **kwargs)
            self._build_local(trace, args, kwargs)
        except Exception:
            self.prototype_trace = None  # a later call runs the whole setup again
            raise

    def _split_sites(self, trace: poutine.Trace) -> None:
        """Find the local plate; sort latent sites into globals and locals (with checks)."""
        plate = self._choose_plate(trace)
        self._globals, self._locals, self._observed = [], [], []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            frame = _plate_frame(site, plate)
            if site["is_observed"]:
                if frame is not None:
                    self._observed.append(name)
                continue
            self._check_site(name, site, plate, frame)
            if frame is None:
                self._globals.append(name)
            else:
                self._locals.append(_LocalSite(name, site, frame))
        if not self._locals:
            raise ValueError(
                f"local_plate {plate!r} holds no latent sample site: nothing to amortize; "
                "use pyroflows.AutoFlowGuide for a model without local latent variables"
            )
        if not self._observed and self._encoder is None:
            raise ValueError(
                f"local_plate {plate!r} holds no observed site, so the default encoder has no "
                "data to encode; pass encoder=lambda indices, *args, **kwargs: <(B, C) tensor "
                "of each member's data>"
            )
        self.local_plate = plate
        self._frame = _plate_frame(trace.nodes[self._locals[0].name], plate)

    def _choose_plate(self, trace: poutine.Trace) -> str:
        latent = [s for _, s in trace.iter_stochastic_nodes()]
        frames = {f.name: f for s in latent for f in s["cond_indep_stack"] if f.vectorized}
        if self.local_plate is not None:
            if self.local_plate not in frames:
                raise ValueError(
                    f"local_plate {self.local_plate!r} is not a plate holding latent sites "
                    f"of the model; plates with latent sites: {sorted(frames)}"
                )
            return self.local_plate
        candidates = sorted(n for n, f in frames.items() if _subsampled(f)) or sorted(frames)
        if not candidates:
            raise ValueError(
                "the model has no vectorized pyro.plate holding latent sites, so no local "
                "latent variables to amortize; use pyroflows.AutoFlowGuide"
            )
        if len(candidates) != 1:
            raise ValueError(
                f"cannot tell which plate is local among {candidates}; pass local_plate= "
                "with the name of the plate whose latent sites are to be amortized"
            )
        return candidates[0]

    def _check_site(self, name: str, site: Message, plate: str, frame: Any) -> None:
        if site["fn"].support.is_discrete:
            where = "local" if frame is not None else "global"
            raise ValueError(
                f"AutoAmortizedFlowGuide cannot handle the discrete {where} latent site "
                f"{name!r} ({type(site['fn']).__name__}); enumerate it out of the model "
                "(config_enumerate with TraceEnum_ELBO) or hide it with poutine.block and "
                "give it its own guide in an AutoGuideList"
            )
        for other in site["cond_indep_stack"]:
            if other.name != plate and _subsampled(other):
                raise ValueError(
                    f"latent site {name!r} is in the subsampled plate {other.name!r} (size "
                    f"{other.size} of {other.full_size}), but only local_plate {plate!r} may "
                    "be subsampled: drop subsample_size from the other plate, or choose it as "
                    "local_plate if it is the one to amortize"
                )

    def _build_global_guide(self, *args: Any, **kwargs: Any) -> None:
        self.global_guide = None
        if self._globals:
            blocked = poutine.block(self.model, expose=list(self._globals))
            self.global_guide = AutoFlowGuide(blocked, **self._global_kwargs)
            self.global_guide._setup_prototype(*args, **kwargs)

    def _build_local(self, trace: poutine.Trace, args: tuple, kwargs: dict) -> None:
        """Context standardisation, the conditional flow and its initialisation."""
        value = self._locals[0].site["value"]
        indices = trace.nodes[self.local_plate]["value"]
        features = self._features(
            {n: trace.nodes[n] for n in self._observed}, indices, args, kwargs
        )
        features = features.to(value)
        mean = features.mean(0)
        sd = features.std(0, unbiased=False) if len(features) > 1 else torch.ones_like(mean)
        self.register_buffer("feature_loc", mean)
        self.register_buffer("feature_scale", torch.where(sd > 0, sd, torch.ones_like(sd)))
        use_globals = self.condition_on_globals and self.global_guide is not None
        num_globals = self.global_guide.latent_dim if use_globals else 0
        net = _SkipMLP(features.shape[-1] + num_globals, self.hidden_dims)
        latent_dim = sum(s.size for s in self._locals)
        local = FlowEncoder(
            net, net.out_dim, latent_dim, self.local_flow, self.num_local_flows, None, _MIN_SCALE
        )
        with torch.no_grad():
            local.loc.weight.mul_(1e-2)
            local.loc.bias.copy_(torch.cat([s.init for s in self._locals]))
            local.scale.weight.mul_(1e-2)
            local.scale.bias.fill_(_softplus_inv(self._init_scale - _MIN_SCALE))
        self.local = local.to(device=value.device, dtype=value.dtype)

    def _check_prototype(self, part_trace: poutine.Trace) -> None:
        """Called by the global guide's setup (Pyro's master-guide protocol)."""
        for name, _ in part_trace.iter_stochastic_nodes():
            if name not in self.prototype_trace.nodes:
                raise RuntimeError(f"global guide site {name!r} is not a site of the model")

    # ------------------------------------------------------------------ per call
    def _features(
        self, observed: dict[str, Message], indices: Tensor, args: tuple, kwargs: dict
    ) -> Tensor:
        """Each member's encoder input ``(B, C)``: the user's encoder, else its observed data."""
        if self._encoder is not None:
            out = self._encoder(indices, *args, **kwargs)
            if not isinstance(out, Tensor) or out.dim() != 2 or len(out) != len(indices):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"encoder(indices, *args, **kwargs) must return a ({len(indices)}, C) "
                    f"tensor for {len(indices)} indices; got {shape}"
                )
            return out
        parts = []
        for name in self._observed:
            site = observed[name]
            fn, frame = site["fn"], _plate_frame(site, self.local_plate)
            value = torch.as_tensor(site["value"])
            value = value.expand(torch.broadcast_shapes(value.shape, fn.shape()))
            parts.append(_to_members(value, frame.dim - fn.event_dim))
        dtype = (
            self.feature_loc.dtype if hasattr(self, "feature_loc") else torch.get_default_dtype()
        )
        return torch.cat([p.to(dtype) for p in parts], dim=-1)

    def _discover(
        self, indices: Tensor | None, args: tuple, kwargs: dict
    ) -> tuple[Tensor, Tensor]:
        """Run the model (blocked) to the plate's observed sites: indices and features."""
        observed = [] if self._encoder is not None else self._observed
        found = _Discover(self.local_plate, observed, indices)
        with poutine.block(), pyro.validation_enabled(False), torch.no_grad():
            try:
                found(self.model)(*args, **kwargs)
            except _Found:
                pass
        if found.missing:
            raise RuntimeError(
                f"the model did not reach {sorted(found.missing)} when called by the guide; "
                "AutoAmortizedFlowGuide needs the same plate and observed sites on every call"
            )
        indices = found.sites.pop(self.local_plate)["value"]
        return indices, self._features(found.sites, indices, args, kwargs)

    def _make_plates(self, indices: Tensor) -> dict[str, pyro.plate]:
        plates = {}
        for name, frame in sorted(self._prototype_frames.items()):
            if name == self.local_plate:
                plates[name] = pyro.plate(name, frame.full_size, dim=frame.dim, subsample=indices)
            else:
                full_size = frame.full_size or frame.size
                plates[name] = pyro.plate(
                    name, full_size, dim=frame.dim, subsample_size=frame.size
                )
        return plates

    def _context(self, features: Tensor, globals_: dict[str, Tensor]) -> Tensor:
        """``(*particles, B, C [+ G])``: standardised features and, if asked, the unconstrained
        globals of each particle.

        Under ``vectorize_particles`` the global values carry the particle batch shape
        ``(K, 1, ..., 1)`` (``max_plate_nesting + 1`` dims, the plates' dims 1); the dims from
        the local plate's on are dropped, so the members sit in the plate's dim of each site.
        """
        context = (features.to(self.feature_loc) - self.feature_loc) / self.feature_scale
        use_globals = self.condition_on_globals and self.global_guide is not None
        if not use_globals and not globals_:
            return context
        parts, lead = [], None
        for name, site in self.global_guide.prototype_trace.iter_stochastic_nodes():
            transform = biject_to(site["fn"].support)
            value = transform.inv(globals_[name])
            site_dim = transform.inv(site["value"]).dim()
            lead = value.shape[: value.dim() - site_dim]  # the particles' batch shape
            parts.append(value.reshape(lead + (-1,)))
        keep = max(0, len(lead) + self._frame.dim)
        if any(size != 1 for size in lead[keep:]):
            raise ValueError(
                f"the global sites' batch shape {tuple(lead)} is not a particle shape "
                f"(K, 1, ..., 1) outside the plate {self.local_plate!r}"
            )
        extra = lead[:keep]
        context = context.expand(extra + context.shape)
        if not use_globals:
            return context
        theta = torch.cat(parts, dim=-1).reshape(extra + (1, -1))
        return torch.cat([context, theta.expand(extra + (len(features), -1))], dim=-1)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample the global sites, then the local sites of the model's current subsample.

        Returns:
            A dict mapping each latent site name to its sampled (constrained) value.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        indices, features = self._discover(self._forced_members, args, kwargs)
        self.plates = self._make_plates(indices)
        replayed = self.plates[self.local_plate].indices  # differs under an outer replay
        if replayed is not indices and not torch.equal(replayed, indices):
            indices, features = self._discover(replayed, args, kwargs)
        result = {} if self.global_guide is None else self.global_guide(*args, **kwargs)
        posterior = self.local(self._context(features, result))  # batch (*K, B), event (D,)
        latent = posterior.rsample()  # (*K, B, D)
        result.update(self._sample_locals(latent, posterior.log_prob(latent)))
        return result

    def _sample_locals(self, latent: Tensor, log_q: Tensor) -> dict[str, Tensor]:
        """Record the packed local latent (auxiliary, scored by ``log_q``) and each site."""
        ones = (1,) * (-self._frame.dim - 1)  # put the members at the plate's dim
        aux = dist.Delta(
            latent.reshape(latent.shape[:-1] + ones + latent.shape[-1:]),
            log_density=log_q.reshape(log_q.shape + ones),
            event_dim=1,
        )
        with self.plates[self.local_plate]:
            pyro.sample(f"_{self._pyro_name}_local_latent", aux, infer={"is_auxiliary": True})
        result, pos = {}, 0
        for local in self._locals:
            with ExitStack() as stack:
                for frame in local.site["cond_indep_stack"]:
                    stack.enter_context(self.plates[frame.name])
                delta = local.delta(latent[..., pos : pos + local.size])
                result[local.name] = pyro.sample(local.name, delta)
            pos += local.size
        return result

    @contextlib.contextmanager
    def _use_members(self, indices: Tensor | None) -> Iterator[None]:
        """Within the block, every call of the guide (and so of the model replayed against
        it) runs the plate's members ``indices`` instead of the plate's own subsample
        (``None``: the plate's choice). A plate with a fixed ``subsample_size`` accepts only
        that many members."""
        old = self._forced_members
        self.__dict__["_forced_members"] = indices
        try:
            yield
        finally:
            self.__dict__["_forced_members"] = old

    # ------------------------------------------------------------------ summaries
    def _ensure_prototype(self, *args: Any, **kwargs: Any) -> None:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)

    @torch.no_grad()
    def sample_posterior(
        self, *args: Any, num_samples: int = 1000, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Draw ``num_samples`` joint samples of the globals and of the current subsample's
        locals (all members when the plate is not subsampled), vectorized over samples.

        Returns:
            A dict mapping each latent site name to a tensor ``(num_samples, *site_shape)``,
            local sites with the subsample's members in the plate dimension.
        """
        check_positive_int("num_samples", num_samples)
        self._ensure_prototype(*args, **kwargs)
        _, features = self._discover(self._forced_members, args, kwargs)
        out: dict[str, Tensor] = {}
        theta = None
        if self.global_guide is not None:
            theta = self.global_guide.get_posterior().sample((num_samples,))  # (S, G)
            out.update(self.global_guide._constrain(theta))
        out.update(self._draw_locals(features, theta, num_samples))
        return out

    def _draw_locals(
        self, features: Tensor, theta: Tensor | None, num_samples: int
    ) -> dict[str, Tensor]:
        """``num_samples`` draws of the local sites of the members with ``features`` (B, C),
        given draws ``theta`` (S, G) of the unconstrained globals."""
        context = (features.to(self.feature_loc) - self.feature_loc) / self.feature_scale
        context = context.expand(num_samples, -1, -1)  # (S, B, C)
        if theta is not None and self.condition_on_globals:
            theta = theta[:, None, :].expand(-1, context.shape[1], -1)
            context = torch.cat([context, theta], dim=-1)
        latent = self.local(context).sample()  # (S, B, D)
        out, pos = {}, 0
        for local in self._locals:
            value = _from_members(latent[..., pos : pos + local.size], local.rest, local.dim)
            out[local.name] = local.transform(value)
            pos += local.size
        return out

    @torch.no_grad()
    def precondition_globals(self, num_samples: int = 4000) -> None:
        r"""Restart the global guide as the Gaussian with its current moments, in whitened
        coordinates.

        Sets :meth:`pyroflows.AutoFlowGuide.precondition` to the mean :math:`c` and the
        Cholesky factor :math:`L_0` of the covariance of ``num_samples`` draws of the global
        guide (unconstrained) and resets its flows to the identity, so the guide becomes
        :math:`N(c, L_0 L_0^\top)` and its learnable location and scale move in units of the
        current posterior scale. With many groups the globals' posterior sd is tiny (here
        ``O(1/sqrt(N))``) while an optimizer's steps are absolute, so a fit that calls this
        after a first phase (then continues with a fresh optimizer) resolves the globals'
        scale far better; see ``examples/amortized_hierarchical.py``.

        With ``condition_on_globals`` the globals in the local guide's context are centred at
        the same mean :math:`c` (the layers that read them re-expressed, so the local guide's
        function does not change). Without it, a weight on a global is nearly collinear with
        its layer's bias (the global barely moves about its mean, by one posterior sd), and
        the local guide learns how :math:`z_i` depends on the globals very slowly; at
        N = 100,000 that dependence came out at a third of the exact one and mu's sd at
        0.77-0.92 of the exact; with the centring, 0.955-1.011
        (``benchmarks/results/amortized_variance.md``).

        Note:
            Preconditioning fixes the scale of the steps, not the subsampling noise: with B of
            the plate's N members per step, the gradient of the globals carries about
            :math:`\sqrt{N / B}` posterior sds of noise (measured: 20-22 at N = 100,000,
            B = 256, against about 1 for the full batch), so with ``Trace_ELBO`` the
            globals' error after T steps falls like :math:`2.3 \sqrt{N / (B T)}` posterior
            sds (``benchmarks/results/amortized.md``, section 3). Most of that noise is the
            members' spread: :class:`pyroflows.SAGA_ELBO` (control variates over the members)
            with 16 vectorized particles brings the 6,000-step error at N = 100,000 from about
            0.5 to 0.02 posterior sd (``benchmarks/results/amortized_variance.md``).
        """
        check_positive_int("num_samples", num_samples)
        if self.prototype_trace is None:
            raise RuntimeError("call the guide once (or train it) before precondition_globals()")
        if self.global_guide is None:
            return
        z = self.global_guide.get_posterior().sample((num_samples,))  # (S, G)
        cov = torch.atleast_2d(torch.cov(z.T))
        jitter = 1e-10 * cov.diagonal().mean() * torch.eye(len(cov)).to(cov)
        for layer in self.global_guide.flows:  # the layers only: their own near-identity init
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        self.global_guide.precondition(z.mean(0), torch.linalg.cholesky(cov + jitter))
        if self.condition_on_globals:
            self._center_globals(z)

    def _center_globals(self, z: Tensor) -> None:
        """Centre the globals in the local guide's context at the mean of draws ``z`` (S, G),
        without changing the local guide's function (see :meth:`precondition_globals`)."""
        net = self.local.net
        num_features = net.in_dim - z.shape[-1]
        shift = torch.cat([torch.zeros(num_features).to(z), z.mean(0)])
        features = torch.randn(len(z), num_features).to(z)  # standardised, like the data's
        self.__dict__["_context_centered"] = _center_context(
            self.local, shift, torch.cat([features, z], dim=-1)
        )

    def check_globals(
        self,
        *args: Any,
        seed: int = 0,
        num_global_draws: int | None = None,
        num_local_draws: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | None:
        r"""After training: estimate the globals' marginal posterior and, if the global guide
        is off it, move the guide onto it (what :class:`pyroflows.VI` does after its fit).

        The ELBO's optimum for the global guide is the posterior only if the local guide is
        exact; with many members a common error of the local guide far below what an ELBO
        estimate resolves moves the globals by posterior sds (at N = 100,000, VI's globals
        ended 0.15-1.2 posterior sd off). This estimates the globals' marginal score
        :math:`\nabla \log p(\theta \mid x)` by importance sampling each member's locals with
        the local guide (a pass over all members, jackknifed over the draws), fits a
        Gaussian to it over draws of the global guide, and moves the global guide by an
        affine map of its whitened coordinates (its flows' shape kept) while its mean is
        more than 0.1 posterior sd (and 3 standard errors) off or its sd more than 10%,
        estimating again after each move (at most three estimates). It assumes the
        globals' marginal posterior is close to Gaussian over the guide's draws.

        Args:
            *args, **kwargs: The model's arguments (the full data set; the plate's
                subsample size as in training).
            seed: Seed of the check's draws.
            num_global_draws: Draws of the global guide per estimate (default 16, or 4 (G + 1)
                for G global coordinates if more). The estimate's noise falls like one
                over the square root of this times ``num_local_draws``, and so does its
                cost rise: at N = 100,000 the defaults' se was 0.04-0.07 posterior sd, and
                an estimate took about 45 s (``benchmarks/results/amortized_vi.md``).
            num_local_draws: Draws of each member's locals per global draw, at least 2
                (default: as many as keep the draws x N under 2e7, between 16 and 64).

        Returns:
            ``None`` if the guide has no global sites; otherwise a dict, as
            ``pyroflows.VI.diagnostics()["globals_check"]``: ``offset`` (the guide's mean
            from the first estimate, posterior sds) and ``sd_ratio`` (its sds over the
            estimate's, smallest and largest), ``moved``, ``rounds`` (estimates made),
            ``remaining`` (the last estimate's offset of the guide as it is, ``None`` if the
            last estimate moved it), ``se`` (the last estimate's standard error),
            ``local_draws`` and ``local_ess`` (draws per member and their mean
            importance-sampling ESS over that number), or ``reason`` if no estimate could be
            made.

        Raises:
            RuntimeError: Before :meth:`precondition_globals` (the check works in its
                whitened coordinates).
        """
        from pyroflows._vi_amortized import AmortizedTarget  # imports this module

        if self.global_guide is None:
            return None
        if not self.global_guide.preconditioned:
            raise RuntimeError(
                "check_globals() works in the global guide's whitened coordinates: call "
                "precondition_globals() first (e.g. between two phases of training, as "
                "examples/amortized_hierarchical.py does)"
            )
        target = AmortizedTarget(self.model, self, args, kwargs)
        g = self.global_guide.latent_dim
        if num_global_draws is not None:
            check_positive_int("num_global_draws", num_global_draws)
            if num_global_draws < g + 2:
                raise ValueError(
                    f"num_global_draws must be at least G + 2 = {g + 2} (the regression has "
                    f"G + 1 coefficients per coordinate); got {num_global_draws}"
                )
        if num_local_draws is not None and (
            not isinstance(num_local_draws, int) or num_local_draws < 2
        ):
            raise ValueError(f"num_local_draws must be an int >= 2; got {num_local_draws!r}")
        target.check_draws = (num_global_draws, num_local_draws)
        target.preconditioned = True
        return target.check_globals(seed)

    @torch.no_grad()
    def median(
        self, *args: Any, num_samples: int | None = None, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Posterior median of every global site (:meth:`pyroflows.AutoFlowGuide.median`)."""
        self._ensure_prototype(*args, **kwargs)
        if self.global_guide is None:
            return {}
        return self.global_guide.median(*args, num_samples=num_samples, **kwargs)

    @torch.no_grad()
    def quantiles(
        self,
        quantiles: Sequence[float] | Tensor,
        *args: Any,
        num_samples: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Tensor]:
        """Posterior quantiles of every global site (:meth:`pyroflows.AutoFlowGuide.quantiles`).

        Returns:
            A dict mapping each global site name to a tensor ``(len(quantiles), *site_shape)``.
        """
        self._ensure_prototype(*args, **kwargs)
        if self.global_guide is None:
            return {}
        return self.global_guide.quantiles(quantiles, *args, num_samples=num_samples, **kwargs)
