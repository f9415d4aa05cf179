"""Every refusal of the core, word for word: a message is part of the interface (it names the
argument, the value and the fix), so a change to one is a change a test sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deqkit
from deqkit._problem import Problem

F64 = torch.float64


def message(call):
    with pytest.raises(Exception) as info:
        call()
    return type(info.value).__name__, str(info.value)


CASES = [
    # options
    (lambda: deqkit.SolveOptions(tol=0), ("ValueError", "tol must be a finite number > 0, or None for a fixed number of "
                                                         "iterations (exactly max_steps), got 0")),
    (lambda: deqkit.SolveOptions(max_steps=0), ("ValueError", "max_steps must be an integer >= 1, got 0. For no solver "
                                                "iterations and k differentiated steps from z0 (torchdeq's f_max_iter=0 with "
                                                "grad=k, GET's recipe) use backward=deqkit.Unrolled(), max_steps=k, tol=None: the "
                                                "same values and gradients")),
    (lambda: deqkit.SolveOptions(max_steps=2.0), ("ValueError", "max_steps must be an integer >= 1, got 2.0")),
    (lambda: deqkit.SolveOptions(divergence=1), ("ValueError", "divergence must be a number > 1, or None to never stop on "
                                                 "divergence, got 1")),
    (lambda: deqkit.SolveOptions(escape=float("inf")), ("ValueError", "escape must be a number > 1, or None to never judge "
                                                        "escapes, got inf")),
    (lambda: deqkit.SolveOptions(check_every=0), ("ValueError", "check_every must be an integer >= 1 (test convergence every "
                                                  "k iterations), got 0")),
    (lambda: deqkit.SolveOptions(trajectory=-1), ("ValueError", "trajectory must be an integer >= 0, got -1")),
    (lambda: deqkit.SolveOptions(stop_mode="relative"), ("ValueError", "stop_mode must be one of ('abs', 'rel'), got 'relative'")),
    (lambda: deqkit.SolveOptions(active_set=np.bool_(True)), ("TypeError", "active_set must be True or False, got np.True_")),
    (lambda: deqkit.SolveOptions().replace(tolerance=1), ("TypeError", "unknown solve option 'tolerance'; the options are tol, "
                                                          "stop_mode, max_steps, active_set, divergence, escape, trajectory, "
                                                          "check_every, throw, throw_on_max_steps")),
    (lambda: deqkit.SolveOptions().replace(max_step=1), ("TypeError", "unknown solve option 'max_step' (did you mean "
                                                         "'max_steps'?); the options are tol, stop_mode, max_steps, active_set, "
                                                         "divergence, escape, trajectory, check_every, throw, throw_on_max_steps")),
    # solvers and backward modes
    (lambda: deqkit.Anderson(m=0), ("ValueError", "m must be an integer >= 1, got 0")),
    (lambda: deqkit.Anderson(lam=-1), ("ValueError", "lam must be a finite number >= 0, got -1")),
    (lambda: deqkit.Anderson(beta=1.5), ("ValueError", "beta must be a number in (0, 1], got 1.5")),
    (lambda: deqkit.Anderson(restart=1), ("ValueError", "restart must be a number > 1, got 1")),
    (lambda: deqkit.NewtonKrylov(jvp="reverse"), ("ValueError", "jvp must be one of ('auto', 'forward', 'finite_difference'), "
                                                  "got 'reverse'")),
    (lambda: deqkit.NewtonKrylov(krylov_rtol=0), ("ValueError", "krylov_rtol must be a finite number > 0, got 0")),
    (lambda: deqkit.Phantom(steps=0), ("ValueError", "steps must be an integer >= 1, got 0")),
    (lambda: deqkit.Unrolled(checkpoint="yes"), ("TypeError", "checkpoint must be True or False, got 'yes'")),
    (lambda: deqkit.Implicit(tol=None), ("ValueError", "Implicit(tol=None) is not allowed: the adjoint solve needs a tolerance > 0")),
    (lambda: deqkit.fixed_point(torch.cos, torch.zeros(1, 1), solver=deqkit.Anderson),
     ("TypeError", "solver must be a solver object, not a class: use solver=Anderson()")),
    (lambda: deqkit.fixed_point(torch.cos, torch.zeros(1, 1), solver="anderson"),
     ("TypeError", "solver must be a solver object, got the string 'anderson': use deqkit.solvers.get('anderson') to turn a "
                   "name into a solver")),
    (lambda: deqkit.fixed_point(torch.cos, torch.zeros(1, 1), solver=object()),
     ("TypeError", None)),  # names the object: its repr has an address
    (lambda: deqkit.fixed_point(torch.cos, torch.zeros(1, 1), backward=deqkit.Implicit),
     ("TypeError", "backward must be a backward-mode object, not a class: use backward=Implicit()")),
    (lambda: deqkit.fixed_point(torch.cos, torch.zeros(1, 1), backward="implicit"),
     ("TypeError", "backward must be a deqkit backward mode (Implicit, Phantom, Unrolled, OneStep), got 'implicit'")),
    (lambda: deqkit.Fallback(deqkit.Anderson()), ("TypeError", "Fallback needs at least two solvers: Fallback(first, next, ...)")),
    (lambda: deqkit.solvers.get("fallback", solvers=3), ("TypeError", "fallback needs solvers=[...], a list of solver names, "
                                                         "dicts or objects; got 3")),
    # the start and the map
    (lambda: deqkit.fixed_point(torch.cos, [0.0]), ("TypeError", "z0 must be a torch.Tensor, got list")),
    (lambda: deqkit.fixed_point(torch.cos, torch.zeros(0, 2)), ("ValueError", "z0 must have a non-empty batch dimension first, "
                                                                "got shape (0, 2)")),
    (lambda: deqkit.fixed_point(torch.cos, torch.zeros(2, dtype=torch.long)), ("TypeError", "z0 must be a floating-point tensor, "
                                                                               "got dtype torch.int64")),
    (lambda: deqkit.fixed_point(torch.cos, torch.tensor([[float("nan")]])), ("ValueError", "z0 contains NaN or Inf; start the "
                                                                             "solve from a finite tensor")),
    (lambda: deqkit.fixed_point(3, torch.zeros(1, 1)), ("TypeError", "f must be callable, got int")),
    (lambda: deqkit.fixed_point(lambda z: z.sum(), torch.zeros(2, 2)), ("ValueError", "f must return a tensor of the same shape "
                                                                        "as z: f(z) has shape (), z has shape (2, 2)")),
    (lambda: deqkit.fixed_point(lambda z: [z], torch.zeros(2, 2)), ("TypeError", "f must return a Tensor, got list")),
    (lambda: deqkit.fixed_point(lambda z: z.double(), torch.zeros(2, 2)), ("ValueError", "f must return z0's dtype: f(z) is "
                                                                           "torch.float64, z0 is torch.float32 (under autocast the "
                                                                           "output is cast back automatically)")),
    (lambda: deqkit.fixed_point(lambda z: z.mul_(0.5), torch.ones(2, 2)), ("ValueError", "f changed its argument(s) ['z'] in place "
                                                                          "(e.g. z.mul_(...)); the solver keeps and reuses its "
                                                                          "iterates, so f must compute its result out of place "
                                                                          "(z * 0.5, not z.mul_(0.5))")),
    (lambda: deqkit.fixed_point(lambda z, x: z + x, torch.zeros(2, 2), inputs=(torch.zeros(3, 2),), active_set=True),
     ("ValueError", "with active_set=True every tensor in inputs= is per-sample and sliced with z, so its first dim must be the "
                    "batch size 2; inputs[0] has shape (3, 2). Pass tensors shared by all samples (weights, per-feature vectors) "
                    "through f's closure or module instead.")),
    (lambda: deqkit.fixed_point(lambda z, x: z + x[:, None], torch.zeros(2, 2), inputs=(torch.zeros(2),), active_set=True),
     ("ValueError", "with active_set=True, inputs[0] of shape (2,) is ambiguous: one value per sample, or a vector shared by all "
                    "samples whose length happens to equal the batch size 2? Pass per-sample values as shape (2, 1) (they are "
                    "sliced with z), and shared tensors through f's closure or module.")),
    (lambda: Problem(torch.cos, torch.zeros(1, 2)).jvp(torch.zeros(1, 2), torch.ones(1, 2), method="finite_difference"),
     ("ValueError", "a finite-difference JVP needs fz = f(z)")),
    # diagnostics
    (lambda: deqkit.jacobian_reg(torch.cos, torch.zeros(2, 2), n_samples=0), ("ValueError", "n_samples must be an integer >= 1, got 0")),
    (lambda: deqkit.spectral_radius(torch.cos, torch.zeros(2, 2), n_iters=np.int64(0)), ("ValueError", "n_iters must be an integer "
                                                                                         ">= 1, got np.int64(0)")),
    (lambda: deqkit.nn.VariationalDropout(shared_dims=(0,)), ("ValueError", "shared_dims cannot include the batch dim 0")),
    (lambda: deqkit.nn.VariationalDropout(shared_dims=(1.5,)), ("TypeError", "shared_dims must be a tuple of dims (ints), got (1.5,)")),
]


@pytest.mark.parametrize("call,expected", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_message(call, expected):
    kind, text = message(call)
    assert kind == expected[0]
    if expected[1] is None:
        assert "must have init() and step() methods (e.g. deqkit.Anderson()), got <object object at" in text
    else:
        assert text == expected[1]


def test_the_fallback_and_escape_messages():
    kind, text = message(lambda: deqkit.Fallback(deqkit.Anderson(), deqkit.TorchDEQSolver("anderson")))
    assert (kind, text) == ("ValueError", "Fallback cannot hand failed samples to TorchDEQSolver(name='anderson', kwargs=()): it "
                                          "runs a loop of its own from its own start, so it cannot continue from another "
                                          "solver's iterates. Put it first, or use a solver that steps.")
    assert deqkit.Result.ESCAPED.message == (
        "the relative residual met the tolerance only because ||f(z)|| grew while ||f(z) - z|| did not fall: the iterate ran "
        "away and the map has no fixed point within reach (bound the map, e.g. end it with a normalisation, or use "
        "stop_mode='abs')")
    kind, text = message(lambda: deqkit.fixed_point(lambda z: z + 1, torch.zeros(2, 3), solver=deqkit.FixedPoint(), tol=1e-2,
                                                    max_steps=200))
    assert kind == "SolveError" and text.startswith("fixed-point solve ended with ESCAPED: the relative residual met the "
                                                    "tolerance only because ||f(z)|| grew")
    assert "(samples [0, 1] of 2;" in text
