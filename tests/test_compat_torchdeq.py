"""deqkit.compat.torchdeq: torchdeq code after an import change, with torchdeq's numbers.

Each model runs twice, on torchdeq 0.1.0 and on the compat layer, from the same weights,
input and start, over a matrix of torchdeq options, in training (states, fixed-point
correction loss and its terms, parameter gradients, info) and in evaluation (outputs, info).
The refusals of torchdeq's defects are tested without torchdeq.
"""

from __future__ import annotations

import argparse
import copy
import sys

import pytest
import torch
from torch import nn

import deqkit.compat.torchdeq as compat

F64 = torch.float64
RTOL = 1e-5


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


def _mlp():
    return MLPCell(), torch.randn(3, 8, dtype=F64), (3, 8)


def _get():
    return TinyGETCell(), torch.randn(2, 3, 8, dtype=F64), (2, 3, 8)


def _conv():
    return ConvCell(), torch.randn(2, 2, 4, 4, dtype=F64), (2, 2, 4, 4)


MODELS = {"mlp": _mlp, "get": _get, "conv": _conv}


def _build(model_name, seed=0):
    torch.manual_seed(seed)
    with torch.random.fork_rng():
        torch.set_default_dtype(F64)
        try:
            model, x, shape = MODELS[model_name]()
        finally:
            torch.set_default_dtype(torch.float32)
    model = model.double()
    return model, x, 0.1 * torch.randn(*shape, dtype=F64), torch.randn(*shape, dtype=F64)


def _canonical(name: str) -> str:
    """One name per parameter in both libraries' weight norms."""
    return name.replace("parametrizations.weight.original0", "weight_g").replace(
        "parametrizations.weight.original1", "weight_v")


def _run(lib, model_name, flags, train, solver_kwargs=None):
    model, x, z0, y = _build(model_name)
    model = copy.deepcopy(model)
    if model_name == "conv":
        lib.apply_norm(model, "weight_norm")
    deq = lib.get_deq(**flags).train(train)
    z_out, info = deq(lambda z: model(z, x), z0, solver_kwargs=solver_kwargs)
    out = {"states": [z.detach() for z in z_out], "info": {k: v.detach() for k, v in info.items()}}
    if train:
        loss, values = lib.fp_correction(nn.MSELoss(), (z_out, y), return_loss_values=True)
        loss.backward()
        out["loss"] = [loss.detach()] + [torch.tensor(v) for v in values]
        out["grads"] = {_canonical(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _compare(ours, theirs):
    """The largest relative difference between two runs (and the same structure)."""
    worst = 0.0
    assert len(ours["states"]) == len(theirs["states"])
    for a, b in zip(ours["states"], theirs["states"]):
        worst = max(worst, _rel(a, b))
    assert set(ours["info"]) == set(theirs["info"])
    for key in ours["info"]:
        assert ours["info"][key].shape == theirs["info"][key].shape, key
        worst = max(worst, _rel(ours["info"][key], theirs["info"][key]))
    if "loss" in theirs:
        assert len(ours["loss"]) == len(theirs["loss"])
        worst = max([worst] + [_rel(a, b) for a, b in zip(ours["loss"], theirs["loss"])])
        assert set(ours["grads"]) == set(theirs["grads"])
        worst = max([worst] + [_rel(ours["grads"][k], theirs["grads"][k]) for k in theirs["grads"]])
    return worst


GET_RECIPE = dict(f_max_iter=0, grad=6, sup_gap=1, eval_f_max_iter=6)
MATRIX = [
    pytest.param("mlp", GET_RECIPE, id="mlp-get_recipe"),
    pytest.param("get", GET_RECIPE, id="get-get_recipe"),
    pytest.param("conv", GET_RECIPE, id="conv-get_recipe"),
    pytest.param("mlp", dict(f_solver="anderson", f_max_iter=8, grad=3, tau=0.7), id="mlp-anderson-phantom3"),
    pytest.param("get", dict(f_solver="anderson", f_max_iter=10, f_tol=1e-8, grad=2, tau=0.5), id="get-anderson-phantom2"),
    pytest.param("conv", dict(f_solver="broyden", f_max_iter=8, grad=1), id="conv-broyden-phantom1"),
    pytest.param("mlp", dict(f_solver="broyden", f_max_iter=12, f_stop_mode="rel", grad=6, tau=0.9), id="mlp-broyden-rel-phantom6"),
    pytest.param("mlp", dict(f_solver="fixed_point_iter", f_max_iter=12, grad=2, tau=0.6, sup_loc=[1]), id="mlp-fp-suploc"),
    pytest.param("get", dict(f_solver="fixed_point_iter", f_max_iter=6, ift=True, b_solver="anderson", b_max_iter=12, b_tol=1e-9), id="get-fp-ift-anderson"),
    pytest.param("mlp", dict(f_solver="anderson", f_max_iter=9, ift=True, b_solver="anderson", b_max_iter=12, n_states=3), id="mlp-anderson-ift-nstates3"),
    pytest.param("conv", dict(f_solver="fixed_point_iter", f_max_iter=8, n_states=2, grad=[1, 2], ift=True), id="conv-fp-nstates2-ift"),
    pytest.param("mlp", dict(core="indexing", f_solver="fixed_point_iter", f_max_iter=10, f_tol=1e-12, n_states=2, grad=2), id="mlp-indexing-nstates2"),
    pytest.param("mlp", dict(core="indexing", f_solver="anderson", f_max_iter=10, f_tol=1e-12, indexing=[4, 7], grad=1, ift=True, b_solver="anderson"), id="mlp-indexing-ift"),
    pytest.param("mlp", dict(f_solver="simple_fixed_point_iter", f_max_iter=6, indexing=[2], grad=2), id="mlp-simple-indexing"),
    pytest.param("mlp", dict(f_solver="fixed_point_iter", f_max_iter=30, f_tol=1e-3, eval_factor=1.5, grad=1), id="mlp-fp-early-stop"),
    pytest.param("mlp", dict(f_solver="anderson", f_max_iter=8, hook_ift=True, b_solver="broyden", b_max_iter=10), id="mlp-anderson-hook_ift-broyden"),
]

@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("model_name, flags", MATRIX)
def test_same_numbers_as_torchdeq(model_name, flags, train):
    torchdeq = pytest.importorskip("torchdeq")
    theirs = _run(torchdeq, model_name, dict(flags), train)
    ours = _run(compat, model_name, dict(flags), train)
    worst = _compare(ours, theirs)
    assert worst <= RTOL, worst
    if train:  # the comparison is not vacuous: every parameter got a gradient
        assert ours["grads"] and all(bool(g.abs().sum() > 0) for g in ours["grads"].values())


def test_solver_kwargs_at_call_time_match():
    torchdeq = pytest.importorskip("torchdeq")
    flags = dict(f_solver="anderson", f_max_iter=8, grad=2)
    kw = dict(m=3, lam=1e-3, f_max_iter=7)
    theirs = _run(torchdeq, "mlp", flags, True, solver_kwargs=kw)
    ours = _run(compat, "mlp", flags, True, solver_kwargs=kw)
    assert _compare(ours, theirs) <= RTOL


def test_solvers_called_directly_match():
    torchdeq_solver = pytest.importorskip("torchdeq.solver")
    torch.manual_seed(1)
    W = 0.3 * torch.randn(6, 6, dtype=F64)
    x = torch.randn(4, 6, dtype=F64)

    def f(z, tau=1.0):
        out = torch.tanh(z @ W.T + x)
        return out if tau == 1.0 else tau * out + (1 - tau) * z

    for name in ("anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"):
        for max_iter, tol, mode in ((0, 1e-3, "abs"), (7, 1e-3, "rel"), (15, 1e-10, "abs")):
            z0 = torch.zeros(4, 6, dtype=F64)
            a = torchdeq_solver.get_solver(name)(f, z0, max_iter=max_iter, tol=tol, stop_mode=mode)
            b = compat.get_solver(name)(f, z0, max_iter=max_iter, tol=tol, stop_mode=mode)
            assert _rel(b[0], a[0]) <= 1e-12
            for key in a[2]:
                assert torch.allclose(b[2][key].double(), a[2][key].double(), rtol=1e-10), (name, key)
    for scale in (0.3, 2.0):  # Broyden's line search, taking shorter steps for the larger scale
        g = lambda z: torch.tanh(scale * z @ W.T + x)  # noqa: E731
        a = torchdeq_solver.get_solver("broyden")(g, torch.zeros(4, 6, dtype=F64), max_iter=10, tol=1e-9, ls=True)
        b = compat.get_solver("broyden")(g, torch.zeros(4, 6, dtype=F64), max_iter=10, tol=1e-9, ls=True)
        assert _rel(b[0], a[0]) <= 1e-12


def test_add_deq_args_same_options_and_defaults():
    torchdeq = pytest.importorskip("torchdeq")
    ours = vars(compat.add_deq_args(argparse.ArgumentParser()).parse_args([]))
    p = argparse.ArgumentParser()
    torchdeq.add_deq_args(p)
    assert ours == vars(p.parse_args([]))
    argv = ["--f_solver", "anderson", "--grad", "2", "3", "--ift", "--indexing", "4", "8"]
    p2 = argparse.ArgumentParser()
    torchdeq.add_deq_args(p2)
    assert vars(compat.add_deq_args(argparse.ArgumentParser()).parse_args(argv)) == vars(p2.parse_args(argv))


def test_fp_correction_and_jac_reg_match():
    torchdeq = pytest.importorskip("torchdeq")
    states = [torch.randn(3, 4, dtype=F64) for _ in range(3)]
    y = torch.randn(3, 4, dtype=F64)
    for wf, kw in (("exp", {}), ("exp", dict(gamma=0.5)), ("linear", {}), ("linear", dict(gamma=0.5, bias=0.1))):
        a = torchdeq.fp_correction(nn.MSELoss(), (states, y), weight_func=wf, return_loss_values=True, **kw)
        b = compat.fp_correction(nn.MSELoss(), (states, y), weight_func=wf, return_loss_values=True, **kw)
        assert _rel(b[0], a[0]) <= 1e-12 and b[1] == pytest.approx(a[1], rel=1e-12)
    z = torch.randn(2, 4, dtype=F64, requires_grad=True)
    fz = torch.tanh(z @ torch.randn(4, 4, dtype=F64))
    torch.manual_seed(3)
    a = torchdeq.jac_reg(fz, z, vecs=2)
    torch.manual_seed(3)
    b = compat.jac_reg(fz, z, vecs=2)
    assert _rel(b, a) <= 1e-12


def test_weight_norm_gradients_match_over_two_steps():
    """Two optimizer steps: torchdeq needs reset_norm between them; ours is always current."""
    torchdeq = pytest.importorskip("torchdeq")
    grads = {}
    for lib in (torchdeq, compat):
        model, x, z0, y = _build("conv")
        lib.apply_norm(model, "weight_norm", filter_out="inj")
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        deq = lib.get_deq(f_solver="fixed_point_iter", f_max_iter=5, grad=2)
        for _ in range(2):
            lib.reset_norm(model)
            opt.zero_grad()
            z_out, _ = deq(lambda z: model(z, x), z0)
            lib.fp_correction(nn.MSELoss(), (z_out, y)).backward()
            opt.step()
        grads[lib] = {_canonical(n): p.grad.clone() for n, p in model.named_parameters()}
    assert set(grads[compat]) == set(grads[torchdeq])
    for key in grads[torchdeq]:
        assert _rel(grads[compat][key], grads[torchdeq][key]) <= RTOL, key


# -- refusals (no torchdeq needed) ------------------------------------------------------------
def test_does_not_import_torchdeq():
    assert "deqkit.compat.torchdeq" in sys.modules
    import subprocess

    code = ("import sys, torch; sys.modules['torchdeq'] = None  # as if not installed\n"
            "import deqkit.compat.torchdeq as c\n"
            "z, info = c.get_deq(f_solver='broyden', f_max_iter=5, ift=True)(torch.cos, torch.zeros(2, 3))\n"
            "assert len(z) == 1 and info['nstep'].shape == (2,)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stop_mode="rel"), "did you mean 'f_stop_mode'"),
    (dict(f_anderson_m=3), "unknown torchdeq option"),
    (dict(f_max_itr=3), "did you mean 'f_max_iter'"),
])
def test_unknown_options_raise(kwargs, match):
    with pytest.raises(TypeError, match=match):
        compat.get_deq(**kwargs)


def test_misspelt_option_in_args_raises_but_unrelated_options_pass():
    compat.get_deq(argparse.Namespace(lr=1e-3, batch_size=8, f_solver="anderson"))
    with pytest.raises(ValueError, match="f_stop_mode"):
        compat.get_deq(argparse.Namespace(lr=1e-3, f_stop_mod="rel"))


def test_bad_values_raise():
    with pytest.raises(ValueError, match="unknown solver 'andersen'"):
        compat.get_deq(f_solver="andersen")
    with pytest.raises(ValueError, match="f_stop_mode"):
        compat.get_deq(f_stop_mode="relative")
    with pytest.raises(ValueError, match="grad"):
        compat.get_deq(grad=0)
    with pytest.raises(ValueError, match="core"):
        compat.get_deq(core="slice")


def test_unknown_solver_kwargs_and_call_kwargs_raise():
    deq = compat.get_deq(f_solver="anderson", f_max_iter=4)
    f = lambda z: 0.5 * torch.tanh(z)  # noqa: E731
    with pytest.raises(TypeError, match="did you mean 'lam'"):
        deq(f, torch.zeros(2, 3), solver_kwargs=dict(lamda=1e-3))
    with pytest.raises(TypeError, match="unknown keyword"):
        deq(f, torch.zeros(2, 3), sradius=True)


def test_indexing_core_keeps_ift_when_the_solve_stops_early():
    """torchdeq dropped the IFT functor (one-step gradient instead); here every functor runs."""
    torch.manual_seed(0)
    W = (0.3 * torch.randn(5, 5, dtype=F64)).requires_grad_()
    x = torch.randn(2, 5, dtype=F64)
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    deq = compat.get_deq(core="indexing", f_solver="fixed_point_iter", f_max_iter=40, f_tol=1e-3,
                         n_states=2, ift=True, b_tol=1e-12, b_max_iter=200)
    z_out, info = deq(f, torch.zeros(2, 5, dtype=F64))
    assert len(z_out) == 2
    (g,) = torch.autograd.grad(z_out[-1].sum(), W)
    # the exact implicit gradient at the returned point, by a long unrolled solve
    z = torch.zeros(2, 5, dtype=F64)
    for _ in range(200):
        z = f(z)
    (g_exact,) = torch.autograd.grad(z.sum(), W)
    assert _rel(g, g_exact) < 1e-2


def test_hook_ift_twice_before_backward_is_bounded_and_repeatable():
    torch.manual_seed(0)
    W = (0.3 * torch.randn(4, 4, dtype=F64)).requires_grad_()
    f = lambda z: torch.tanh(z @ W.T + 1.0)  # noqa: E731
    deq = compat.get_deq(f_solver="anderson", f_max_iter=20, f_tol=1e-10, hook_ift=True, b_tol=1e-10)
    a, _ = deq(f, torch.zeros(2, 4, dtype=F64))
    b, _ = deq(f, torch.zeros(2, 4, dtype=F64))
    loss = a[-1].sum() + b[-1].sum()
    (g1,) = torch.autograd.grad(loss, W, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, W)
    assert torch.equal(g1, g2)


def test_second_derivative_through_ift_raises():
    W = (0.3 * torch.eye(3, dtype=F64)).requires_grad_()
    deq = compat.get_deq(f_max_iter=10, ift=True)
    z_out, _ = deq(lambda z: torch.tanh(z @ W.T + 1.0), torch.zeros(2, 3, dtype=F64))
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(z_out[-1].sum(), W, create_graph=True)


def test_weight_norm_is_current_after_a_step_and_deepcopies():
    model = nn.Linear(3, 3).double()
    compat.apply_norm(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.ones(1, 3, dtype=F64)).sum().backward()
    opt.step()
    g, v = model.parametrizations.weight.original0, model.parametrizations.weight.original1
    assert torch.allclose(model.weight, v * g / v.norm(dim=1, keepdim=True))
    copy.deepcopy(model)
    compat.remove_norm(model)
    assert isinstance(model.weight, nn.Parameter)


def test_list_states_and_mem_gc():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3).double()
    deq = compat.get_deq(f_solver="anderson", f_max_iter=10, grad=2)
    f = lambda a, b: (0.5 * torch.tanh(lin(b)), 0.5 * torch.cos(a))  # noqa: E731
    z_out, info = deq(f, (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)))
    assert isinstance(z_out[-1], list) and z_out[-1][0].shape == (2, 3)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    out = compat.mem_gc(lin, (x,))
    assert torch.allclose(out, lin(x))
    assert compat.mixed_init((4, 5)).shape == (4, 5)


@pytest.mark.parametrize("name, shape, token_first", [
    ("VariationalDropout", (2, 3, 4), None),
    ("VariationalDropout1d", (2, 3, 4), True),
    ("VariationalDropout2d", (2, 3, 4, 5), False),
    ("VariationalDropToken1d", (2, 3, 4), False),
    ("VariationalDropToken2d", (2, 3, 4, 5), True),
])
def test_variational_dropout_same_masks_as_torchdeq(name, shape, token_first):
    torchdeq = pytest.importorskip("torchdeq")
    kw = {} if token_first is None else dict(token_first=token_first)
    x = torch.randn(*shape, dtype=F64)
    outs = []
    for lib in (torchdeq, compat):
        torch.manual_seed(5)
        layer = getattr(lib, name)(0.3, **kw)
        first = layer(x)
        assert torch.equal(layer(x), first)  # one mask until reset
        lib.reset_deq(layer)
        outs.append((first, layer(x)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_list_states_match_torchdeq():
    """An MDEQ-style f of two states (flattened into one vector by both libraries)."""
    torchdeq = pytest.importorskip("torchdeq")
    results = []
    for lib in (torchdeq, compat):
        torch.manual_seed(0)
        lin = nn.Linear(3, 3).double()
        x = torch.randn(2, 3, dtype=F64)
        f = lambda a, b: (0.5 * torch.tanh(lin(b) + x), 0.5 * torch.cos(a))  # noqa: E731
        deq = lib.get_deq(f_solver="anderson", f_max_iter=8, grad=2, n_states=2)
        z_out, info = deq(f, (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64)))
        sum(z[0].sum() + z[1].pow(2).sum() for z in z_out).backward()
        results.append(([t.detach() for z in z_out for t in z], info, [p.grad for p in lin.parameters()]))
    (a_states, a_info, a_grads), (b_states, b_info, b_grads) = results
    assert len(a_states) == len(b_states) == 4
    for u, v in zip(b_states + b_grads, a_states + a_grads):
        assert _rel(u, v) <= RTOL
    for key in a_info:
        assert _rel(b_info[key], a_info[key]) <= RTOL


def test_sradius_mode_matches_torchdeq():
    torchdeq = pytest.importorskip("torchdeq")
    infos = []
    for lib in (torchdeq, compat):
        model, x, z0, _ = _build("mlp")
        deq = lib.get_deq(f_solver="anderson", f_max_iter=10).eval()
        torch.manual_seed(7)
        _, info = deq(lambda z: model(z, x), z0, sradius_mode=True)
        infos.append(info["sradius"])
    assert _rel(infos[1], infos[0]) <= RTOL


def _rename(name: str, table: dict) -> str:
    for ours, theirs in table.items():
        name = name.replace(ours, theirs)
    return name


def test_spectral_norm_matches_torchdeq_over_two_steps():
    """reset_norm advances the power iteration in both libraries: same weights, same gradients."""
    torchdeq = pytest.importorskip("torchdeq")
    names = {"parametrizations.weight.original0": "weight_orig", "parametrizations.weight.original1": "weight_g"}
    grads, outs = {}, {}
    for lib in (torchdeq, compat):
        model, x, z0, y = _build("conv")
        torch.manual_seed(11)
        lib.apply_norm(model, "spectral_norm", args=dict(sn_n_power_iters=2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        deq = lib.get_deq(f_solver="anderson", f_max_iter=6, grad=2)
        for _ in range(2):
            lib.reset_norm(model)
            opt.zero_grad()
            z_out, _ = deq(lambda z: model(z, x), z0)
            lib.fp_correction(nn.MSELoss(), (z_out, y)).backward()
            opt.step()
        outs[lib] = z_out[-1].detach()
        grads[lib] = {_rename(n, names): p.grad.clone() for n, p in model.named_parameters()}
    assert set(grads[compat]) == set(grads[torchdeq]) == {
        "conv.weight_orig", "conv.weight_g", "conv.bias", "inj.weight_orig", "inj.weight_g", "inj.bias"}
    assert _rel(outs[compat], outs[torchdeq]) <= RTOL
    for key in grads[torchdeq]:
        assert _rel(grads[compat][key], grads[torchdeq][key]) <= RTOL, key


def test_get_deq_from_an_add_deq_args_namespace_matches():
    torchdeq = pytest.importorskip("torchdeq")
    argv = ["--f_solver", "anderson", "--f_max_iter", "9", "--grad", "2", "--tau", "0.8", "--n_states", "3",
            "--core", "indexing", "--f_tol", "1e-12"]  # no early stop: torchdeq would drop states
    runs = []
    for lib in (torchdeq, compat):
        parser = argparse.ArgumentParser()
        parser.add_argument("--lr", type=float, default=1e-3)  # a training script's own option
        lib.add_deq_args(parser)
        args = parser.parse_args(argv)
        model, x, z0, y = _build("mlp")
        z_out, info = lib.get_deq(args)(lambda z: model(z, x), z0)
        lib.fp_correction(nn.MSELoss(), (z_out, y), gamma=args.gamma).backward()
        runs.append(([z.detach() for z in z_out], [p.grad for p in model.parameters()]))
    assert len(runs[0][0]) == len(runs[1][0]) == 3
    for u, v in zip(runs[1][0] + runs[1][1], runs[0][0] + runs[0][1]):
        assert _rel(u, v) <= RTOL


def test_torchdeq_drops_states_on_early_stop_and_compat_does_not():
    """The defect itself: same flags, early convergence; torchdeq loses the last (IFT) functor."""
    torchdeq = pytest.importorskip("torchdeq")
    flags = dict(core="indexing", f_solver="anderson", f_max_iter=9, n_states=3, ift=True)
    theirs = _run(torchdeq, "mlp", flags, True)
    ours = _run(compat, "mlp", flags, True)
    assert len(theirs["states"]) < 3 and len(ours["states"]) == 3


def _normed_net(lib, norm_type, **kwargs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Conv1d(5, 3, 1), nn.ConvTranspose1d(3, 2, 2))
    lib.apply_norm(net, norm_type, **kwargs)
    return net


@pytest.mark.parametrize("norm_type, kwargs", [("weight_norm", {}), ("weight_norm", {"learn_scale": False}),
                                               ("spectral_norm", {}), ("spectral_norm", {"learn_scale": False})])
def test_loads_a_state_dict_saved_under_torchdeqs_apply_norm(norm_type, kwargs):
    torchdeq = pytest.importorskip("torchdeq")
    from deqkit.compat.torchdeq.norm import torchdeq_state_dict

    theirs = _normed_net(torchdeq, norm_type, **kwargs)
    with torch.no_grad():  # make every saved tensor differ from a fresh model's
        for p in theirs.parameters():
            p.mul_(1.3).add_(0.01)
    theirs.eval()
    torchdeq.reset_norm(theirs)  # eval: recomputes the weight, no power-iteration step
    torch.manual_seed(1)
    ours = _normed_net(compat, norm_type, **kwargs).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: every key mapped
    x = torch.randn(2, 4, 1).transpose(1, 2)
    body = lambda net, x: net[3](net[2](net[1](net[0](x)).transpose(1, 2)))  # noqa: E731
    assert torch.allclose(body(ours, x), body(theirs, x), atol=1e-6)
    # and back: torchdeq's model loads the compat model's state under torchdeq's names
    back = _normed_net(torchdeq, norm_type, **kwargs).eval()
    back.load_state_dict(torchdeq_state_dict(ours))
    torchdeq.reset_norm(back)
    assert torch.allclose(body(back, x), body(theirs, x), atol=1e-6)
    compat.remove_norm(ours)
    assert ours.load_state_dict(ours.state_dict())  # the hook is gone with the norm


def _get_style_model(lib, args):
    """A GET-style DEQ transformer, written the way torchdeq-based research code is."""

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, z, u):
            h = self.ln1(z + u)
            z = z + 0.5 * self.attn(h, h, h, need_weights=False)[0]
            return z + 0.5 * self.mlp(self.ln2(z)) - 0.5 * z

    class DEQTransformer(nn.Module):
        def __init__(self, args, d=8, classes=3):
            super().__init__()
            self.embed = nn.Linear(4, d)
            self.block = Block(d)
            self.head = nn.Linear(d, classes)
            lib.apply_norm(self.block, args=args)
            self.deq = lib.get_deq(args)

        def forward(self, x):
            u = self.embed(x)
            lib.reset_norm(self.block)
            z_out, _ = self.deq(lambda z: self.block(z, u), torch.zeros_like(u))
            return [self.head(z.mean(dim=1)) for z in z_out]

    torch.manual_seed(0)
    return DEQTransformer(args).double()


def test_get_style_transformer_trains_unchanged_on_compat():
    torchdeq = pytest.importorskip("torchdeq")
    argv = ["--f_max_iter", "0", "--grad", "6", "--sup_gap", "1", "--eval_f_max_iter", "6", "--norm_type", "none"]
    torch.manual_seed(1)
    x, target = torch.randn(4, 5, 4, dtype=F64), torch.tensor([0, 2, 1, 0])
    runs = []
    for lib in (torchdeq, compat):
        parser = argparse.ArgumentParser()
        lib.add_deq_args(parser)
        args = parser.parse_args(argv)
        model = _get_style_model(lib, args).train()
        preds = model(x)
        loss, loss_values = lib.fp_correction(nn.CrossEntropyLoss(), (preds, target), return_loss_values=True)
        loss.backward()
        model.eval()
        with torch.no_grad():
            eval_preds = model(x)
        runs.append(dict(preds=[p.detach() for p in preds], loss=loss.detach(), values=list(loss_values),
                         grads={k: p.grad for k, p in model.named_parameters()}, eval=eval_preds))
    theirs, ours = runs
    assert len(ours["preds"]) == len(theirs["preds"]) == 6 and len(ours["values"]) == len(theirs["values"])
    for a, b in zip(ours["preds"] + ours["eval"] + [ours["loss"]], theirs["preds"] + theirs["eval"] + [theirs["loss"]]):
        assert _rel(a, b) <= 1e-10
    for a, b in zip(ours["values"], theirs["values"]):
        assert abs(float(a) - float(b)) <= 1e-10 * max(1.0, abs(float(b)))
    assert set(ours["grads"]) == set(theirs["grads"])
    for k in theirs["grads"]:
        assert _rel(ours["grads"][k], theirs["grads"][k]) <= 1e-10, k
