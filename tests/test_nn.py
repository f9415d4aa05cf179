"""``deqkit.nn``: solve-wide variational dropout and weight/spectral normalisation helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqkit
from deqkit.nn import VariationalDropout, apply_norm, has_norm, remove_norm

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class MaskLog:
    """A forward hook that records the mask a dropout module applied (output / input, rounded
    so that ``x * m / x`` compares equal to ``m``)."""

    def __init__(self, module: nn.Module):
        self.masks: list[torch.Tensor] = []
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.masks.append(torch.round((out / args[0]).detach() * 1e6) / 1e6)


def dropout_cell(drop: nn.Module):
    """``z <- r * drop(tanh(z) + 1.5) + x``: contraction 1.25 r for p = 0.2; never zero inside drop."""

    def f(z, x, r):
        return r * drop(torch.tanh(z) + 1.5) + x

    return f


def dropout_problem(batch=4, dim=8, seed=0):
    x = torch.randn(batch, dim, generator=gen(seed), dtype=F64)
    r = torch.linspace(0.1, 0.6, batch, dtype=F64).unsqueeze(1)  # per-sample contraction rates
    return x, r


# -- VariationalDropout ----------------------------------------------------------------------
def test_one_mask_per_solve_gives_a_fixed_point():
    drop = VariationalDropout(0.2).train()
    log = MaskLog(drop)
    x, r = dropout_problem()
    torch.manual_seed(0)
    sol = deqkit.fixed_point(dropout_cell(drop), torch.zeros_like(x), inputs=(x, r), solver=deqkit.FixedPoint(),
                             tol=1e-10, max_steps=100)
    assert sol.success
    assert len(log.masks) == sol.stats.nfev  # the loop's calls and Implicit's graph call
    for mask in log.masks[1:]:
        assert torch.equal(mask, log.masks[0])
    assert bool((log.masks[0] == 0).any()) and bool((log.masks[0] == 1.25).any())

    # Ordinary dropout draws a new mask per call: the map keeps changing, there is no fixed point.
    torch.manual_seed(0)
    plain = deqkit.fixed_point(dropout_cell(nn.Dropout(0.2).train()), torch.zeros_like(x), inputs=(x, r),
                               solver=deqkit.FixedPoint(), tol=1e-10, max_steps=100, throw=False)
    assert plain.result == deqkit.Result.MAX_STEPS
    assert float(plain.stats.residual.max()) > 1e4 * float(sol.stats.residual.max())


def test_the_backward_graph_uses_the_solve_mask():
    drop = VariationalDropout(0.2).train()
    log = MaskLog(drop)
    x, r = dropout_problem(seed=1)
    x = x.requires_grad_(True)
    torch.manual_seed(1)
    sol = deqkit.fixed_point(dropout_cell(drop), torch.zeros_like(x), inputs=(x, r), solver=deqkit.FixedPoint(),
                             backward=deqkit.Implicit(tol=1e-12), tol=1e-12, max_steps=100)
    (gx,) = torch.autograd.grad(sol.value.square().sum(), x)
    mask = log.masks[0]

    def fixed_mask(z, x, r):  # the same map with the mask as a constant
        return r * (torch.tanh(z) + 1.5) * mask + x

    ref = deqkit.fixed_point(fixed_mask, torch.zeros_like(x), inputs=(x, r), solver=deqkit.FixedPoint(),
                             backward=deqkit.Implicit(tol=1e-12), tol=1e-12, max_steps=100)
    torch.testing.assert_close(sol.value, ref.value, rtol=1e-10, atol=1e-12)
    (gx_ref,) = torch.autograd.grad(ref.value.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-8, atol=1e-10)


def test_two_solves_draw_different_masks():
    drop = VariationalDropout(0.5).train()
    log = MaskLog(drop)
    x, r = dropout_problem(batch=3, dim=16)
    with torch.no_grad():
        first = deqkit.fixed_point(dropout_cell(drop), torch.zeros_like(x), inputs=(x, r), tol=1e-8)
        n_first = len(log.masks)
        second = deqkit.fixed_point(dropout_cell(drop), torch.zeros_like(x), inputs=(x, r), tol=1e-8)
    assert first.success and second.success
    assert all(torch.equal(m, log.masks[0]) for m in log.masks[:n_first])
    assert all(torch.equal(m, log.masks[n_first]) for m in log.masks[n_first:])
    assert not torch.equal(log.masks[0], log.masks[n_first])
    assert not torch.allclose(first.value, second.value)


def test_outside_a_solve_it_is_plain_dropout():
    drop = VariationalDropout(0.25).train()
    x = torch.rand(64, 8, generator=gen(2), dtype=F64) + 1
    torch.manual_seed(2)
    a, b = drop(x), drop(x)
    assert not torch.equal(a, b)  # a fresh mask per call
    for out in (a, b):
        kept = out != 0
        torch.testing.assert_close(out[kept], x[kept] / 0.75)
        assert 0.6 < float(kept.double().mean()) < 0.9


def test_eval_mode_and_p_zero_are_the_identity():
    x, r = dropout_problem()
    for drop in (VariationalDropout(0.3).eval(), VariationalDropout(0.0).train()):
        assert torch.equal(drop(x), x)
        with torch.no_grad():
            sol = deqkit.fixed_point(dropout_cell(drop), torch.zeros_like(x), inputs=(x, r), tol=1e-10)
            ref = deqkit.fixed_point(dropout_cell(nn.Identity()), torch.zeros_like(x), inputs=(x, r), tol=1e-10)
        assert torch.equal(sol.value, ref.value)


@pytest.mark.parametrize("shared_dims", [(1,), (2,), (1, 2)])
def test_shared_dims_share_the_mask(shared_dims):
    drop = VariationalDropout(0.5, shared_dims=shared_dims).train()
    log = MaskLog(drop)
    x = torch.rand(3, 5, 6, generator=gen(3), dtype=F64) + 1
    torch.manual_seed(3)
    outside = drop(x) / x
    with torch.no_grad():
        deqkit.fixed_point(lambda z, x: 0.3 * drop(torch.tanh(z) + 1.5) + x, torch.zeros_like(x), inputs=(x,),
                           tol=1e-8)
    inside = log.masks[-1]
    for mask in (outside, inside):
        for d in shared_dims:  # constant along each shared dim
            first = mask.narrow(d, 0, 1)
            assert torch.equal(mask, first.expand_as(mask))
        assert bool((mask == 0).any()) and bool((mask == 2).any())
    if shared_dims != (1, 2):  # the other dim still varies
        other = 2 if shared_dims == (1,) else 1
        assert not torch.equal(inside, inside.narrow(other, 0, 1).expand_as(inside))


def test_active_set_slices_the_mask_rows():
    x, r = dropout_problem(batch=5, dim=8, seed=4)
    results = {}
    for active_set in (False, True):
        drop = VariationalDropout(0.2).train()
        torch.manual_seed(4)
        with torch.no_grad():
            results[active_set] = deqkit.fixed_point(dropout_cell(drop), torch.zeros_like(x), inputs=(x, r),
                                                     solver=deqkit.FixedPoint(), tol=1e-10, max_steps=100,
                                                     active_set=active_set)
    full, sliced = results[False], results[True]
    assert full.success and sliced.success
    assert len(set(full.stats.steps.tolist())) > 1  # the samples stop at different steps...
    assert sliced.stats.sample_evals < full.stats.sample_evals  # ...so the active set shrinks
    assert torch.equal(sliced.stats.steps, full.stats.steps)
    torch.testing.assert_close(sliced.value, full.value, rtol=1e-12, atol=1e-12)


def test_a_batch_mismatch_inside_a_solve_is_an_error():
    drop = VariationalDropout(0.2).train()
    x = torch.randn(4, 3, dtype=F64)

    def f(z):  # calls the dropout on a tensor whose batch is not the solve's
        return 0.5 * z + drop(torch.ones(2 * z.shape[0], 3, dtype=F64))[: z.shape[0]]

    with pytest.raises(ValueError, match="batch of 8 inside a solve of batch 4"):
        deqkit.fixed_point(f, x)


@pytest.mark.parametrize("p", [1, 1.0, -0.1, 1.5, True, "0.5", float("nan")])
def test_dropout_probability_is_validated(p):
    with pytest.raises(ValueError, match="p must be"):
        VariationalDropout(p)


def test_shared_dims_cannot_include_the_batch():
    with pytest.raises(ValueError, match="batch"):
        VariationalDropout(0.1, shared_dims=(0,))


# -- apply_norm / remove_norm / has_norm -----------------------------------------------------
def small_cell():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4))


def test_weight_norm_keeps_the_function_and_round_trips():
    cell = small_cell()
    x = torch.randn(3, 4, generator=gen(6))
    expected = cell(x)
    assert not has_norm(cell)
    assert apply_norm(cell, "weight") is cell
    assert has_norm(cell)
    for layer in (cell[0], cell[2]):
        assert torch.nn.utils.parametrize.is_parametrized(layer, "weight")
        assert {n for n, _ in layer.named_parameters()} == {
            "bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}
    torch.testing.assert_close(cell(x), expected)  # g = ||v|| at the start: the same weights

    assert remove_norm(cell) is cell
    assert not has_norm(cell)
    assert isinstance(cell[0].weight, nn.Parameter)
    torch.testing.assert_close(cell(x), expected)
    assert remove_norm(cell) is cell  # nothing left to remove: a no-op


def test_spectral_norm_gives_unit_spectral_norm():
    cell = small_cell()
    apply_norm(cell, "spectral")
    cell.eval()
    for layer in (cell[0], cell[2]):
        sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
        assert float(sigma) == pytest.approx(1.0, abs=1e-3)
    x = torch.randn(3, 4, generator=gen(7))
    before = cell(x)
    remove_norm(cell)
    torch.testing.assert_close(cell(x), before)


def test_apply_norm_selects_modules():
    cell = small_cell()
    apply_norm(cell, "weight", exclude=("0",))
    assert not torch.nn.utils.parametrize.is_parametrized(cell[0])
    assert torch.nn.utils.parametrize.is_parametrized(cell[2], "weight")

    conv = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Linear(3, 3))
    apply_norm(conv, "spectral", types=(nn.Conv2d,))
    assert torch.nn.utils.parametrize.is_parametrized(conv[0], "weight")
    assert not torch.nn.utils.parametrize.is_parametrized(conv[1])


def test_apply_norm_errors():
    with pytest.raises(ValueError, match="found no parameter"):
        apply_norm(nn.Sequential(nn.Tanh(), nn.ReLU()))
    with pytest.raises(ValueError, match="found no parameter"):
        apply_norm(small_cell(), names=("no_such_weight",))
    with pytest.raises(ValueError, match="kind"):
        apply_norm(small_cell(), "batch")
    cell = small_cell()
    with pytest.raises(ValueError, match="kind"):
        apply_norm(cell, kind="Spectral")
    assert not has_norm(cell)  # a bad call leaves the module untouched
