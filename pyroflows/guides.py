"""A normalizing-flow autoguide for any Pyro model with continuous latent sites."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn.module import PyroParam
from pyro.params.param_store import param_with_module_name
from pyro.poutine import Trace
from torch import Tensor, nn
from torch.distributions import Transform, biject_to

from pyroflows import transforms as _transforms
from pyroflows._mode import LowRankAffine, LowRankFactor
from pyroflows._utils import check_positive_int
from pyroflows.transforms._base import interleave_permutations

_BASES = ("diagonal", "full")


# fixed preconditioner buffers set by AutoFlowGuide.precondition (dense or low-rank factor)
_PRECOND_BUFFERS = (
    "precond_loc",
    "precond_scale_tril",
    "precond_lowrank_scale",
    "precond_lowrank_basis",
    "precond_lowrank_tril",
)


class _FlowStack(ComposeTransformModule):
    """``ComposeTransformModule`` whose copies and pickles leave out torch's transform cache
    (after a training step it holds tensors of the autograd graph, which ``copy.deepcopy``
    refuses: a fitted guide could not be deep-copied)."""

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cached_x_y"] = None, None
        state["_inv"] = None  # rebuilt on first use, from the copied parts
        return state


def _check_init_scale(init_scale: object) -> float:
    ok = isinstance(init_scale, (int, float)) and not isinstance(init_scale, bool)
    if not ok or not math.isfinite(init_scale) or init_scale <= 0:
        raise ValueError(f"init_scale must be a positive finite float; got {init_scale!r}")
    return float(init_scale)


def _resolve_flow(flow: object, flow_kwargs: dict[str, Any]) -> Callable[..., Transform]:
    """Look ``flow`` up in :data:`pyroflows.transforms.FLOWS` or accept a callable."""
    if isinstance(flow, str):
        if flow not in _transforms.FLOWS:
            names = ", ".join(repr(n) for n in sorted(_transforms.FLOWS))
            raise ValueError(f"flow must be one of {names} or a callable; got {flow!r}")
        factory = _transforms.FLOWS[flow]
    elif callable(flow):
        factory = flow
    else:
        raise TypeError(
            f"flow must be a registry name (str) or a callable latent_dim -> TransformModule; "
            f"got {type(flow).__name__}"
        )
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: cannot check early
        return factory
    try:
        signature.bind(1, **flow_kwargs)
    except TypeError as e:
        raise TypeError(
            f"flow {flow!r} does not accept the keyword arguments {sorted(flow_kwargs)} "
            f"(signature {signature}): {e}"
        ) from None
    return factory


def _check_sites(trace: Trace) -> None:
    """Raise a helpful ``ValueError`` for discrete, subsampled-local or missing latent sites."""
    names = []
    for name, site in trace.iter_stochastic_nodes():
        names.append(name)
        if site["fn"].support.is_discrete:
            raise ValueError(
                f"AutoFlowGuide cannot handle the discrete latent site {name!r} "
                f"({type(site['fn']).__name__}). Enumerate it out of the model "
                "(pyro.infer.config_enumerate with TraceEnum_ELBO) and hide it from this guide, "
                f"e.g. AutoFlowGuide(poutine.block(model, hide=[{name!r}])), or combine this "
                "guide with another guide for that site in an AutoGuideList."
            )
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.full_size not in (None, frame.size):
                raise ValueError(
                    f"latent site {name!r} is local to the subsampled plate {frame.name!r} "
                    f"(subsample size {frame.size} of {frame.full_size}). AutoFlowGuide is a "
                    "global guide over a fixed-size latent vector; use an amortized encoder "
                    "for local latent variables (pyroflows.vae.FlowEncoder), e.g. in an "
                    "AutoGuideList with this guide on the global sites, or drop subsample_size."
                )
    if not names:
        raise ValueError(
            "AutoFlowGuide found no latent sample sites in the model (every pyro.sample site "
            "is observed); there is nothing to infer. Use an empty guide "
            "(def guide(*args, **kwargs): pass) instead."
        )


def _set_constrained(module: nn.Module, name: str, value: Tensor) -> None:
    """Set a ``PyroParam`` in place (the param store keeps pointing at the same tensor)."""
    constraint = module._pyro_params[name][0]
    raw = getattr(module, name + "_unconstrained")
    raw.data.copy_(torch.distributions.transform_to(constraint).inv(value))


def _fullname(prefix: str, name: str) -> str:
    """The param-store name of attribute ``name`` of the PyroModule named ``prefix``."""
    return f"{prefix}.{name}" if prefix else name


class AutoFlowGuide(AutoContinuous):
    r"""Normalizing-flow autoguide :math:`z = \mu + L\, f_K \circ \dots \circ f_1(\epsilon)`.

    The latent sites are mapped to unconstrained space with ``biject_to`` and concatenated
    into one vector :math:`z \in \mathbb{R}^D` (as in :class:`~pyro.infer.autoguide.
    AutoContinuous`). The base distribution is :math:`\epsilon \sim N(0, I_D)`; ``num_flows``
    flow layers act on it and a learnable affine map :math:`\mu + L\,\cdot` follows, with
    :math:`L = \mathrm{diag}(\sigma)` (``base="diagonal"``) or lower-Cholesky
    (``base="full"``). Without the flows this is the Gaussian :math:`N(\mu, LL^\top)`; the
    flows act in its whitened coordinates, which is where their identity initialisation and
    parameter scales make sense. :math:`\mu` starts at ``init_loc_fn``'s location and
    :math:`\sigma` at ``init_scale``, and the flows start at (or very near) the identity, so
    the untrained guide is a well-initialised :class:`~pyro.infer.autoguide.AutoNormal`
    (Pyro's :class:`~pyro.infer.autoguide.AutoNormalizingFlow` ignores ``init_loc_fn``).

    :meth:`precondition` adds a fixed affine map after the learnable one, so that the
    learnable parameters work in whitened coordinates (:class:`pyroflows.VI` sets it to the
    mode and the Laplace factor; the untrained guide is then the Laplace approximation).

    Parameters are created on the first call (or :meth:`median`, :meth:`quantiles`,
    :meth:`sample_posterior`), on the device and dtype of the model's tensors; ``guide.to``
    moves all of them. Before the first call there is nothing to move: ``guide.to("meta")``
    then ``guide()`` creates them on the model's device, as for Pyro's ``AutoNormal``. After
    it, a move that replaces the parameter objects (``"meta"``; a dtype change keeps them)
    is undone on the next call, as for ``AutoNormal``, whose parameters Pyro's param store
    restores: while the store still holds the replaced parameters, they come back, with the
    buffers the move replaced (MADE masks, permutations, the preconditioner). If the store
    was cleared in between, the guide stays where it was moved, as ``AutoNormal`` does
    (``tests/test_large_d.py``).

    The default IAF layers keep Pyro's MADE width :math:`3D + 1` up to D = 100 and hold it at
    301 above (:func:`~pyroflows.transforms.made.default_hidden_dim`), so their size grows
    linearly in D; the full-rank base (``base="full"``, :class:`pyroflows.VI`'s default)
    has :math:`D^2` parameters. Memory and step time at D = 1,000 to 20,000:
    ``benchmarks/results/large_d.md``.

    Note:
        :meth:`median` and :meth:`quantiles` have no closed form and are estimated from
        ``num_samples`` draws of the guide (coordinate-wise quantiles in unconstrained space,
        pushed through ``biject_to`` like Pyro's guides). :meth:`get_posterior` can score
        arbitrary points when every flow layer has an inverse.

    Args:
        model: A Pyro model whose latent sites are all continuous.
        flow: A name in :data:`pyroflows.transforms.FLOWS` or a callable
            ``latent_dim -> TransformModule``.
        num_flows: Number of stacked flow layers. A parameter-free reversal is inserted
            between layers whose class declares a fixed coordinate order
            (``autoregressive = True``, as IAF, MAF and Pyro's ``AffineAutoregressive``, or
            ``coupling = True``).
        init_loc_fn: Per-site initialisation of the base mean (Pyro's ``init_to_*``).
        init_scale: Initial standard deviation of the base in unconstrained space.
        base: ``"diagonal"`` or ``"full"`` (lower-Cholesky) affine map of the base.
        base_df: ``None`` for the standard normal base; a float > 2 for independent
            Student-t coordinates with these degrees of freedom, scaled to unit variance
            (:attr:`base_df`), for posteriors with heavier-than-Gaussian tails.
        **flow_kwargs: Passed to every call of the flow factory.

    Example:
        >>> import pyro
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide = AutoFlowGuide(model, flow="planar", num_flows=2)
        >>> guide()["x"].shape
        torch.Size([2])
        >>> guide.get_posterior().log_prob(torch.zeros(2)).shape
        torch.Size([])

    References:
        | Automatic Differentiation Variational Inference (Kucukelbir et al., 2017)
        | https://arxiv.org/abs/1603.00788
        | Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
        | https://arxiv.org/abs/1505.05770
    """

    scale_constraint = constraints.softplus_positive
    scale_tril_constraint = constraints.unit_lower_cholesky
    #: Default number of guide draws behind :meth:`median` and :meth:`quantiles`.
    default_num_samples = 4000

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        flow: str | Callable[..., Transform] = "iaf",
        num_flows: int = 4,
        init_loc_fn: Callable[[dict], Tensor] = init_to_median,
        init_scale: float = 0.1,
        base: str = "diagonal",
        base_df: float | None = None,
        **flow_kwargs: Any,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable; got {type(model).__name__}")
        if not callable(init_loc_fn):
            raise TypeError(f"init_loc_fn must be callable; got {init_loc_fn!r}")
        if base not in _BASES:
            raise ValueError(f"base must be one of {_BASES}; got {base!r}")
        self._flow_factory = _resolve_flow(flow, flow_kwargs)
        self.flow = flow
        self.num_flows = check_positive_int("num_flows", num_flows)
        self._init_scale = _check_init_scale(init_scale)
        self.base = base
        self.base_df = base_df
        self._flow_kwargs = dict(flow_kwargs)
        super().__init__(model, init_loc_fn=init_loc_fn)
        # base_df in state_dict (a float64 scalar, inf for the normal base); reads use the
        # float mirror set with it, so the hot path never syncs with the device
        inf = math.inf if base_df is None else float(base_df)
        self.register_buffer("base_df_value", torch.tensor(inf, dtype=torch.float64))

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        try:
            try:
                super()._setup_prototype(*args, **kwargs)
            except (ValueError, RuntimeError):  # Pyro's less specific errors: ours first
                if self.prototype_trace is not None:
                    _check_sites(self.prototype_trace)
                raise
            _check_sites(self.prototype_trace)
            self._create_parameters()
            self._adopt_stored_flows()
        except Exception:
            self.prototype_trace = None  # a later call runs the whole setup again
            raise

    def _create_parameters(self) -> None:
        """Base location, scale (and Cholesky factor) and flows, on the model's device/dtype."""
        loc = self._init_loc().detach()
        self.loc = nn.Parameter(loc)
        self.scale = PyroParam(torch.full_like(loc, self._init_scale), self.scale_constraint)
        if self.base == "full":
            eye = torch.eye(self.latent_dim, dtype=loc.dtype, device=loc.device)
            self.scale_tril = PyroParam(eye, self.scale_tril_constraint)
        self.flows = self._build_flows(self.latent_dim).to(device=loc.device, dtype=loc.dtype)

    def _adopt_stored_flows(self) -> None:
        """Take the param store's tensors for flow parameters it already holds.

        The store is Pyro's source of truth: a guide of the same name that finds its
        ``PyroParam`` entries there (fitted earlier in the session, or loaded with
        ``pyro.get_param_store().load``) starts from them, as ``AutoNormal`` does. For the
        flows (an ``nn.Module``, registered with ``pyro.module``) Pyro does not do this, and
        ``SVI`` would then optimise the store's stale tensors while the flows kept their own,
        untrained, with no error (Pyro's ``AutoIAFNormal`` trains nothing in that case). So
        at setup the flows take the stored tensors; one of another shape, dtype or device is a
        leftover of a different guide, and a ``ValueError`` says to clear the store.
        """
        store = pyro.get_param_store()
        for name, param in list(self.flows.named_parameters()):
            full = self._store_name(f"flows.{name}")
            stored = store._params.get(full)
            if stored is None or stored is param:
                continue
            if (stored.shape, stored.dtype, stored.device) != (
                param.shape,
                param.dtype,
                param.device,
            ):
                raise ValueError(
                    f"Pyro's param store holds {full!r} with shape {tuple(stored.shape)}, "
                    f"{stored.dtype} on {stored.device}, but this guide's parameter is "
                    f"{tuple(param.shape)}, {param.dtype} on {param.device}: a leftover of "
                    "another guide of the same name. Call pyro.clear_param_store() before "
                    "creating this guide."
                )
            if not isinstance(stored, nn.Parameter):
                stored = nn.Parameter(stored)
                store._params[full] = stored
                store._param_to_name[stored] = full
            owner, _, attr = name.rpartition(".")
            self.flows.get_submodule(owner)._parameters[attr] = stored

    def _build_flows(self, latent_dim: int) -> ComposeTransformModule:
        """Stack ``num_flows`` layers, reversing the coordinates between layers whose class
        declares a fixed coordinate order (:func:`~pyroflows.transforms._base.
        needs_permutation`: autoregressive and coupling layers)."""
        layers: list[Transform] = []
        for _ in range(self.num_flows):
            layer = self._flow_factory(latent_dim, **self._flow_kwargs)
            if not isinstance(layer, Transform):
                raise TypeError(
                    f"flow {self.flow!r} must return a torch Transform (e.g. a Pyro "
                    f"TransformModule); got {type(layer).__name__}"
                )
            layers.append(layer)
        return _FlowStack(interleave_permutations(layers))

    def _affine(self) -> Transform:
        """The map ``ε' -> loc + L ε'`` after the flows; cached so samples score exactly."""
        if self.base == "full":
            scale_tril = self.scale[..., None] * self.scale_tril  # (D, D)
            return dist.transforms.LowerCholeskyAffine(self.loc, scale_tril).with_cache(1)
        return dist.transforms.AffineTransform(self.loc, self.scale, event_dim=1, cache_size=1)

    def _parts(self) -> list[Transform]:
        """Flows, the learnable affine map and, if set, the fixed preconditioner."""
        parts = [self.flows, self._affine()]
        if "precond_scale_tril" in self._buffers:
            pre = dist.transforms.LowerCholeskyAffine(self.precond_loc, self.precond_scale_tril)
            parts.append(pre.with_cache(1))
        elif self.preconditioned:
            factor = LowRankFactor(
                self.precond_lowrank_scale, self.precond_lowrank_basis, self.precond_lowrank_tril
            )
            parts.append(LowRankAffine(self.precond_loc, factor, cache_size=1))
        return parts

    @property
    def preconditioned(self) -> bool:
        """Whether :meth:`precondition` has set a fixed affine map after the learnable one."""
        return "precond_loc" in self._buffers

    @torch.no_grad()
    def precondition(self, loc: Tensor, scale_tril: Tensor | LowRankFactor) -> None:
        r"""Work in whitened coordinates :math:`z = c + L_0 (\mu + L\, f(\epsilon))`.

        Sets a fixed (non-trainable) location :math:`c` and lower-triangular factor
        :math:`L_0`, typically the mode and the Laplace factor :math:`L_0 L_0^\top =
        H^{-1}`, and resets the learnable map to :math:`\mu = 0`, :math:`L = I`. With the
        flows at the identity the guide is then exactly :math:`N(c, L_0 L_0^\top)`, and the
        learnable parameters live where the posterior is close to isotropic, which is where
        stochastic optimisers work (:class:`pyroflows.VI` calls this). The preconditioner is
        saved in ``state_dict`` and used by sampling, :meth:`get_posterior`,
        :meth:`get_transform` (so ``NeuTraReparam``), :meth:`median` and :meth:`quantiles`.

        Args:
            loc: Location :math:`c`, shape ``(latent_dim,)``.
            scale_tril: Lower-triangular :math:`L_0` with a positive diagonal,
                shape ``(latent_dim, latent_dim)``, or a structured
                :class:`~pyroflows._mode.LowRankFactor` (diagonal plus low rank, applied in
                ``O(DK)``; what :class:`~pyroflows.VI` uses above ``max_hessian_dim``).
        """
        if self.prototype_trace is None:
            raise RuntimeError("call the guide (or VI.run) once before precondition()")
        d = self.latent_dim
        loc = torch.as_tensor(loc).to(self.loc)
        if isinstance(scale_tril, LowRankFactor):
            self._precondition_lowrank(loc, scale_tril)
            return
        scale_tril = torch.as_tensor(scale_tril).to(self.loc)
        if loc.shape != (d,) or scale_tril.shape != (d, d):
            raise ValueError(
                f"precondition expects loc ({d},) and scale_tril ({d}, {d}); got "
                f"{tuple(loc.shape)} and {tuple(scale_tril.shape)}"
            )
        diag = scale_tril.diagonal()
        if not bool(torch.isfinite(scale_tril).all() and (diag > 0).all()):
            raise ValueError("scale_tril must be finite and lower-triangular with diag > 0")
        for name in _PRECOND_BUFFERS:
            self._buffers.pop(name, None)
        self.register_buffer("precond_loc", loc.clone())
        self.register_buffer("precond_scale_tril", scale_tril.tril().clone())
        self._reset_affine()

    def _precondition_lowrank(self, loc: Tensor, factor: LowRankFactor) -> None:
        d = self.latent_dim
        scale, basis, tril = (t.to(self.loc) for t in (factor.scale, factor.basis, factor.tril))
        k = tril.shape[-1]
        if loc.shape != (d,) or scale.shape != (d,) or basis.shape != (d, k):
            raise ValueError(
                f"precondition expects loc ({d},) and a LowRankFactor with scale ({d},) and "
                f"basis ({d}, K); got {tuple(loc.shape)}, {tuple(scale.shape)} and "
                f"{tuple(basis.shape)}"
            )
        finite = all(bool(torch.isfinite(t).all()) for t in (scale, basis, tril))
        if not (finite and (scale > 0).all() and (tril.diagonal() > 0).all()):
            raise ValueError("the LowRankFactor must be finite with positive scale and diagonal")
        for name in _PRECOND_BUFFERS:
            self._buffers.pop(name, None)
        self.register_buffer("precond_loc", loc.clone())
        self.register_buffer("precond_lowrank_scale", scale.clone())
        self.register_buffer("precond_lowrank_basis", basis.clone())
        self.register_buffer("precond_lowrank_tril", tril.tril().clone())
        self._reset_affine()

    def _reset_affine(self) -> None:
        """The learnable map back to the identity (``loc = 0``, unit scales)."""
        d = self.latent_dim
        self.loc.zero_()
        _set_constrained(self, "scale", torch.ones_like(self.loc))
        if self.base == "full":
            _set_constrained(self, "scale_tril", torch.eye(d).to(self.loc))

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> AutoFlowGuide:
        # .to("meta") replaces the parameter and buffer objects: remember the replaced ones
        # until the next call, which puts them back if the param store still holds them
        # (_undo_move); earlier moves that replaced no parameter (dtype changes) are kept
        before = self._named_tensors()
        moved = self.__dict__.get("_moved") or {}
        if not moved.keys() & dict(self.named_parameters()).keys():
            moved = {}
        out = super()._apply(fn, *args, **kwargs)
        for name, tensor in self._named_tensors().items():
            old = moved[name][0] if name in moved else before.get(name)
            if old is not None and tensor is not old:
                moved[name] = (old, tensor)
        self.__dict__["_moved"] = moved
        return out

    def _named_tensors(self) -> dict[str, Tensor]:
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    def _store_name(self, name: str) -> str:
        """The param-store name ``PyroModule`` registers parameter ``name`` under."""
        head, _, rest = name.partition(".")
        if head == "flows" and rest:  # pyro.module("AutoFlowGuide.flows", flows)
            return param_with_module_name(_fullname(self._pyro_name, "flows"), rest)
        if head.endswith("_unconstrained") and head[: -len("_unconstrained")] in self._pyro_params:
            head = head[: -len("_unconstrained")]  # a PyroParam: the store holds this tensor
        return _fullname(self._pyro_name, head)

    def _undo_move(self) -> None:
        """Undo a move that replaced the parameters if the param store still holds them.

        Inside a call (an active ``PyroModule`` context, global param store) ``PyroModule``
        re-reads ``scale`` and ``scale_tril`` (``PyroParam`` attributes) from the store, as
        every ``AutoNormal`` parameter, which undoes ``guide.to("meta")``; this does the same
        for ``loc``, the flows and the buffers the move replaced (MADE masks, permutations,
        the preconditioner), but only with the guide's own tensors: the store's entries must
        be the replaced parameters themselves. One dict look-up when nothing was moved.
        """
        moved = self.__dict__.get("_moved")
        if not moved or not self._pyro_context.active or pyro.settings.get("module_local_params"):
            return
        del self.__dict__["_moved"]
        store, params = pyro.get_param_store()._params, dict(self.named_parameters())
        held = [
            (store.get(self._store_name(n)), old) for n, (old, _) in moved.items() if n in params
        ]
        held = [(entry, old) for entry, old in held if entry is not None]  # frozen: not stored
        if not held or any(entry is not old for entry, old in held):  # cleared or refilled
            return
        for name, (old, new) in moved.items():
            prefix, _, key = name.rpartition(".")
            owner = self.get_submodule(prefix)
            slots = owner._parameters if key in owner._parameters else owner._buffers
            if slots.get(key) is new:
                slots[key] = old
        for module in self._modules["flows"].modules():  # caches keyed on the moved tensors
            if hasattr(module, "_forget"):
                module._forget()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # a preconditioned guide's state loads into a fresh guide of the same configuration,
        # and replaces a preconditioner of the other kind (dense or low-rank)
        if prefix + "precond_loc" in state_dict:
            for name in _PRECOND_BUFFERS:
                if prefix + name not in state_dict:
                    self._buffers.pop(name, None)
        for name in _PRECOND_BUFFERS:
            if prefix + name in state_dict and name not in self._buffers:
                self.register_buffer(name, torch.empty_like(state_dict[prefix + name]))
        # a state saved before base_df existed is a normal-base guide
        normal = torch.tensor(math.inf, dtype=torch.float64)
        state_dict.setdefault(prefix + "base_df_value", normal)
        super()._load_from_state_dict(state_dict, prefix, *args)
        value = self._buffers["base_df_value"]
        if value.device.type != "meta":
            df = float(value)
            self.__dict__["_base_df"] = None if math.isinf(df) else df

    @property
    def base_df(self) -> float | None:
        r"""Degrees of freedom of a Student-t base (``None``: the standard normal base).

        Each base coordinate is :math:`\epsilon_i \sim t_\nu(0, \sqrt{(\nu - 2)/\nu})`,
        which has unit variance, so the affine map keeps the meaning it has for the normal
        base (the Laplace start of :class:`~pyroflows.VI` included) and only the tails
        change: polynomial, with tail index :math:`\nu`, instead of Gaussian. Flows whose
        layers are affine far out (IAF, coupling, Sylvester) cannot change a base's tail
        class (Jaini et al. 2020), so this is what lets the guide cover exponential or
        polynomial posterior tails (:func:`~pyroflows.vi.choose_tails`). Saved in
        ``state_dict`` (the buffer ``base_df_value``, ``inf`` for the normal base) and
        settable at any time.
        """
        return self._base_df

    @base_df.setter
    def base_df(self, value: float | None) -> None:
        ok = value is None or (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value > 2
        )
        if not ok:
            raise ValueError(
                f"base_df must be None (normal base) or a finite float > 2 (Student-t "
                f"degrees of freedom with a finite variance); got {value!r}"
            )
        self.__dict__["_base_df"] = None if value is None else float(value)
        buffers = self.__dict__.get("_buffers", {})
        if "base_df_value" in buffers:
            buffers["base_df_value"].fill_(math.inf if value is None else float(value))

    def get_base_dist(self) -> dist.Distribution:
        """The base that the flows and the affine map push: :math:`N(0, I_D)`, or unit-variance
        Student-t coordinates if :attr:`base_df` is set."""
        zero = torch.zeros_like(self.loc)
        if self._base_df is None:
            return dist.Normal(zero, torch.ones_like(zero)).to_event(1)
        df = self._base_df
        scale = torch.full_like(zero, math.sqrt((df - 2.0) / df))
        return dist.StudentT(torch.full_like(zero, df), zero, scale).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any) -> Transform:
        r"""The flows, the learnable affine map :math:`\mu + L\,\cdot` and the preconditioner."""
        self._undo_move()
        return dist.transforms.ComposeTransform(self._parts())

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.TransformedDistribution:
        """The guide's distribution over the packed unconstrained latent vector."""
        self._undo_move()
        return dist.TransformedDistribution(self.get_base_dist(), self._parts())

    def _ensure_prototype(self, *args: Any, **kwargs: Any) -> None:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)

    def _constrain(self, latent: Tensor) -> dict[str, Tensor]:
        """Split a packed unconstrained latent ``(*batch, D)`` into constrained site values.

        Unlike ``_unpack_latent`` the batch dimensions stay leftmost of each site's own shape
        (``(*batch, *site_shape)``), also for sites inside plates.
        """
        batch_shape, pos, out = latent.shape[:-1], 0, {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            shape = self._unconstrained_shapes[name]
            size = math.prod(shape)
            value = latent[..., pos : pos + size].reshape(batch_shape + shape)
            out[name] = biject_to(site["fn"].support)(value)
            pos += size
        return out

    @torch.no_grad()
    def sample_posterior(
        self, *args: Any, num_samples: int = 1000, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Draw ``num_samples`` posterior samples of every latent site, in constrained space.

        Returns:
            A dict mapping each latent site name to a tensor ``(num_samples, *site_shape)``.
        """
        check_positive_int("num_samples", num_samples)
        self._ensure_prototype(*args, **kwargs)
        return self._constrain(self.get_posterior().sample((num_samples,)))

    @torch.no_grad()
    def _latent_quantiles(self, probs: Tensor, num_samples: int) -> Tensor:
        """Coordinate-wise quantiles ``(Q, D)`` of ``num_samples`` unconstrained draws."""
        check_positive_int("num_samples", num_samples)
        z = self.get_posterior().sample((num_samples,))  # (N, D)
        return torch.quantile(z, probs.to(z), dim=0)

    @torch.no_grad()
    def median(
        self, *args: Any, num_samples: int | None = None, **kwargs: Any
    ) -> dict[str, Tensor]:
        """Posterior median of every latent site, estimated from ``num_samples`` draws.

        ``num_samples=None`` uses :attr:`default_num_samples` (set it on the class or the
        instance to change the default). The coordinate-wise median in unconstrained space is
        mapped through ``biject_to``, as Pyro's guides do; for elementwise supports it is the
        marginal median.
        """
        num_samples = self.default_num_samples if num_samples is None else num_samples
        self._ensure_prototype(*args, **kwargs)
        return self._constrain(self._latent_quantiles(torch.tensor([0.5]), num_samples)[0])

    @torch.no_grad()
    def quantiles(
        self,
        quantiles: Sequence[float] | Tensor,
        *args: Any,
        num_samples: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Tensor]:
        """Posterior quantiles of every latent site, estimated from ``num_samples`` draws.

        ``num_samples=None`` uses :attr:`default_num_samples`.

        Returns:
            A dict mapping each site name to a tensor ``(len(quantiles), *site_shape)``.
        """
        num_samples = self.default_num_samples if num_samples is None else num_samples
        probs = torch.as_tensor(quantiles, dtype=torch.float64).reshape(-1)
        if not bool(((probs >= 0) & (probs <= 1)).all()):
            raise ValueError(f"quantiles must lie in [0, 1]; got {quantiles!r}")
        self._ensure_prototype(*args, **kwargs)
        latents = self._latent_quantiles(probs, num_samples)  # (Q, D)
        return self._constrain(latents)
