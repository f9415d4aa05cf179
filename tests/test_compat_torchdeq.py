"""deqkit.compat.torchdeq: torchdeq code after an import change, with torchdeq's numbers.

Models run twice, on torchdeq 0.1.0 and on the compat layer, from the same weights, input,
start and seed, and must agree to 1e-9 in float64 (they agree to round-off: the solvers are
ports and the layer makes the same calls). Every place where the layer departs from torchdeq
(docs/migrating.md) is asserted here, against torchdeq where it is installed. The client
programs' patterns are in test_compat_clients.py, the random flag sweep in test_compat_sweep.py.
"""

from __future__ import annotations

import argparse
import warnings
import copy
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import deqkit
from deqkit import Result
import deqkit.compat.torchdeq as compat
from deqkit.compat.torchdeq import utils as compat_utils
from deqkit.compat.torchdeq import TorchDEQCompatWarning

F64 = torch.float64
TOL = 1e-9


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees the layer's once-only warnings afresh."""
    compat_utils._warned.clear()
    yield
    compat_utils._warned.clear()


def worst_difference(ours, theirs, path="out"):
    """The largest difference between two nested results (tensors, lists, dicts, numbers),
    relative to the larger magnitude where that exceeds 1; their structures, shapes and NaN
    patterns must be equal."""
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs), (path, sorted(ours), sorted(theirs))
        return max([0.0] + [worst_difference(ours[k], theirs[k], f"{path}[{k!r}]") for k in theirs])
    if isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), (path, len(ours), len(theirs))
        return max([0.0] + [worst_difference(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(ours, theirs))])
    if theirs is None or isinstance(theirs, str):
        assert ours == theirs, path
        return 0.0
    a, b = torch.as_tensor(ours).detach().double().cpu(), torch.as_tensor(theirs).detach().double().cpu()
    assert a.shape == b.shape, (path, a.shape, b.shape)
    assert torch.equal(a.isnan(), b.isnan()), path
    a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    return float(((a - b).abs() / b.abs().clamp_min(1.0)).max()) if a.numel() else 0.0


def assert_same(ours, theirs, tol=TOL):
    worst = worst_difference(ours, theirs)
    assert worst <= tol, worst


def both(fn):
    """``fn(torchdeq)`` and ``fn(compat)``, each from the same seed: ``(theirs, ours)``."""
    torchdeq = pytest.importorskip("torchdeq")
    out = []
    for lib in (torchdeq, compat):
        torch.manual_seed(0)
        out.append(fn(lib))
    return out


def both64(program):
    """``both``, with float64 as the default dtype while each program runs (models built in float64,
    as a program's would be in float32: no ``.double()`` after ``apply_norm``, whose new tensors
    take the default dtype)."""
    def run(lib):
        before = torch.get_default_dtype()
        torch.set_default_dtype(F64)
        try:
            return program(lib)
        finally:
            torch.set_default_dtype(before)

    return both(run)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- three small models written against torchdeq's API -------------------------------------
class MLPCell(nn.Module):
    """z <- tanh(W z + U x + b), a contraction for small W."""

    def __init__(self, d=8):
        super().__init__()
        self.W = nn.Linear(d, d, bias=False)
        self.U = nn.Linear(d, d)
        with torch.no_grad():
            self.W.weight.mul_(0.5)

    def forward(self, z, x):  # (B, d), (B, d)
        return torch.tanh(self.W(z) + self.U(x))


class TinyGETCell(nn.Module):
    """A one-block transformer cell: attention over tokens plus an MLP, injected input."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, z, x):  # (B, N, d), (B, N, d)
        h = self.norm1(z + x)
        h = z + 0.5 * self.attn(h, h, h, need_weights=False)[0]  # (B, N, d)
        return h + 0.5 * self.mlp(self.norm2(h)) - 0.5 * z


class ConvCell(nn.Module):
    """z <- relu(conv(z) + x) / 2 with weight-normed convolutions."""

    def __init__(self, c=2):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.inj = nn.Conv2d(c, c, 1)

    def forward(self, z, x):  # (B, C, H, W)
        return 0.5 * torch.relu(0.3 * self.conv(z) + self.inj(x))


MODELS = {"mlp": (MLPCell, (3, 8)), "get": (TinyGETCell, (2, 3, 8)), "conv": (ConvCell, (2, 2, 4, 4))}


def build(model_name, seed=0):
    """The model (float64), its input, a start and a target, all from ``seed``."""
    torch.manual_seed(seed)
    cls, shape = MODELS[model_name]
    model = cls().double()
    return model, torch.randn(*shape, dtype=F64), 0.1 * torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64)


def run_layer(lib, model_name, flags, train, solver_kwargs=None, norm=None):
    model, x, z0, y = build(model_name)
    if norm:
        torch.manual_seed(3)
        lib.apply_norm(model, norm)
        lib.reset_norm(model)
    deq = lib.get_deq(**flags).train(train)
    torch.manual_seed(4)
    z_out, info = deq(lambda z: model(z, x), z0, solver_kwargs=solver_kwargs)
    out = {"states": [z.detach() for z in z_out], "info": dict(info)}
    if train:
        loss, values = lib.fp_correction(nn.MSELoss(), (z_out, y), return_loss_values=True)
        loss.backward()
        out.update(loss=loss.detach(), values=values, grads=grads(model))
    return out


GET_RECIPE = dict(f_max_iter=0, grad=6, sup_gap=1, eval_f_max_iter=6)
MATRIX = [
    pytest.param("mlp", GET_RECIPE, None, id="mlp-get_recipe"),
    pytest.param("get", GET_RECIPE, None, id="get-get_recipe"),
    pytest.param("conv", GET_RECIPE, "weight_norm", id="conv-get_recipe"),
    pytest.param("mlp", dict(f_solver="anderson", f_max_iter=8, grad=3, tau=0.7), None, id="mlp-anderson-phantom3"),
    pytest.param("get", dict(f_solver="anderson", f_max_iter=10, f_tol=1e-8, grad=2, tau=0.5), None, id="get-anderson"),
    pytest.param("conv", dict(f_solver="broyden", f_max_iter=8, grad=1), "spectral_norm", id="conv-broyden-sn"),
    pytest.param("mlp", dict(f_solver="broyden", f_max_iter=12, f_stop_mode="rel", grad=6, tau=0.9), None, id="mlp-broyden-rel"),
    pytest.param("mlp", dict(f_max_iter=12, grad=2, tau=0.6, sup_loc=[1]), None, id="mlp-fp-suploc"),
    pytest.param("mlp", dict(f_max_iter=5, grad=4, sup_gap=2, sup_loc=[1]), None, id="mlp-fp-supgap-over-suploc"),
    pytest.param("get", dict(f_max_iter=6, ift=True, b_solver="anderson", b_max_iter=12, b_tol=1e-9), None, id="get-fp-ift"),
    pytest.param("mlp", dict(f_solver="anderson", f_max_iter=9, ift=True, b_solver="anderson", b_max_iter=12, n_states=3),
                 None, id="mlp-anderson-ift-nstates3"),
    pytest.param("conv", dict(f_max_iter=8, n_states=2, grad=[1, 2], ift=True), "weight_norm", id="conv-nstates2-ift"),
    pytest.param("mlp", dict(core="indexing", f_max_iter=10, f_tol=1e-12, n_states=2, grad=2), None, id="mlp-indexing"),
    pytest.param("mlp", dict(core="indexing", f_solver="anderson", f_max_iter=10, f_tol=1e-12, indexing=[4, 7], grad=1,
                             ift=True, b_solver="anderson"), None, id="mlp-indexing-ift"),
    pytest.param("mlp", dict(f_solver="simple_fixed_point_iter", f_max_iter=6, indexing=[2], grad=2), None, id="mlp-simple"),
    pytest.param("mlp", dict(f_max_iter=30, f_tol=1e-3, eval_factor=1.5, grad=1), None, id="mlp-fp-early-stop"),
    pytest.param("mlp", dict(f_solver="anderson", f_max_iter=8, hook_ift=True, b_solver="broyden", b_max_iter=10),
                 None, id="mlp-hook_ift-broyden"),
]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("model_name, flags, norm", MATRIX)
def test_same_numbers_as_torchdeq(model_name, flags, norm, train):
    theirs, ours = both(lambda lib: run_layer(lib, model_name, dict(flags), train, norm=norm))
    assert_same(ours, theirs)
    if train:  # not vacuous: every parameter got a gradient
        assert ours["grads"] and all(bool(g.abs().sum() > 0) for g in ours["grads"].values())


def test_solver_kwargs_at_call_time_match():
    flags = dict(f_solver="anderson", f_max_iter=8, grad=2, n_states=2)
    kw = dict(m=3, lam=1e-3, f_max_iter=7)
    assert_same(*reversed(both(lambda lib: run_layer(lib, "mlp", flags, True, solver_kwargs=kw))))


def tanh_map(seed=1, batch=4, dim=6, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    W = scale * torch.randn(dim, dim, generator=g, dtype=F64)
    x = torch.randn(batch, dim, generator=g, dtype=F64)

    def f(z, tau=1.0):
        out = torch.tanh(z @ W.T + x)
        return out if tau == 1.0 else tau * out + (1 - tau) * z

    return f, torch.zeros(batch, dim, dtype=F64)


@pytest.mark.parametrize("name", ["anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"])
@pytest.mark.parametrize("max_iter, tol, mode", [(0, 1e-3, "abs"), (7, 1e-3, "rel"), (15, 1e-10, "abs"), (9, 0, "abs")])
def test_solvers_called_directly_match(name, max_iter, tol, mode):
    f, z0 = tanh_map()
    theirs, ours = both(lambda lib: lib.solver.get_solver(name)(f, z0, max_iter=max_iter, tol=tol, stop_mode=mode,
                                                               indexing=[2, 5]))
    assert_same(ours, theirs, tol=0)  # bitwise


@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_broyden_line_search_matches(scale):
    f, z0 = tanh_map(scale=scale)
    theirs, ours = both(lambda lib: lib.solver.get_solver("broyden")(f, z0, max_iter=10, tol=1e-9, ls=True))
    assert_same(ours, theirs, tol=0)


def round_off_plateau(scale, shift=(0.0, 0.0)):
    """A map whose Broyden residual falls to round-off (about 4e-15) within 30 steps and stays
    there, per sample; ``scale`` multiplies a sample's state (exactly: a power of two), and so
    its residuals; ``shift`` moves a sample's input (the same steps early, other round-off)."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 40, generator=g, dtype=F64)
    A = 0.97 * A / torch.linalg.matrix_norm(A, 2)
    x = torch.randn(1, 40, generator=g, dtype=F64)
    s, x = torch.tensor(scale, dtype=F64)[:, None], x + torch.tensor(shift, dtype=F64)[:, None]
    calls = []

    def f(z):
        calls.append(1)
        return s * torch.tanh(z / s @ A.T + x)

    return f, calls


@pytest.mark.parametrize("scale, shift, stalls", [
    ([1.0, 1.0], [0.0, 0.0], True),   # both samples stalled near tol (the same residuals): the stall test ends the run
    ([1.0, 2.0], [0.0, 0.0], False),  # stalled at residuals a factor 2 apart: it runs on to max_iter
    ([1.0, 1.0], [0.0, 1e-3], None),  # close early, then apart by more than 1.3 at some steps of round-off
])
def test_broyden_stall_test_matches(scale, shift, stalls):
    """torchdeq's Broyden also stops after 30 steps when the worst residual is below 3 tol and the
    samples' residuals are within a factor 1.3 of one another at each of the last 30 steps."""
    f, calls = round_off_plateau(scale, shift)
    z0 = torch.zeros(2, 40, dtype=F64)
    trace = compat.get_solver("broyden")(f, z0, max_iter=80, tol=0.0)[2]["abs_trace"].max(dim=0).values
    assert float(trace[28:].max()) < 1e-13  # the premise: round-off from step 28 on
    tol = 0.9 * float(trace.min())  # the worst sample never gets below tol
    if stalls is not False:  # step 31's worst residual is 2.5 tol: between 2 and 3 tol
        tol = float(trace[31]) / 2.5
        if tol >= float(trace.min()):
            pytest.skip("this machine's round-off residual at step 31 is too far above its lowest one")
    stall = [k for k in range(31, 80) if trace[k] < 3 * tol]  # the steps the stall test may stop at
    calls.clear()
    theirs, ours = both(lambda lib: lib.solver.get_solver("broyden")(f, z0, max_iter=80, tol=tol))
    assert_same(ours, theirs, tol=0)
    if stalls is not None:
        assert len(calls) == 2 * (1 + (stall[0] if stalls else 80))  # one call before the first step
    assert float(ours[2]["abs_lowest"].max()) >= tol  # the batch never met tol


def test_nan_reaches_value_and_info_as_in_torchdeq():
    """torchdeq mixes each sample's best estimate in by multiplication, so a NaN step propagates."""
    def f(z):
        out = torch.cos(z)
        return torch.cat([out[:1], out[1:] * float("nan")])

    z0 = torch.zeros(2, 3, dtype=F64)
    for name in ("fixed_point_iter", "anderson", "broyden"):
        theirs, ours = both(lambda lib: lib.solver.get_solver(name)(f, z0, max_iter=6, tol=1e-3))
        assert_same(ours, theirs, tol=0)
        assert bool(ours[0][1].isnan().all()) and bool(ours[2]["abs_lowest"][1].isnan())
    theirs, ours = both(lambda lib: lib.get_deq(f_solver="anderson", f_max_iter=6).eval()(f, z0))
    assert_same(ours, theirs, tol=0)

    def g(z):  # inf at the start, then finite: torchdeq's 1 * f(x) + 0 * x with x = inf is NaN
        return torch.where(z == 0, float("inf"), torch.tanh(z))

    theirs, ours = both(lambda lib: lib.solver.get_solver("fixed_point_iter")(g, z0, max_iter=3, tol=1e-3))
    assert_same(ours, theirs, tol=0)
    assert bool(ours[0].isnan().all())


def test_ties_keep_the_first_lowest_residual():
    """A residual equal to the lowest so far does not replace it (nstep is the first step it was reached)."""
    zero = lambda z: torch.zeros_like(z)  # noqa: E731  (the fixed point after one step: residual 0, 0, 0, ...)
    z0 = torch.ones(2, 3, dtype=F64)
    for name in ("fixed_point_iter", "anderson", "broyden"):
        theirs, ours = both(lambda lib: lib.solver.get_solver(name)(zero, z0, max_iter=6, tol=0.0))
        assert_same(ours, theirs, tol=0)
    assert ours[2]["nstep"].tolist() == [1.0, 1.0]


def test_no_torchdeq_needed():
    code = ("import sys, torch; sys.modules['torchdeq'] = None  # as if not installed\n"
            "import deqkit.compat.torchdeq as c\n"
            "z, info = c.get_deq(f_solver='broyden', f_max_iter=5, ift=True)(torch.cos, torch.zeros(2, 3))\n"
            "assert len(z) == 1 and info['nstep'].shape == (2,)\n")
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True)


# -- one translation of a torchdeq-style run into deqkit's record ---------------------------------
def test_layer_and_torchdeq_solver_share_the_record():
    """The layer's solve and deqkit.TorchDEQSolver read the same record off the same run."""
    torchdeq = pytest.importorskip("torchdeq")
    from deqkit.solvers._torchdeq import run_torchdeq_style

    f, z0 = tanh_map(batch=3)
    with torch.no_grad():
        sol = deqkit.fixed_point(f, z0, solver=deqkit.TorchDEQSolver("anderson", m=4), tol=1e-6, stop_mode="abs",
                                 max_steps=20)
        port, _, _ = run_torchdeq_style(compat.get_solver("anderson"), f, z0, max_iter=20, tol=1e-6, stop_mode="abs",
                                        divergence=1e4, m=4, preimage=True)
        real, _, _ = run_torchdeq_style(torchdeq.solver.get_solver("anderson"), f, z0, max_iter=20, tol=1e-6,
                                        stop_mode="abs", divergence=1e4, m=4, preimage=True)
    for out in (port, real):
        assert torch.equal(out.best_fz, sol.value) and torch.equal(out.residual, sol.stats.residual)
        assert torch.equal(out.status, sol.stats.status) and torch.equal(out.steps, sol.stats.steps)
        assert torch.equal(out.trace, sol.stats.trace) and out.nfev == sol.stats.nfev
    assert torch.equal(f(port.best_z), port.best_fz)  # the preimage: the z whose image is the value


def test_record_preimage_is_the_call_that_gave_the_value():
    """A growing oscillation (its residual is lowest at the second call) with a constant component:
    the value is the second image, and only the second call's z maps to all of it."""
    from deqkit.solvers._torchdeq import run_torchdeq_style

    def f(z):
        return torch.cat([-1.5 * z[:, :1] + 1, torch.ones_like(z[:, 1:])], dim=1)

    z0 = torch.zeros(2, 3, dtype=F64)
    with torch.no_grad():
        out, _, _ = run_torchdeq_style(compat.get_solver("fixed_point_iter"), f, z0, max_iter=5, tol=1e-12,
                                       stop_mode="abs", preimage=True)
    z1 = f(z0)
    assert torch.equal(out.best_fz, f(z1)) and torch.equal(out.best_z, z1)


def test_record_status_rules():
    from deqkit.solvers._torchdeq import run_torchdeq_style

    fp = compat.get_solver("fixed_point_iter")
    rates = torch.tensor([[0.1], [0.9], [2.0]], dtype=F64)
    z0 = torch.ones(3, 2, dtype=F64)

    def f(z):
        return torch.cat([rates[:2] * z[:2], torch.where(z[2:] > 1e3, z[2:] * float("nan"), 2 * z[2:])])

    with torch.no_grad():
        out, _, _ = run_torchdeq_style(fp, f, z0, max_iter=12, tol=1e-3, stop_mode="abs", divergence=100.0)
        grown, _, _ = run_torchdeq_style(fp, lambda z: rates * z, z0, max_iter=12, tol=1e-3, stop_mode="abs",
                                         divergence=100.0)
        fixed, _, _ = run_torchdeq_style(fp, lambda z: rates[:2] * z, z0[:2], max_iter=4, tol=0.0, stop_mode="rel",
                                         fixed=True, keep=2)
    assert out.status.tolist() == [Result.SUCCESS, Result.MAX_STEPS, Result.NONFINITE] and out.nfev == 12
    assert out.steps.tolist() == [5, 12, 12] and out.trace.shape == (3, 12)
    assert grown.status.tolist() == [Result.SUCCESS, Result.MAX_STEPS, Result.DIVERGED]  # DIVERGED: grew past 100 times its first residual
    assert fixed.status.tolist() == [0, 0] and fixed.steps.tolist() == [4, 4] and len(fixed.trajectory) == 2
    assert torch.equal(fixed.trajectory[-1][1], fixed.best_fz)
    calls = []

    def jump(z):  # the second call throws the iterate far out; then it contracts back below tol
        calls.append(1)
        return 1000 * z if len(calls) == 2 else 0.5 * z

    with torch.no_grad():
        back, _, _ = run_torchdeq_style(fp, jump, z0[:1], max_iter=40, tol=1e-3, stop_mode="abs", divergence=100.0)
    assert back.status.tolist() == [0]  # below tol again: SUCCESS, not DIVERGED
    with torch.no_grad():
        exact, _, _ = run_torchdeq_style(fp, torch.zeros_like, z0[:1], max_iter=3, tol=0.0, stop_mode="abs")
    assert exact.status.tolist() == [0] and exact.steps.tolist() == [2]  # a residual of exactly tol meets it

    def forgetful(func, x0, **kwargs):  # a registered solver that reports a finite best after a NaN call
        func(x0 * float("nan"))
        return func(x0), [], {"abs_lowest": torch.zeros(x0.shape[0])}

    with torch.no_grad():
        seen, _, _ = run_torchdeq_style(forgetful, torch.zeros_like, z0[:1], max_iter=3, tol=1e-3, stop_mode="abs")
    assert seen.status.tolist() == [Result.NONFINITE] and seen.nfev == 2  # NONFINITE: a call's residual was NaN


# -- norms: torchdeq's names, numbers and writes ----------------------------------------------
def normed(lib, norm_type, seed=0, **kwargs):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Conv1d(5, 3, 1), nn.ConvTranspose1d(3, 2, 2)).double()
    torch.manual_seed(seed + 1)
    lib.apply_norm(net, norm_type, **kwargs)
    return net


def body(net, x):  # (B, L, 4) -> (B, 2, L + 1)
    return net[3](net[2](net[1](net[0](x)).transpose(1, 2)))


NORMS = [("weight_norm", {}), ("weight_norm", {"learn_scale": False}), ("weight_norm", {"clip": True, "clip_value": 0.5}),
         ("spectral_norm", {}), ("spectral_norm", {"learn_scale": False, "target_norm": 0.7}),
         ("spectral_norm", {"n_power_iterations": 2, "clip": True})]


@pytest.mark.parametrize("norm_type, kwargs", NORMS)
def test_norms_have_torchdeqs_parameters_and_train_the_same(norm_type, kwargs):
    def train(lib):
        net = normed(lib, norm_type, **kwargs)
        opt = torch.optim.Adam(net.parameters(), lr=0.05)
        x = torch.randn(2, 3, 4, dtype=F64)
        outs = []
        for _ in range(3):
            lib.reset_norm(net)
            opt.zero_grad()
            y = body(net, x)
            y.pow(2).sum().backward()
            opt.step()
            outs.append((y.detach(), grads(net)))
        return [n for n, _ in net.named_parameters()], list(net.state_dict()), outs, opt.state_dict()

    theirs, ours = both(train)
    assert ours[0] == theirs[0] and ours[1] == theirs[1]  # names, in torchdeq's order
    assert_same(ours[2:], theirs[2:])


@pytest.mark.parametrize("norm_type", ["weight_norm", "spectral_norm"])
def test_checkpoints_load_both_ways_strictly(norm_type):
    torchdeq = pytest.importorskip("torchdeq")
    theirs, ours = normed(torchdeq, norm_type), normed(compat, norm_type, seed=5)
    with torch.no_grad():
        for p in theirs.parameters():
            p.mul_(1.3).add_(0.01)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    torchdeq.reset_norm(theirs)
    x = torch.randn(2, 3, 4, dtype=F64)
    assert torch.equal(body(ours, x), body(theirs, x))
    back = normed(torchdeq, norm_type, seed=9).eval()
    back.load_state_dict(ours.state_dict())
    torchdeq.reset_norm(back)
    assert torch.equal(body(back, x), body(theirs, x))


@pytest.mark.parametrize("norm_type", ["weight_norm", "spectral_norm"])
def test_init_after_apply_norm_goes_where_torchdeqs_goes(norm_type):
    """deq-seq's weights_init: nn.init on m.weight after apply_norm, then training."""
    def run(lib):
        net = normed(lib, norm_type)
        for m in net.modules():
            if hasattr(m, "weight") and m.weight is not None and not isinstance(m, nn.Tanh):
                nn.init.normal_(m.weight, 0.0, 0.1)
        lib.reset_norm(net)
        out = body(net, torch.ones(1, 2, 4, dtype=F64))
        return out.detach(), {k: v.clone() for k, v in net.state_dict().items()}

    if norm_type == "weight_norm":  # torchdeq drops the write at reset_norm; so does the layer, saying so
        with pytest.warns(TorchDEQCompatWarning, match=r"write into (Linear|Conv1d|ConvTranspose1d).weight after apply_norm is dropped"):
            theirs, ours = both(run)
    else:  # torchdeq's weight is weight_orig's data until the first reset_norm: the write lands there
        theirs, ours = both(run)
        assert not torch.equal(ours[1]["0.weight_orig"], normed(compat, norm_type)[0].weight_orig)
    assert_same(ours, theirs, tol=0)


def test_spectral_norm_write_after_reset_is_dropped_with_a_warning():
    def run(lib):
        net = normed(lib, "spectral_norm")
        lib.reset_norm(net)
        nn.init.normal_(net[0].weight)
        lib.reset_norm(net)
        return body(net, torch.ones(1, 2, 4, dtype=F64)).detach()

    with pytest.warns(TorchDEQCompatWarning, match="dropped"):
        theirs, ours = both(run)
    assert_same(ours, theirs, tol=0)


def test_normed_weight_is_current_deepcopies_and_pickles():
    """torchdeq's weight is stale after an optimizer step (until reset_norm), cannot be deep-copied
    and raises "backward through the graph a second time" when reset_norm is forgotten."""
    net = normed(compat, "weight_norm")
    lin = net[0]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(2):  # no reset_norm between the steps
        opt.zero_grad()
        lin(torch.ones(1, 4, dtype=F64)).sum().backward()
        opt.step()
    g, v = lin.weight_g, lin.weight_v
    assert torch.equal(lin.weight, v * (g / v.norm(dim=1, keepdim=True)))
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(net), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(1, 3, 4, dtype=F64)
    assert torch.equal(body(loaded, x), body(net, x)) and type(loaded[0]).__name__ == "Linear"
    assert torch.equal(body(net.float(), x.float()), body(loaded.float(), x.float()))  # .to() keeps it current
    assert isinstance(loaded[0], nn.Linear) and type(loaded[0]) is not nn.Linear
    compat.remove_norm(loaded)
    assert type(loaded[0]) is nn.Linear and isinstance(loaded[0].weight, nn.Parameter)
    assert [n for n, _ in loaded.named_parameters()] == ["0.bias", "0.weight", "2.bias", "2.weight", "3.bias", "3.weight"]


def test_forgetting_reset_norm_does_not_break_the_second_backward():
    """torchdeq computes the weight at reset_norm: a second forward and backward without one (with
    gradient accumulation, say) goes through the freed graph of the first."""
    torchdeq = pytest.importorskip("torchdeq")
    for lib in (torchdeq, compat):
        net = normed(lib, "weight_norm")
        lib.reset_norm(net)
        body(net, torch.ones(1, 2, 4, dtype=F64)).sum().backward()
        if lib is torchdeq:
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                body(net, torch.ones(1, 2, 4, dtype=F64)).sum().backward()
        else:
            first = {n: p.grad.clone() for n, p in net.named_parameters()}
            body(net, torch.ones(1, 2, 4, dtype=F64)).sum().backward()
            assert all(torch.allclose(p.grad, 2 * first[n]) for n, p in net.named_parameters())


def test_a_write_after_to_still_lands_in_weight_orig():
    """torchdeq's weight is an alias of weight_orig's data until the first reset_norm, but ``.to()``
    (here ``.double()``) leaves the alias behind: the write is lost there. Here it lands."""
    torchdeq = pytest.importorskip("torchdeq")
    for lib in (torchdeq, compat):
        torch.manual_seed(0)
        net = nn.Linear(3, 3)
        lib.apply_norm(net, "spectral_norm")
        net.double()
        nn.init.constant_(net.weight, 0.25)
        lib.reset_norm(net)
        landed = bool((net.weight_orig == 0.25).all())
        assert landed == (lib is compat) and net.weight_orig.dtype == F64


def test_spectral_norm_is_normalised_before_the_first_reset():
    """torchdeq's weight is the raw weight_orig (without a gradient) until the first reset_norm."""
    torchdeq = pytest.importorskip("torchdeq")
    theirs, ours = normed(torchdeq, "spectral_norm"), normed(compat, "spectral_norm")
    assert torch.equal(theirs[0].weight, theirs[0].weight_orig) and not theirs[0].weight.requires_grad
    assert not torch.equal(ours[0].weight, ours[0].weight_orig) and ours[0].weight.requires_grad
    torchdeq.reset_norm(theirs.eval())
    assert torch.equal(ours[0].weight, theirs[0].weight)


def test_normalising_twice_is_refused():
    net = normed(compat, "weight_norm")
    with pytest.raises(ValueError, match="already normalised.*torchdeq fails with a KeyError"):
        compat.apply_norm(net, "spectral_norm")
    with pytest.raises(ValueError, match="unknown norm_type 'weightnorm'"):
        compat.apply_norm(nn.Linear(2, 2), "weightnorm")


# -- what torchdeq ignores: one warning, the same numbers ---------------------------------------
def test_program_flags_pass_and_misspellings_warn_once():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gma", action="store_true")  # DEQ-Flow's own flag, close to 'gamma'
    parser.add_argument("--f_thres", type=int, default=30)  # an old DEQ repository's name for f_max_iter
    compat.add_deq_args(parser)
    args = parser.parse_args(["--gma"])
    with pytest.warns(TorchDEQCompatWarning, match="ignores 'f_thres' \\(did you mean 'f_max_iter'\\?\\)") as record:
        deq = compat.get_deq(args)
        compat.get_deq(args)
        compat.apply_norm(nn.Linear(2, 2), args=args)
    assert len(record) == 1 and deq.f_max_iter == 40
    with pytest.warns(TorchDEQCompatWarning, match="ignores 'f_max_itr' \\(did you mean 'f_max_iter'\\?\\), as torchdeq"):
        deq = compat.get_deq(args, f_max_itr=3)
    assert deq.f_max_iter == 40 and args.f_max_itr == 3  # like torchdeq, the keyword lands in the namespace
    with pytest.warns(TorchDEQCompatWarning, match="ignores 'no_stat'"):  # only DEQSliced(no_stat=...) reads it
        assert compat.get_deq(f_solver="simple_fixed_point_iter", no_stat=False).no_stat
    assert not compat.DEQSliced(f_solver="simple_fixed_point_iter", no_stat=False).no_stat


@pytest.mark.parametrize("kwargs, match", [(dict(writer=print), "'writer' \\(did you mean 'backward_writer'\\?\\)"),
                                           (dict(best={"epe": 1.0}), "the DEQ call ignores 'best', as torchdeq does")])
def test_call_keywords_are_ignored_with_one_warning(kwargs, match):
    f, z0 = tanh_map()
    deq = compat.get_deq(f_max_iter=5)
    with pytest.warns(TorchDEQCompatWarning, match=match) as record:
        a, _ = deq(f, z0, **kwargs)
        b, _ = deq(f, z0, **kwargs)
    assert len(record) == 1 and torch.equal(a[0], b[0]) and torch.equal(a[0], deq(f, z0)[0][0])


def test_solver_keywords_the_solver_does_not_read_are_ignored_with_one_warning():
    f, z0 = tanh_map()
    with pytest.warns(TorchDEQCompatWarning, match="torchdeq's broyden ignores 'tau'"):
        theirs, ours = both(lambda lib: lib.get_deq(f_solver="broyden", f_max_iter=6)(f, z0, solver_kwargs={"tau": 0.5}))
    assert_same(ours, theirs, tol=0)
    with pytest.warns(TorchDEQCompatWarning, match="ignores 'lamda' \\(did you mean 'lam'\\?\\)"):
        compat.get_solver("anderson")(f, z0, max_iter=3, lamda=0.1)


def test_fp_correction_keywords_as_torchdeq():
    states = [torch.randn(3, 4, dtype=F64) for _ in range(3)]
    y = torch.randn(3, 4, dtype=F64)
    for wf, kw in (("exp", {}), ("exp", dict(gamma=0.5)), ("linear", {}), ("linear", dict(gamma=0.5, bias=0.1)),
                   ("exp", dict(gama=0.5))):
        if "gama" in kw:
            with pytest.warns(TorchDEQCompatWarning, match="ignores 'gama' \\(did you mean 'gamma'\\?\\)"):
                theirs, ours = both(lambda lib: lib.fp_correction(nn.MSELoss(), (states, y), weight_func=wf,
                                                                  return_loss_values=True, **kw))
        else:
            theirs, ours = both(lambda lib: lib.fp_correction(nn.MSELoss(), (states, y), weight_func=wf,
                                                              return_loss_values=True, **kw))
        assert_same(ours, theirs, tol=0)
    # 'const': torchdeq calls .cuda() and returns a vector of weights; here each weight is c
    assert compat.fp_correction(lambda a: a.sum(), ([torch.ones(1), 2 * torch.ones(1)],), "const", c=0.5) == 1.5


def test_jac_reg_and_power_method_match():
    z, W = torch.randn(2, 4, dtype=F64, requires_grad=True), torch.randn(4, 4, dtype=F64)
    theirs, ours = both(lambda lib: (lib.jac_reg(torch.tanh(z @ W), z, vecs=2), lib.power_method(torch.tanh(z @ W), z, n_iters=5)))
    assert_same(ours, theirs, tol=0)


# -- where torchdeq crashes or is silently wrong: an error naming what torchdeq would do ---------
@pytest.mark.parametrize("kwargs, match", [
    (dict(f_solver="andersen"), "unknown solver 'andersen' \\(did you mean 'anderson'\\?\\)"),
    (dict(f_stop_mode="relative"), "f_stop_mode must be 'abs' or 'rel'.*KeyError"),
    (dict(grad=0), "grad must be an integer >= 1.*AssertionError"),
    (dict(grad=[1, 2], n_states=3), "cannot pair the 2 gradient settings"),
    (dict(core="slice"), "unknown core 'slice'"),
    (dict(f_tol=None), "f_tol must be a number"),
    (dict(n_states=2.0), "n_states must be an integer"),
    (dict(indexing=[50]), "indexing=\\[50\\] with f_max_iter=40.*segments of \\[50, -10\\]"),
    (dict(indexing=[8, 4], f_max_iter=10), "indexing=\\[8, 4\\].*segments of \\[8, -4, 6\\]"),
    (dict(core="indexing", indexing=[50]), "indexing=\\[50\\] with f_max_iter=40: steps must lie in 1..f_max_iter"),
])
def test_bad_configurations_raise_naming_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compat.get_deq(**kwargs)


def test_indexing_past_a_run_time_budget_raises():
    f, z0 = tanh_map()
    deq = compat.get_deq(indexing=[5])
    with pytest.raises(ValueError, match="indexing=\\[5\\] with f_max_iter=0"):
        deq(f, z0, solver_kwargs={"f_max_iter": 0})
    deq = compat.get_deq(core="indexing", indexing=[5])
    with pytest.raises(ValueError, match="indexing=\\[5\\] with f_max_iter=3"):
        deq(f, z0, solver_kwargs={"f_max_iter": 3})


def test_solver_inputs_torchdeq_crashes_on_raise_with_the_argument():
    f, z0 = tanh_map()
    with pytest.raises(TypeError, match="max_iter must be an integer, got 5.0"):
        compat.get_solver("fixed_point_iter")(f, z0, max_iter=5.0)
    with pytest.raises(ValueError, match="stop_mode must be 'abs' or 'rel', got 'l2'"):
        compat.get_solver("anderson")(f, z0, stop_mode="l2")
    with pytest.raises(ValueError, match="m must be an integer >= 2"):
        compat.get_solver("anderson")(f, z0, m=1)
    with pytest.raises(ValueError, match="LBFGS_thres .* got -3"):
        compat.get_solver("broyden")(f, z0, max_iter=-3)


# -- torchdeq's own values where they look odd --------------------------------------------------
def test_zero_tolerances_and_float_budgets_run_as_in_torchdeq():
    for flags, train in ((dict(f_max_iter=7, f_tol=0), True), (dict(f_max_iter=6, ift=True, b_tol=0, b_max_iter=5), True),
                         (dict(f_max_iter=9.0, f_solver="anderson"), False), (dict(f_max_iter=9.0, n_states=2), True)):
        theirs, ours = both(lambda lib: run_layer(lib, "mlp", dict(flags), train))
        assert_same(ours, theirs, tol=0)
    ours = run_layer(compat, "mlp", dict(f_max_iter=7, f_tol=0), False)
    trace = ours["info"]["abs_trace"]  # every step ran: no residual repeated as padding
    assert trace.shape == (3, 8) and bool((trace[:, 2:] < trace[:, 1:-1]).all())


@pytest.mark.parametrize("flags", [
    dict(core="indexing", f_solver="anderson", f_max_iter=3, n_states=3),  # anderson never samples steps 1 and 2
    dict(core="indexing", f_solver="anderson", f_max_iter=9, n_states=3, ift=True),  # stops before step 6
    dict(core="indexing", f_max_iter=10, n_states=3, f_tol=0, grad=2),  # 3 does not divide 10: steps 4, 7, 10
    dict(core="indexing", f_solver="broyden", f_max_iter=10, indexing=[3, 6], f_tol=0, grad=2),  # one step early
])
def test_indexing_core_samples_as_torchdeq(flags):
    expect_fewer = flags.get("f_tol") != 0
    if expect_fewer:  # fewer states than asked for, and the IFT functor dropped: kept, with one warning
        with pytest.warns(TorchDEQCompatWarning, match="fewer states come back than asked for"):
            theirs, ours = both(lambda lib: run_layer(lib, "mlp", dict(flags), True))
        assert len(ours["states"]) < 3
    else:
        theirs, ours = both(lambda lib: run_layer(lib, "mlp", dict(flags), True))
    assert_same(ours, theirs, tol=0)


def test_hook_ift_is_torchdeqs_hook_gradient():
    """On an unconverged solve torchdeq's hook_ift (J at z*) and ift (J at f(z*)) differ; each matches."""
    flags = dict(f_solver="anderson", f_max_iter=3, b_solver="anderson", b_max_iter=30, b_tol=1e-12)
    hook = both(lambda lib: run_layer(lib, "mlp", dict(flags, hook_ift=True), True))
    ift = both(lambda lib: run_layer(lib, "mlp", dict(flags, ift=True), True))
    assert_same(hook[1], hook[0])
    assert_same(ift[1], ift[0])
    assert worst_difference(hook[1]["grads"], ift[1]["grads"]) > 1e-4


def test_hook_ift_twice_before_backward_is_bounded_and_repeatable():
    """torchdeq's hook recurses without bound here, and gives a one-step gradient the second time."""
    torch.manual_seed(0)
    W = (0.3 * torch.randn(4, 4, dtype=F64)).requires_grad_()
    f = lambda z: torch.tanh(z @ W.T + 1.0)  # noqa: E731
    deq = compat.get_deq(f_max_iter=300, f_tol=1e-13, hook_ift=True, b_tol=1e-13, b_max_iter=300)
    a, _ = deq(f, torch.zeros(2, 4, dtype=F64))
    b, _ = deq(f, torch.zeros(2, 4, dtype=F64))
    loss = a[-1].sum() + b[-1].sum()
    (g1,) = torch.autograd.grad(loss, W, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, W)
    assert torch.equal(g1, g2)
    z = torch.zeros(2, 4, dtype=F64)
    for _ in range(100):  # the implicit gradient, by back-propagating through a long converged iteration
        z = f(z)
    (exact,) = torch.autograd.grad(2 * z.sum(), W)
    torch.testing.assert_close(g1, exact, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("flag", ["ift", "hook_ift"])
def test_second_derivative_through_ift_raises(flag):
    W = (0.3 * torch.eye(3, dtype=F64)).requires_grad_()
    z_out, _ = compat.get_deq(f_max_iter=10, **{flag: True})(lambda z: torch.tanh(z @ W.T + 1.0), torch.zeros(2, 3, dtype=F64))
    with pytest.raises(RuntimeError, match="second derivatives.*torchdeq silently returns a partial one"):
        torch.autograd.grad(z_out[-1].sum(), W, create_graph=True)


def test_mem_gc_on_a_data_parallel_replica():
    """A replica holds its parameters as plain tensors: mem_gc finds them there, as torchdeq's does."""
    lin = nn.Linear(3, 3).double()
    weight, bias = lin.weight.detach().clone().requires_grad_(), lin.bias.detach().clone().requires_grad_()
    replica = nn.Linear(3, 3).double()
    del replica._parameters["weight"], replica._parameters["bias"]
    replica.weight, replica.bias, replica._is_replica = weight, bias, True
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    compat.mem_gc(replica, (x,)).pow(2).sum().backward()
    expected = torch.autograd.grad(lin(x).pow(2).sum(), [lin.weight, lin.bias, x])
    for got, want in zip((weight.grad, bias.grad, x.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_backward_writer_gets_the_adjoint_solves_stats():
    records = [], []
    for lib, seen in zip(both(lambda lib: lib), records):
        model, x, z0, _ = build("mlp")
        z_out, _ = lib.get_deq(f_max_iter=6, ift=True, b_max_iter=9)(lambda z: model(z, x), z0, backward_writer=seen.append)
        z_out[-1].sum().backward()
    assert len(records[1]) == 1 and set(records[1][0]) == set(records[0][0])
    assert_same(records[1], records[0], tol=0)


# -- the rest of the API -------------------------------------------------------------------------
def test_add_deq_args_same_options_and_defaults():
    torchdeq = pytest.importorskip("torchdeq")
    for argv in ([], ["--f_solver", "anderson", "--grad", "2", "3", "--ift", "--indexing", "4", "8"]):
        ours, theirs = argparse.ArgumentParser(), argparse.ArgumentParser()
        compat.add_deq_args(ours), torchdeq.add_deq_args(theirs)
        assert vars(ours.parse_args(argv)) == vars(theirs.parse_args(argv))


@pytest.mark.parametrize("name, shape, token_first", [
    ("VariationalDropout", (2, 3, 4), None),
    ("VariationalDropout1d", (2, 3, 4), True),
    ("VariationalDropout2d", (2, 3, 4, 5), False),
    ("VariationalDropout3d", (2, 3, 4, 5, 2), True),
    ("VariationalDropToken1d", (2, 3, 4), False),
    ("VariationalDropToken2d", (2, 3, 4, 5), True),
    ("VariationalDropToken3d", (2, 3, 4, 5, 2), False),
])
def test_variational_dropout_same_masks_as_torchdeq(name, shape, token_first):
    kw = {} if token_first is None else dict(token_first=token_first)
    x = torch.randn(*shape, dtype=F64)

    def masks(lib):
        layer = getattr(lib, name)(0.3, **kw)
        first = layer(x)
        assert torch.equal(layer(x), first)  # one mask until reset
        lib.reset_deq(layer)
        return first, layer(x), layer.eval()(x)

    theirs, ours = both(masks)
    assert_same(ours, theirs, tol=0)


def test_dropout_masks_follow_the_input_device():
    """torchdeq draws masks on the CPU and multiplies them with the input: a crash off the CPU."""
    torchdeq = pytest.importorskip("torchdeq")
    x = torch.ones(2, 3, 4, device="meta")
    with pytest.raises(RuntimeError):
        torchdeq.VariationalDropout1d(0.3)(x)
    assert compat.VariationalDropout1d(0.3)(x).device == x.device


def test_list_states_with_simple_fixed_point_iter_run_where_torchdeq_fails():
    """With no_stat (simple_fixed_point_iter's default) torchdeq keeps a list of states and fails on
    hook_ift and sradius; the layer always flattens them into one vector (the same numbers)."""
    torchdeq = pytest.importorskip("torchdeq")
    lin = nn.Linear(3, 3).double()
    f = lambda a, b: (0.5 * torch.tanh(lin(b)), 0.5 * torch.cos(a))  # noqa: E731
    z0 = [torch.zeros(2, 3, dtype=F64), torch.ones(2, 3, dtype=F64)]
    for flags, train, kwargs in ((dict(hook_ift=True), True, {}), ({}, False, dict(sradius_mode=True))):
        flags = dict(flags, f_solver="simple_fixed_point_iter", f_max_iter=5)
        with pytest.raises(AttributeError, match="'(list|tuple)' object has no attribute 'requires_grad_'"):
            torchdeq.get_deq(**flags).train(train)(f, z0, **kwargs)
        z_out, _ = compat.get_deq(**flags).train(train)(f, z0, **kwargs)
        plain, _ = torchdeq.get_deq(f_solver="simple_fixed_point_iter", f_max_iter=5 + train).eval()(f, z0)
        assert all(torch.equal(a.detach(), b) for a, b in zip(z_out[-1], plain[-1]))


def test_list_states_sradius_mem_gc_and_mixed_init_match():
    def run(lib):
        lin = nn.Linear(3, 3).double()
        x = torch.randn(2, 3, dtype=F64)
        f = lambda a, b: (0.5 * torch.tanh(lin(b) + x), 0.5 * torch.cos(lib.mem_gc(lin, (a,))))  # noqa: E731
        z_out, info = lib.get_deq(f_solver="anderson", f_max_iter=8, grad=2, n_states=2)(
            f, (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)))
        sum(z[0].sum() + z[1].pow(2).sum() for z in z_out).backward()
        deq = lib.get_deq(f_solver="anderson", f_max_iter=8).eval()
        ev, ev_info = deq(f, [torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)], sradius_mode=True)
        return z_out, info, grads(lin), ev, ev_info, lib.mixed_init((4, 5))

    theirs, ours = both(run)
    assert len(ours[0]) == 2 and isinstance(ours[0][-1], list) and ours[0][-1][0].shape == (2, 3)
    assert_same(ours, theirs)


def test_get_style_transformer_trains_unchanged():
    """A GET-style DEQ transformer (f_max_iter=0, grad=6, sup_gap=1) from an add_deq_args namespace."""
    argv = ["--f_max_iter", "0", "--grad", "6", "--sup_gap", "1", "--eval_f_max_iter", "6", "--norm_type", "weight_norm"]

    def run(lib):
        parser = argparse.ArgumentParser()
        lib.add_deq_args(parser)
        args = parser.parse_args(argv)
        cell = TinyGETCell().double()
        lib.apply_norm(cell, args=args)
        deq, embed, head = lib.get_deq(args), nn.Linear(4, 8).double(), nn.Linear(8, 3).double()
        x, target = torch.randn(4, 5, 4, dtype=F64), torch.tensor([0, 2, 1, 0])
        lib.reset_norm(cell)
        u = embed(x)
        z_out, _ = deq(lambda z: cell(z, u), torch.zeros_like(u))
        loss, values = lib.fp_correction(nn.CrossEntropyLoss(), ([head(z.mean(1)) for z in z_out], target),
                                         return_loss_values=True)
        loss.backward()
        with torch.no_grad():
            ev, _ = deq.eval()(lambda z: cell(z, u), torch.zeros_like(u))
        return loss, values, grads(cell), ev

    theirs, ours = both(run)
    assert len(ours[1]) == 6
    assert_same(ours, theirs)


# torchdeq's module paths that programs import from (DEQ-Flow's `torchdeq.utils.layer_utils`,
# scripts importing `torchdeq.solver.broyden` or `torchdeq.solver.stat`), with the names each holds
MODULE_PATHS = {
    "core": ["get_deq", "reset_deq", "register_deq", "DEQSliced", "DEQIndexing"],
    "dropout": ["VariationalDropout", "VariationalDropout2d", "VariationalDropToken1d", "reset_dropout"],
    "grad": ["backward_factory", "make_pair"],
    "loss": ["fp_correction", "jac_reg", "power_method", "register_weight_func"],
    "loss.correction": ["fp_correction", "register_weight_func"],
    "loss.jacobian": ["jac_reg", "power_method"],
    "norm": ["apply_norm", "register_norm", "register_norm_module", "remove_norm", "reset_norm"],
    "norm.base_norm": ["apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module"],
    "norm.spectral_norm": ["SpectralNorm"],
    "norm.weight_norm": ["WeightNorm"],
    "solver": ["register_solver", "get_solver", "solver_stat_from_final_step", "anderson_solver", "broyden_solver"],
    "solver.anderson": ["anderson_solver"],
    "solver.broyden": ["broyden_solver"],
    "solver.fp_iter": ["fixed_point_iter", "simple_fixed_point_iter"],
    "solver.stat": ["SolverStat"],
    "utils": ["add_deq_args", "mem_gc", "mixed_init"],
    "utils.arg_utils": ["add_deq_args"],
    "utils.config": ["DEQConfig"],
    "utils.init": ["mixed_init"],
    "utils.layer_utils": ["DEQWrapper", "MDEQWrapper", "SpeedyMDEQWrapper", "deq_decorator"],
    "utils.mem": ["mem_gc"],
}


def test_torchdeq_module_paths_import_in_a_fresh_interpreter():
    """`from torchdeq.<path> import <name>` works with the prefix changed, as a program's first
    import (nothing of the layer loaded before it) and as `import a.b.c` attribute access."""
    code = ""
    for path, names in MODULE_PATHS.items():
        code += (f"from deqkit.compat.torchdeq.{path} import {', '.join(names)}\n"
                 f"import deqkit.compat.torchdeq.{path}\n"
                 f"assert deqkit.compat.torchdeq.{path}.{names[0]} is {names[0]}\n")
    for path in ("loss.correction", "utils.layer_utils", "solver.broyden"):  # each first in its own interpreter
        first = f"from deqkit.compat.torchdeq.{path} import {MODULE_PATHS[path][0]}\n"
        done = subprocess.run([sys.executable, "-c", first + code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_module_paths_hold_torchdeqs_public_names():
    """Every torchdeq 0.1.0 module path has a twin here holding the names torchdeq's declares
    (its ``__all__``, else the functions and classes defined there); only the solver's private
    helper file ``torchdeq.solver.utils`` has none (docs/migrating.md)."""
    import importlib
    import inspect
    import pkgutil
    torchdeq = pytest.importorskip("torchdeq")
    seen = set()
    for info in pkgutil.walk_packages(torchdeq.__path__, "torchdeq."):
        path = info.name.split(".", 1)[1]
        if path == "solver.utils":
            continue
        theirs = importlib.import_module(info.name)
        names = getattr(theirs, "__all__", None) or [
            n for n, v in vars(theirs).items()
            if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == info.name]
        ours = importlib.import_module(f"deqkit.compat.torchdeq.{path}")
        assert [n for n in names if not hasattr(ours, n)] == [], path
        seen.add(path)
    assert seen == set(MODULE_PATHS)


def test_state_wrappers_as_torchdeq_builds_them():
    """deq_decorator: a tensor state stays a tensor; a list stays a list with ``no_stat``
    (SpeedyMDEQWrapper, each state damped on its own) and becomes one flattened vector without
    it (MDEQWrapper, split back by vec2list); calls, detach and norm_diff as torchdeq's."""
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 3, generator=gen, dtype=F64), torch.randn(2, 2, 2, generator=gen, dtype=F64)]
    cell = lambda a, b: [torch.tanh(a) + 1.0, 0.5 * b]  # noqa: E731

    def run(layer):
        out = {}
        for no_stat in (True, False):
            wrapper, z = layer.deq_decorator(cell, [s.clone() for s in states], no_stat=no_stat)
            moved = wrapper(z, tau=0.5)
            out[no_stat] = dict(kind=type(wrapper).__name__, z=list(z) if no_stat else z,
                                full=wrapper(z), damped=moved, back=z if no_stat else wrapper.vec2list(z),
                                diff=wrapper.norm_diff(moved, z), parts=wrapper.norm_diff(moved, z, show_list=True),
                                detached=wrapper.detach(z))
        single, z = layer.deq_decorator(torch.tanh, states[0])
        out["tensor"] = dict(kind=type(single).__name__, z=z, damped=single(z, tau=0.25))
        return out

    ours = run(compat.utils)
    assert ours[True]["kind"] == "SpeedyMDEQWrapper" and ours[False]["kind"] == "MDEQWrapper"
    assert ours["tensor"]["kind"] == "DEQWrapper"
    assert torch.equal(ours[True]["damped"][1], 0.5 * 0.5 * states[1] + 0.5 * states[1])
    assert ours[False]["z"].shape == (2, 7) and torch.equal(ours[False]["back"][1], states[1])
    assert ours[True]["diff"] == pytest.approx(sum(ours[True]["parts"]))
    assert torch.equal(ours["tensor"]["damped"], 0.25 * torch.tanh(states[0]) + 0.75 * states[0])
    torchdeq = pytest.importorskip("torchdeq")
    from torchdeq.utils import layer_utils
    theirs = run(layer_utils)
    for key in ours:
        assert ours[key]["kind"] == theirs[key]["kind"], key
        assert_same({k: v for k, v in ours[key].items() if k != "kind"},
                    {k: v for k, v in theirs[key].items() if k != "kind"})


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("core", ["sliced", "indexing"])
def test_numpy_and_tensor_numbers_run_as_in_torchdeq(core, train):
    """Options read from numpy arrays or tensors (`np.int64`, `torch.tensor(8)`, `np.float32`) run
    as torchdeq runs them; so does `n_states=True` (one state) and `indexing=None` beside
    `n_states > 1` (a YAML `indexing: null`: torchdeq reads no indexing then)."""
    flags = dict(core=core, f_solver="anderson", f_max_iter=np.int64(8), f_tol=torch.tensor(1e-9, dtype=F64),
                 n_states=np.int64(2), indexing=None, ift=True, b_max_iter=torch.tensor(7), grad=2)
    with warnings.catch_warnings():  # (the budget's warning: the next test)
        warnings.simplefilter("ignore", TorchDEQCompatWarning)
        theirs, ours = both(lambda lib: run_layer(lib, "mlp", flags, train, solver_kwargs={"f_max_iter": np.int64(6)}))
    assert_same(ours, theirs)
    theirs, ours = both(lambda lib: run_layer(lib, "mlp", dict(core=core, f_max_iter=6, n_states=True), train))
    assert_same(ours, theirs)


def test_a_budget_that_is_not_a_python_number_is_ignored_in_training_with_a_warning():
    """torchdeq's training cuts its supervised steps from solver_kwargs['f_max_iter'] only when it
    is an int or a float: a numpy or tensor budget gives the configured cuts, with a warning here."""
    flags = dict(f_solver="fixed_point_iter", f_max_iter=10, n_states=2, f_tol=1e-12)
    budget = {"f_max_iter": torch.tensor(4)}
    with pytest.warns(TorchDEQCompatWarning, match=r"pass int\(tensor\(4\)\)"):
        theirs, ours = both(lambda lib: run_layer(lib, "mlp", flags, True, solver_kwargs=budget))
    assert_same(ours, theirs)
    assert_same(ours, run_layer(compat, "mlp", flags, True))  # the configured cuts of 10, not of 4


def test_custom_cores_override_torchdeqs_methods():
    """A core derived the way torchdeq's docs suggest: an overridden `_solve_fixed_point` is the one
    called, and `_sradius` is there for a `DEQBase` subclass of one's own."""
    def program(lib):
        calls = []

        class Logged(lib.core.DEQSliced):
            def _solve_fixed_point(self, deq_func, z_init, f_max_iter=None, solver_kwargs=None, **kwargs):
                calls.append(f_max_iter)
                return super()._solve_fixed_point(deq_func, z_init, f_max_iter=f_max_iter, solver_kwargs=solver_kwargs)

        class Plain(lib.core.DEQBase):
            def forward(self, func, z, solver_kwargs=None, **kwargs):
                z_star, _, info = self.f_solver(func, z, max_iter=self.f_max_iter, tol=self.f_tol, stop_mode="abs")
                return z_star, info, self._sradius(func, z_star)

        model, x, z0, _ = build("mlp")
        Logged(f_max_iter=6, n_states=2).train()(lambda z: model(z, x), z0)
        value, info, radius = Plain(f_max_iter=7)(lambda z: model(z, x), z0)
        return calls, value, info, radius

    theirs, ours = both(program)
    assert ours[0] == [3, 3]
    assert_same(ours, theirs)


def test_a_normalised_weight_assigned_or_written_in_place_is_used_until_the_next_reset():
    """IGNN assigns a projection of its normalised weight after each reset_norm and uses it; weight
    clipping writes into it in place: torchdeq uses either until the next reset_norm, so does the
    layer (the assignment keeps its graph to the parameters)."""
    def program(lib):
        torch.manual_seed(0)
        lin = nn.Linear(3, 3).double()
        lib.apply_norm(lin, "weight_norm")
        x, out = torch.randn(2, 3, dtype=F64), []
        for step in range(2):
            lib.reset_norm(lin)
            lin.weight = 0.5 * lin.weight / lin.weight.abs().sum(1, keepdim=True)
            out.append(lin(x))
            lib.reset_norm(lin)
            with torch.no_grad():
                lin.weight.clamp_(-0.1, 0.1)
            out.append(lin(x))
        sum(o.sum() for o in out).backward()
        lib.reset_norm(lin)
        out.append(lin(x))  # the writes are gone after the reset
        return [o.detach() for o in out], grads(lin)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TorchDEQCompatWarning)
        theirs, ours = both(program)
    assert_same(ours, theirs)
    assert not torch.allclose(ours[0][0], ours[0][1])


def test_hook_ift_with_jac_reg_on_the_output():
    """deq-seq's `jac_reg(deq_func(z), z)` on the output of a hook_ift DEQ: the hook fires inside that
    gradient. Without create_graph the estimate is torchdeq's and the loss keeps its IFT gradient
    (torchdeq's hook removes itself there, leaving a one-step one); with create_graph it raises
    naming the case and ift=True."""
    def program(lib, regularise, create_graph=False):
        model, x, z0, y = build("mlp")
        deq = lib.get_deq(f_max_iter=10, hook_ift=True, b_max_iter=20, f_tol=1e-10, b_tol=1e-10).train()
        z_out, _ = deq(lambda z: model(z, x), z0)
        torch.manual_seed(5)
        jac = lib.jac_reg(model(z_out[-1], x), z_out[-1], create_graph=create_graph) if regularise else None
        (z_out[-1] - y).pow(2).sum().backward()
        return jac, grads(model)

    theirs, ours = both(lambda lib: program(lib, True))
    assert_same(ours[0], theirs[0])
    alone = program(compat, False)[1]
    assert_same(ours[1], alone)
    assert worst_difference(theirs[1], alone) > 1e-3  # torchdeq's loss lost its IFT gradient
    with pytest.raises(RuntimeError, match=r"jac_reg\(deq_func\(z\), z\).*use ift=True"):
        program(compat, True, create_graph=True)


def test_an_assignment_before_spectral_norms_first_reset_replaces_the_weight_until_the_reset():
    """torchdeq's spectral-norm weight aliases weight_orig until the first reset_norm: an in-place
    write lands there, but an assignment only rebinds the attribute, used until the next reset."""
    def program(lib):
        torch.manual_seed(0)
        lin = nn.Linear(3, 3).double()
        lib.apply_norm(lin, "spectral_norm")
        x = torch.randn(2, 3, dtype=F64)
        half = 0.5 * lin.weight.detach()
        lin.weight = half
        used = torch.equal(lin(x), torch.nn.functional.linear(x, half, lin.bias))
        orig = lin.weight_orig.detach().clone()
        lib.reset_norm(lin)
        return used, orig, lin(x).detach()

    theirs, ours = both(program)
    assert ours[0] and theirs[0]  # (the weight halved differs: raw in torchdeq before its first reset, a documented fix)
    assert_same(ours[1:], theirs[1:])  # weight_orig untouched, and the reset computes the weight anew
