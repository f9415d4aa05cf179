"""``deqkit.DEQ``: the nn.Module shell over ``fixed_point``.

Gradients reach the cell's parameters and the inputs in every backward mode, the same
``Solution`` comes back in train and eval, starting points and per-call overrides work,
bad arguments fail at construction, and a tiny DEQ trains, saves, loads and copies (also
with spectral normalisation).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deqkit

F64 = torch.float64

BACKWARDS = [
    pytest.param(deqkit.Implicit(), id="implicit"),
    pytest.param(deqkit.Phantom(steps=5, tau=0.5), id="phantom"),
    pytest.param(deqkit.Unrolled(), id="unrolled"),
    pytest.param(deqkit.OneStep(), id="one_step"),
]


class MLPCell(nn.Module):
    """``z <- tanh(0.5 * W2 tanh(W1 z) + x)``: two layers, contractive at initialisation."""

    def __init__(self, dim: int = 6, hidden: int = 8, dtype=torch.float32):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden, dtype=dtype)
        self.lin2 = nn.Linear(hidden, dim, dtype=dtype)

    def forward(self, z, x):
        return torch.tanh(0.5 * self.lin2(torch.tanh(self.lin1(z))) + x)


class Recorder(nn.Module):
    """Wraps a cell and keeps the z of its first call (the starting point)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.first_z = None

    def forward(self, z, *inputs):
        if self.first_z is None:
            self.first_z = z.detach().clone()
        return self.cell(z, *inputs)


def make_deq(backward=None, seed=0, **kwargs):
    torch.manual_seed(seed)
    return deqkit.DEQ(MLPCell(), backward=backward, **{"tol": 1e-5, "max_steps": 60, **kwargs})


def inputs(batch=4, dim=6, seed=1):
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed))


# -- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradients_reach_parameters_and_inputs(backward):
    deq = make_deq(backward)
    x = inputs().requires_grad_(True)
    sol = deq(x)
    assert sol.success
    sol.value.square().sum().backward()
    for name, p in deq.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["weight", "spectral"])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_gradients_reach_normalised_weights(backward, kind):
    # Regression: DEQ once wrapped the whole solve in parametrize.cached(), so the weights
    # cached under the no_grad forward solve were reused by the backward mode's graph and the
    # normalised weights (parametrizations.weight.original) never got a gradient.
    deq = make_deq(backward)
    deqkit.nn.apply_norm(deq.cell, kind)
    sol = deq(inputs())
    sol.value.square().sum().backward()
    names = [name for name, _ in deq.named_parameters()]
    assert any("parametrizations.weight.original" in name for name in names)
    for name, p in deq.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_same_solution_type_in_train_and_eval():
    deq = make_deq(deqkit.Implicit())
    x = inputs()
    train = deq.train()(x)
    evaluated = deq.eval()(x)
    assert type(train) is type(evaluated) is deqkit.Solution
    assert train.success and evaluated.success
    torch.testing.assert_close(evaluated.value, train.value)
    assert evaluated.value.requires_grad  # eval with autograd on still builds the graph
    with torch.no_grad():
        plain = deq(x)
    assert type(plain) is deqkit.Solution and not plain.value.requires_grad


# -- starting points -------------------------------------------------------------------------
def test_init_options():
    x = inputs()
    values = {}
    for init in ("zeros", "randn", lambda x: torch.full_like(x, 0.3)):
        torch.manual_seed(0)
        cell = Recorder(MLPCell())
        with torch.no_grad():
            sol = deqkit.DEQ(cell, init=init, tol=1e-6)(x)
        assert sol.success
        values[init if isinstance(init, str) else "callable"] = sol.value
        if init == "zeros":
            assert torch.equal(cell.first_z, torch.zeros_like(x))
        elif init == "randn":
            assert cell.first_z.shape == x.shape and cell.first_z.std() > 0.3
        else:
            assert torch.equal(cell.first_z, torch.full_like(x, 0.3))
    # A contraction has one fixed point, whatever the start.
    torch.testing.assert_close(values["randn"], values["zeros"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(values["callable"], values["zeros"], rtol=1e-4, atol=1e-5)


def test_randn_init_follows_the_seed():
    x = inputs()
    firsts = []
    for seed in (5, 5, 6):
        cell = Recorder(MLPCell())
        torch.manual_seed(seed)
        with torch.no_grad():
            deqkit.DEQ(cell, init="randn")(x)
        firsts.append(cell.first_z)
    assert torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[0], firsts[2])


def test_warm_start_from_tensor_or_solution():
    deq = make_deq(deqkit.Implicit(), solver=deqkit.FixedPoint(), tol=1e-6, max_steps=200)
    x = inputs()
    with torch.no_grad():
        cold = deq(x)
        from_solution = deq(x, z0=cold)
        from_tensor = deq(x, z0=cold.value)
        explicit_zeros = deq(x, z0=torch.zeros_like(x))
    assert cold.success and from_solution.success and from_tensor.success
    assert from_solution.stats.steps.max() < cold.stats.steps.max()
    assert torch.equal(from_solution.stats.steps, from_tensor.stats.steps)
    torch.testing.assert_close(from_solution.value, cold.value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(explicit_zeros.value, cold.value)
    assert torch.equal(explicit_zeros.stats.steps, cold.stats.steps)

    # A previous solution that carries a graph is a detached start: no gradient flows into it.
    x_grad = x.clone().requires_grad_(True)
    first = deq(x_grad)
    second = deq(x, z0=first)
    (gx,) = torch.autograd.grad(second.value.sum(), x_grad, allow_unused=True)
    assert gx is None


# -- options ---------------------------------------------------------------------------------
def test_overrides_apply_to_one_call_only():
    deq = make_deq(deqkit.Implicit(), solver=deqkit.FixedPoint(), tol=1e-6, max_steps=200)
    x = inputs()
    with torch.no_grad():
        short = deq(x, max_steps=2)
        full = deq(x)
        one_step_mode = deq(x, backward=deqkit.OneStep(), solver=deqkit.Anderson(m=3))
    assert short.result == deqkit.Result.MAX_STEPS and int(short.stats.steps.max()) == 2
    assert full.success and int(full.stats.steps.max()) > 2
    assert deq.options.max_steps == 200
    assert one_step_mode.success
    sol = deq(x, backward=deqkit.OneStep())  # the graph of one call of the cell
    assert sol.value.grad_fn is not None


def test_unknown_overrides_raise_type_error_naming_them():
    deq = make_deq()
    with pytest.raises(TypeError, match="bogus") as info:
        deq(inputs(), bogus=1, max_steps=3)
    assert "max_steps" not in str(info.value).split(";")[0]
    with pytest.raises(TypeError, match="tolerance"):
        deq(inputs(), tolerance=1e-3)


@pytest.mark.parametrize("kwargs, match", [
    ({"tol": 0}, "tol"),
    ({"tol": -1e-3}, "tol"),
    ({"stop_mode": "max"}, "stop_mode"),
    ({"init": "ones"}, "init"),
    ({"max_steps": 0}, "max_steps"),
    ({"tol": True}, "tol"),
    ({"divergence": 0.5}, "divergence"),
    ({"trajectory": -1}, "trajectory"),
])
def test_invalid_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        deqkit.DEQ(MLPCell(), **kwargs)


def test_cell_solver_and_backward_are_checked_at_construction():
    with pytest.raises(TypeError, match="cell"):
        deqkit.DEQ("not a cell")
    with pytest.raises(TypeError, match="solver"):
        deqkit.DEQ(MLPCell(), solver=deqkit.Anderson)  # the class, not an instance
    with pytest.raises(TypeError, match="solver"):
        deqkit.DEQ(MLPCell(), solver="anderson")
    with pytest.raises(TypeError, match="backward"):
        deqkit.DEQ(MLPCell(), backward=deqkit.Implicit)


# -- a small model that trains ---------------------------------------------------------------
class SineCell(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.lin = nn.Linear(hidden, hidden)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


class SineModel(nn.Module):
    """Encoder -> DEQ (16-d state) -> decoder, for y = sin(x) on [-3, 3]."""

    def __init__(self, backward=None, hidden: int = 16, norm: str | None = None):
        super().__init__()
        self.enc = nn.Linear(1, hidden)
        self.cell = SineCell(hidden)
        if norm is not None:
            deqkit.nn.apply_norm(self.cell, norm)
        self.dec = nn.Linear(hidden, 1)
        self.deq = deqkit.DEQ(self.cell, backward=backward, tol=1e-4, max_steps=40)

    def forward(self, x):
        return self.dec(self.deq(self.enc(x)).value)


def sine_data():
    x = torch.linspace(-3, 3, 32).unsqueeze(1)
    return x, torch.sin(x)


def mse(model, x, y):
    return (model(x) - y).square().mean()


def train(model, steps: int = 60, lr: float = 2e-2) -> tuple[float, float]:
    x, y = sine_data()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():
        before = float(mse(model, x, y))
    for _ in range(steps):
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(mse(model, x, y))
    return before, after


@pytest.mark.parametrize("backward", BACKWARDS)
def test_tiny_deq_trains_with_every_backward_mode(backward):
    torch.manual_seed(0)
    model = SineModel(backward)
    before, after = train(model)
    assert after < 0.1 * before, (before, after)


def test_state_dict_round_trip_and_deepcopy(tmp_path):
    torch.manual_seed(0)
    model = SineModel(deqkit.Implicit())
    train(model, steps=5)
    model.eval()
    x, _ = sine_data()
    with torch.no_grad():
        expected = model(x)

    torch.save(model.state_dict(), tmp_path / "deq.pt")
    torch.manual_seed(1)
    loaded = SineModel(deqkit.Implicit()).eval()
    with torch.no_grad():
        assert not torch.equal(loaded(x), expected)
    loaded.load_state_dict(torch.load(tmp_path / "deq.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)

    clone = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(clone(x), expected)
        clone.cell.lin.bias.add_(1.0)
        assert torch.equal(model(x), expected)  # the copy owns its parameters


def test_spectral_norm_deq_trains_copies_moves_and_unwraps(tmp_path):
    torch.manual_seed(0)
    model = SineModel(deqkit.Implicit(), norm="spectral")
    assert deqkit.nn.has_norm(model.cell)
    original = model.cell.lin.parametrizations.weight.original
    start = original.detach().clone()
    before, after = train(model)
    assert after < 0.25 * before, (before, after)
    assert not torch.equal(original.detach(), start)  # the normalised weight itself trained

    model.eval()
    x, _ = sine_data()
    with torch.no_grad():
        expected = model(x)
        sigma = torch.linalg.matrix_norm(model.cell.lin.weight, ord=2)
    assert float(sigma) == pytest.approx(1.0, abs=0.05)

    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), expected)
    assert deqkit.nn.has_norm(clone.cell)

    torch.save(model.state_dict(), tmp_path / "sn.pt")
    torch.manual_seed(3)
    loaded = SineModel(deqkit.Implicit(), norm="spectral").eval()
    loaded.load_state_dict(torch.load(tmp_path / "sn.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)

    wide = copy.deepcopy(model).to(torch.float64)
    assert wide.cell.lin.parametrizations.weight.original.dtype == F64
    with torch.no_grad():
        out64 = wide(x.to(F64))
    assert out64.dtype == F64
    torch.testing.assert_close(out64.float(), expected, rtol=1e-3, atol=1e-3)

    deqkit.nn.remove_norm(model.cell)
    assert not deqkit.nn.has_norm(model.cell)
    assert isinstance(model.cell.lin.weight, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


# -- the layer's own solver, backward mode and start (mutation-test gaps) ------------------------


class _Recorder(deqkit.AbstractSolver):
    """FixedPoint that counts its steps on a list it shares (not part of its record)."""

    def __init__(self, seen):
        self.seen = seen

    def step(self, z, fz, state, problem):
        self.seen.append("step")
        return fz, state


def test_the_layer_solves_with_its_own_solver_and_backward_mode():
    seen = []
    x = torch.randn(2, 3, requires_grad=True)
    deq = deqkit.DEQ(lambda z, x: 0.5 * torch.tanh(z) + x, solver=_Recorder(seen), backward=deqkit.OneStep(), tol=1e-6)
    sol = deq(x)
    assert sol.success and seen  # its solver stepped
    sol.value.sum().backward()
    assert len(sol.stats.backward) == 0  # OneStep: no adjoint solve (the default Implicit would log one)
    assert sol.stats.nfev == int(sol.stats.steps.max()) + 1  # the loop's calls and OneStep's one
    seen.clear()
    deq(x, solver=deqkit.FixedPoint())  # a per-call override replaces it for that call only
    assert not seen
    deq(x)
    assert seen


def test_the_layers_messages_name_the_problem():
    with pytest.raises(TypeError, match=r"^cell must be callable \(an nn.Module\), got int$"):
        deqkit.DEQ(3)
    deq = deqkit.DEQ(lambda z, x: 0.5 * z + x)
    with pytest.raises(ValueError, match=r"^DEQ needs z0=\.\.\. or a tensor first input to shape its starting point$"):
        deq(3.0)
    with pytest.raises(ValueError, match=r"^DEQ needs z0=\.\.\. or a tensor first input"):
        deq()
    bad = deqkit.DEQ(lambda z: z, init=lambda: [0.0])
    with pytest.raises(TypeError, match=r"^DEQ's init callable must return a Tensor, got list$"):
        bad()
    with pytest.raises(TypeError, match=r"^unknown solve option 'zzzz'; the options are tol, stop_mode, max_steps"):
        deq(torch.ones(1, 2), zzzz=1)


def test_the_note_on_the_start_is_added_only_when_the_layer_shaped_it():
    class Cell(nn.Module):
        def forward(self, z, x):
            return z @ torch.ones(5, 5) + x.sum()  # a state of 5 features, an input of 3

    deq = deqkit.DEQ(Cell())
    with pytest.raises(RuntimeError) as shaped:
        deq(torch.ones(2, 3))
    assert any("shaped like the first input" in note for note in getattr(shaped.value, "__notes__", []))
    with pytest.raises(RuntimeError) as given:
        deq(torch.ones(2, 3), z0=torch.ones(2, 4))
    assert not any("shaped like" in note for note in getattr(given.value, "__notes__", []))
    with pytest.raises(RuntimeError) as own:
        deqkit.DEQ(Cell(), init=lambda x: torch.ones(2, 4))(torch.ones(2, 3))
    assert not any("shaped like" in note for note in getattr(own.value, "__notes__", []))
    with pytest.raises(deqkit.SolveError) as failed:  # a failed solve is not a shape problem
        deqkit.DEQ(lambda z, x: 2 * z + x, solver=deqkit.FixedPoint(), max_steps=40)(torch.ones(2, 3))
    assert not getattr(failed.value, "__notes__", [])


def test_warm_starts_check_the_batch_of_any_first_input_and_allow_none():
    deq = deqkit.DEQ(lambda z, x: 0.5 * z + x.unsqueeze(1), tol=1e-8)
    sol = deq(torch.ones(3), z0=torch.zeros(3, 2))  # a 1-D per-sample input
    with pytest.raises(ValueError, match=r"warm start from a Solution of batch 3, but inputs\[0\] has batch 4: a warm start "
                                         r"needs the same samples in the same order \(start a new batch from z0=None, or pass "
                                         r"z0=solution\.value\[rows\] for the rows you keep\)"):
        deq(torch.ones(4), z0=sol)
    free = deqkit.DEQ(lambda z: 0.5 * z + 1, init=lambda: torch.zeros(2, 2), tol=1e-8)  # no inputs at all
    first = free()
    assert free(z0=first).success and int(free(z0=first).stats.steps.max()) == 1
