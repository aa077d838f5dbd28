"""Sylvester-specific checks the generic tests in ``tests/test_transforms.py`` cannot make."""

from __future__ import annotations

import pytest
import torch
from pyro.distributions.transforms import Sylvester as PyroSylvester

from pyroflows.transforms import ConditionalSylvester, Sylvester, conditional_sylvester, sylvester
from pyroflows.transforms._sylvester_q import (
    bjorck_orthonormalize,
    dense_q,
    householder_product,
    permutation_q,
)
from pyroflows.transforms.sylvester import _sylvester
from tests.conftest import randomize_
from tests.test_transforms import blockwise_jacobian_ladj

KINDS = ["orthogonal", "householder", "triangular"]


def test_pyro_sylvester_log_det_is_wrong_where_ours_matches_autograd():
    """Pyro 1.9.2 computes y = x + RᵀQᵀ tanh(Q Sᵀ x + b) (its A = QR and B = SQᵀ multiply
    row vectors from the right), whose Jacobian I + RᵀQᵀ D Q Sᵀ is not triangular in any
    basis, yet it reports Σ log(1 + h' r_ii s_ii). Ours, y = x + Q R tanh(S Qᵀ x + b) on the
    very same Q, R, S, b, has exactly that log-det."""
    torch.manual_seed(1)
    pyro_flow = PyroSylvester(8, count_transforms=8).double()
    with torch.no_grad():
        for p in pyro_flow.parameters():
            p.normal_()  # N(0, 1) raw parameters
    x = torch.randn(6, 8, dtype=torch.float64)
    y = pyro_flow(x)
    pyro_err = pyro_flow.log_abs_det_jacobian(x, y) - blockwise_jacobian_ladj(pyro_flow, x)[1]
    assert pyro_err.abs().max() > 1.0, pyro_err  # nats off, in float64

    with torch.no_grad():
        q, r, s, b = pyro_flow.Q(x), pyro_flow.R(), pyro_flow.S(), pyro_flow.b
    # the same Q = H_1 ⋯ H_8 as ours, orthogonal: Pyro's error is not in Q
    torch.testing.assert_close(q, householder_product(pyro_flow.u_unnormed.detach()))
    torch.testing.assert_close(q.mT @ q, torch.eye(8, dtype=torch.float64))
    c = r.diagonal() * s.diagonal()
    one_plus_c = 1 + c

    def ours(z: torch.Tensor) -> torch.Tensor:
        return _sylvester(z, q, r, s, b, one_plus_c, c)[0]

    sign, expected = blockwise_jacobian_ladj(ours, x)
    assert (sign > 0).all()
    torch.testing.assert_close(
        _sylvester(x, q, r, s, b, one_plus_c, c)[1], expected, rtol=0, atol=1e-10
    )


def test_bjorck_gives_the_orthonormal_polar_factor(device):
    a = torch.randn(5, 6, 3, dtype=torch.float64, device=device)
    q = bjorck_orthonormalize(a)
    eye = torch.eye(3, dtype=torch.float64, device=device)
    torch.testing.assert_close(q.mT @ q, eye.expand(5, 3, 3), rtol=0, atol=1e-13)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(q, u @ vh, rtol=0, atol=1e-12)
    q32 = bjorck_orthonormalize(a.float() * 1e30)  # no overflow in the normalisation
    torch.testing.assert_close(q32.mT @ q32, eye.float().expand(5, 3, 3), rtol=0, atol=1e-5)


def test_bjorck_scale_bound_takes_fewer_steps_near_orthonormal():
    """The bound √(‖a‖₁‖a‖_∞) on the largest singular value starts I + A's singular values
    at ~0.6 rather than ~1/√M (the Frobenius norm alone): 7 steps here instead of 10.
    Checking every fourth step (the accelerator setting) gives the same Q to rounding."""
    from pyroflows.transforms._sylvester_q import _bjorck_iterate

    torch.manual_seed(0)
    a = torch.eye(64, 32, dtype=torch.float64) + 0.02 * torch.randn(
        10, 64, 32, dtype=torch.float64
    )
    q, steps = _bjorck_iterate(a, 100)
    assert steps <= 7
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(q, u @ vh, rtol=0, atol=1e-13)
    q4, steps4 = _bjorck_iterate(a, 100, check_every=4)
    assert steps4 % 4 == 0 and steps4 >= steps
    torch.testing.assert_close(q4, q, rtol=0, atol=1e-14)


def test_bjorck_warns_when_the_raw_matrix_is_rank_deficient():
    a = torch.randn(4, 3, dtype=torch.float64)
    a[:, 2] = a[:, 0]
    with pytest.warns(RuntimeWarning, match="did not converge in 100 iterations"):
        bjorck_orthonormalize(a)
    flow = Sylvester(3, "orthogonal").double()
    with torch.no_grad():
        flow.q_raw.copy_(-torch.eye(3, dtype=torch.float64).flatten())  # I + A = 0
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        flow(torch.zeros(3, dtype=torch.float64))


def test_orthogonal_converges_without_warnings_at_random_parameters():
    flow = randomize_(Sylvester(64, "orthogonal"))  # filterwarnings=error: no warning
    q = flow.params()[0]
    torch.testing.assert_close(q.mT @ q, torch.eye(64), rtol=0, atol=1e-5)
    cond = randomize_(ConditionalSylvester(16, 5, "orthogonal", hidden_dims=[]))
    q = cond.condition(torch.randn(50, 5))._params[0]
    torch.testing.assert_close(q.mT @ q, torch.eye(16).expand(50, 16, 16), rtol=0, atol=1e-5)


@pytest.mark.parametrize("num", [1, 2, 3, 4, 7])  # H <= 3: rank-one updates, else WY
def test_householder_product_is_the_product_of_reflections(device, num):
    v = torch.randn(3, num, 5, dtype=torch.float64, device=device)
    v[0, -1] = 0.0  # an identity reflection
    v[1, 0] *= 1e-200  # underflows a naive norm
    v[2, num // 2] *= 1e200  # overflows a naive norm
    q = householder_product(v)
    for i in range(3):  # unbatched calls take the same path
        torch.testing.assert_close(householder_product(v[i]), q[i], rtol=0, atol=1e-13)
    eye = torch.eye(5, dtype=torch.float64, device=device)
    for i in range(3):
        expected = eye
        for k in range(num):
            u = v[i, k] / v[i, k].abs().max() if v[i, k].any() else v[i, k]
            u = u / u.norm() if u.any() else u
            expected = expected @ (eye - 2 * torch.outer(u, u))
        torch.testing.assert_close(q[i], expected, rtol=0, atol=1e-13)
    torch.testing.assert_close(q.mT @ q, eye.expand(3, 5, 5), rtol=0, atol=1e-13)


def test_triangular_permute_is_the_reversed_flow():
    """T-SNF with Q = reversal is the Q = I flow applied to the reversed coordinates."""
    plain = randomize_(Sylvester(5, "triangular").double())
    rev = Sylvester(5, "triangular", permute=True).double()
    rev.load_state_dict(plain.state_dict())
    x = torch.randn(7, 5, dtype=torch.float64)
    y = rev(x)
    torch.testing.assert_close(y, plain(x.flip(-1)).flip(-1))
    torch.testing.assert_close(rev.log_abs_det_jacobian(x, y), plain._forward(x.flip(-1))[1])


@pytest.mark.parametrize("permute", [False, True])
def test_triangular_q_is_a_permutation_index_not_a_dense_matrix(permute):
    """Issue 18: T-SNF applies Q by gathers (a dense D×D product took 9 s per layer at
    D = 4,000); the result equals the dense-Q formula, forward, log-det and inverse."""
    flow = randomize_(Sylvester(6, "triangular", permute=permute).double())
    params = flow.params()
    q = params[0]
    assert q.shape == (6,) and not q.is_floating_point()
    assert torch.equal(q, permutation_q(6, permute, q))
    dense = dense_q(q, params[1])
    assert torch.equal(
        dense,
        torch.eye(6, dtype=torch.float64).flip(-1)
        if permute
        else torch.eye(6, dtype=torch.float64),
    )
    for x in (torch.randn(5, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)):
        y, ladj = _sylvester(x, *params)
        y_dense, ladj_dense = _sylvester(x, dense, *params[1:])
        torch.testing.assert_close(y, y_dense, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(ladj, ladj_dense, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(flow.inv(y.clone()), x, rtol=1e-10, atol=1e-10)
    big = Sylvester(3000, "triangular", permute=True)  # no (3000, 3000) Q is built
    assert big.params()[0].numel() == 3000


def test_fewer_columns_leaves_the_orthogonal_complement_unchanged(device):
    flow = randomize_(Sylvester(5, "orthogonal", num_ortho_vecs=2).double().to(device))
    x = torch.randn(9, 5, dtype=torch.float64, device=device)
    y = flow(x)
    q = flow.params()[0]  # (5, 2)
    assert q.shape == (5, 2)
    complement = torch.eye(5, dtype=torch.float64, device=device) - q @ q.mT
    torch.testing.assert_close((y - x) @ complement, torch.zeros_like(x), rtol=0, atol=1e-12)
    sign, expected = blockwise_jacobian_ladj(flow, x)
    assert (sign > 0).all()
    torch.testing.assert_close(flow.log_abs_det_jacobian(x, y), expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(flow.inv(y.clone()), x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_amortized_parameters_are_per_data_point(kind, device):
    """One conditioned flow over a batch of contexts equals conditioning on each alone."""
    module = randomize_(ConditionalSylvester(4, 3, kind).double().to(device))
    context = torch.randn(6, 3, dtype=torch.float64, device=device)
    x = torch.randn(6, 4, dtype=torch.float64, device=device)
    t = module.condition(context)
    y = t(x)
    ladj = t.log_abs_det_jacobian(x, y)
    x_back = t.inv(y.clone())
    for i in range(6):
        ti = module.condition(context[i])
        torch.testing.assert_close(y[i], ti(x[i]))
        torch.testing.assert_close(ladj[i], ti.log_abs_det_jacobian(x[i], ti(x[i])))
        torch.testing.assert_close(x_back[i], ti.inv(y[i].clone()))
    if kind != "triangular":  # Q, R, R̃, b all vary with the context
        assert all(p.shape[0] == 6 for p in t._params)


@pytest.mark.parametrize("kind", KINDS)
def test_log_det_is_exact_for_adversarial_parameters(kind):
    """At huge, tiny and zero raw parameters, compare with a reference that stays accurate.

    With v = Qᵀx, the flow is v ↦ v + R tanh(R̃ v + b) on span(Q) and the identity off it, so
    log|det J| is the log-det of that M×M map. Its autograd Jacobian is exactly upper
    triangular, so its log-det is a sum of logs of computed diagonal entries without the
    cancellation that ruins ``slogdet`` of the D×D Jacobian when R, R̃ are huge.
    """
    gen = torch.Generator().manual_seed(0)
    for scale in (0.0, 1e-8, 1.0, 30.0, 1e3):
        for trial in range(8):
            flow = Sylvester(3, kind).double()
            with torch.no_grad():
                for p in flow.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
                    if torch.rand((), generator=gen) < 0.3:
                        p.zero_()
            x = (trial % 3) * 5 * torch.randn(4, 3, dtype=torch.float64, generator=gen)
            q, r, rt, b, _, _ = (p.detach() for p in flow.params())
            q = dense_q(q, x)  # T-SNF's Q is a permutation index
            torch.testing.assert_close(q.mT @ q, torch.eye(3, dtype=torch.float64))
            y = flow(x)
            ladj = flow.log_abs_det_jacobian(x, y)
            assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
            for i in range(4):
                jac = torch.autograd.functional.jacobian(
                    lambda v, r=r, rt=rt, b=b: v + r @ torch.tanh(rt @ v + b), q.mT @ x[i]
                )
                assert (jac.tril(-1) == 0).all()
                diag = jac.diagonal()
                assert (diag >= 0).all()
                if (diag > 1e-6).all():  # rounding in 1 + r h' r̃ is below 1e-10 relative
                    torch.testing.assert_close(ladj[i], diag.log().sum(), rtol=1e-9, atol=1e-9)
                else:
                    assert ladj[i] < -10


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: Sylvester(0), ValueError, "input_dim must be a positive int; got 0"),
        (lambda: sylvester(3, kind="radial"), ValueError, "kind must be one of"),
        (lambda: sylvester(3, num_ortho_vecs=4), ValueError, "at most input_dim=3; got 4"),
        (lambda: sylvester(3, num_ortho_vecs=0), ValueError, "num_ortho_vecs must be a pos"),
        (
            lambda: sylvester(3, "householder", num_ortho_vecs=2),
            ValueError,
            "num_ortho_vecs only applies to kind='orthogonal'; got kind='householder'",
        ),
        (lambda: sylvester(3, num_householder=2), ValueError, "num_householder only applies"),
        (
            lambda: sylvester(3, "householder", num_householder=1.5),
            ValueError,
            "num_householder must be a positive int; got 1.5",
        ),
        (lambda: sylvester(3, "triangular", permute=1), TypeError, "permute must be a bool"),
        (lambda: sylvester(3, permute=True), ValueError, "permute=True only applies"),
        (lambda: conditional_sylvester(3, 0), ValueError, "context_dim must be a positive int"),
        (
            lambda: conditional_sylvester(3, 2, "triangular", hidden_dims=4),
            TypeError,
            "hidden_dims must be a sequence of ints or None; got 4",
        ),
        (
            lambda: conditional_sylvester(3, 2, kind="planar"),
            ValueError,
            "kind must be one of",
        ),
        (
            lambda: conditional_sylvester(3, 2).condition(torch.zeros(4, 3)),
            ValueError,
            r"context must have shape \(\*batch, 2\); got \(4, 3\)",
        ),
    ],
)
def test_argument_validation(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bjorck_gradient_is_the_exact_polar_derivative():
    """The implicit backward (no unrolled iterations) passes gradcheck and matches the SVD's."""
    a = torch.randn(3, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bjorck_orthonormalize, (a,))
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    g = torch.randn_like(a)
    (ours,) = torch.autograd.grad((bjorck_orthonormalize(a) * g).sum(), a)
    (svd,) = torch.autograd.grad(((u @ vh) * g).sum(), a)
    torch.testing.assert_close(ours, svd)
