"""A seeded random sweep of torchdeq's flags: torchdeq and deqkit.compat.torchdeq agree.

Each combination draws a solver, the gradient (phantom steps, ``ift``, ``hook_ift``), the core,
``n_states``/``indexing``, the norm, ``mem_gc``, tolerances and stop modes, budgets (also at
call time), train or eval, and one of two tiny cells (a tensor state; a list of two states),
then runs both libraries from the same seed in float64. Outputs, ``info`` and every gradient
agree to 1e-9, except where docs/migrating.md says otherwise, and there the difference itself is
asserted: ``indexing`` that torchdeq would mishandle raises; a list state with
``simple_fixed_point_iter`` runs where torchdeq crashes; what torchdeq crashes on raises too;
the only warnings are the documented ones.
"""

from __future__ import annotations

import argparse
import random
import re
import warnings

import pytest
import torch
from torch import nn

import deqkit.compat.torchdeq as compat
from test_compat_torchdeq import both64, fresh_warnings, grads, worst_difference  # noqa: F401  (fixture)

F64 = torch.float64
COMBINATIONS = 480
WARNINGS = ("fewer states come back than asked for", "ignores 'tau'", "ignores 'm'")


class Tensor1(nn.Module):
    def __init__(self):
        super().__init__()
        self.W, self.U = nn.Linear(5, 5, bias=False), nn.Linear(5, 5)

    def forward(self, lib, mem, z, x):
        wz = lib.mem_gc(self.W, (z,)) if mem else self.W(z)
        return torch.tanh(0.5 * wz + self.U(x))


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.A, self.B = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, lib, mem, a, b, x):
        ab = lib.mem_gc(self.A, (b,)) if mem else self.A(b)
        return torch.tanh(0.5 * ab + x), 0.5 * torch.tanh(self.B(a))


def draw(rng: random.Random) -> dict:
    f_max_iter = rng.randint(0, 10)
    flags = dict(f_solver=rng.choice(["fixed_point_iter", "anderson", "broyden", "simple_fixed_point_iter"]),
                 core=rng.choice(["sliced", "indexing"]), f_max_iter=f_max_iter,
                 f_tol=rng.choice([0, 1e-8, 1e-3, 0.1]), f_stop_mode=rng.choice(["abs", "rel"]),
                 tau=rng.choice([1.0, 0.6]), grad=rng.choice([1, 2, 3]))
    n_states = rng.choice([1, 1, 2, 3])
    if n_states > 1:
        flags["n_states"] = n_states
    elif rng.random() < 0.5:
        flags["indexing"] = sorted(rng.sample(range(0, f_max_iter + 3), k=rng.randint(1, 2)))
    states = n_states if n_states > 1 else len(flags.get("indexing", [])) + 1
    if rng.random() < (0.5 if states == 2 else 0.05):  # one phantom setting per state (or a mismatch)
        flags["grad"] = [1, 2]
    if rng.random() < 0.3:
        flags.update(rng.choice([dict(sup_gap=rng.choice([1, 2])), dict(sup_loc=[1])]))
    mode = rng.choice(["phantom", "phantom", "ift", "hook_ift"])
    if mode != "phantom":
        flags.update({mode: True}, b_solver=rng.choice(["fixed_point_iter", "anderson", "broyden"]),
                     b_max_iter=rng.randint(1, 12), b_tol=rng.choice([0, 1e-8, 1e-3]), b_stop_mode=rng.choice(["abs", "rel"]))
    if rng.random() < 0.2:
        flags.update(rng.choice([dict(eval_factor=1.5), dict(eval_f_max_iter=rng.randint(1, 8))]))
    norm = rng.choice(["none", "weight_norm", "spectral_norm"])
    if norm != "none":
        flags.update(norm_type=norm, norm_no_scale=rng.random() < 0.3, norm_clip=rng.random() < 0.3,
                     norm_clip_value=0.8)
    call = {}
    if rng.random() < 0.25:
        call = rng.choice([dict(f_max_iter=rng.randint(0, 8)), dict(tau=0.8), dict(m=3)])
    return dict(flags=flags, cell=rng.choice(["tensor", "pair"]), mem=rng.random() < 0.25, train=rng.random() < 0.7,
                namespace=rng.random() < 0.5, solver_kwargs=call, sradius=rng.random() < 0.05)


def run(lib, case):
    """One combination on ``lib``: ``(result, warnings)``, the result an exception when it raised."""
    flags = dict(case["flags"])
    cell = Tensor1() if case["cell"] == "tensor" else Pair()
    x = torch.randn(3, 5, dtype=F64) if case["cell"] == "tensor" else torch.randn(2, 4, dtype=F64)
    z0 = torch.zeros(3, 5, dtype=F64) if case["cell"] == "tensor" else [torch.zeros(2, 4, dtype=F64), torch.zeros(2, 3, dtype=F64)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        try:
            args = argparse.Namespace(**flags) if case["namespace"] else flags
            lib.apply_norm(cell, args=args)
            deq = lib.get_deq(args) if case["namespace"] else lib.get_deq(**flags)
            deq.train(case["train"])
            lib.reset_norm(cell)
            func = (lambda z: cell(lib, case["mem"], z, x)) if case["cell"] == "tensor" else \
                (lambda a, b: cell(lib, case["mem"], a, b, x))
            z_out, info = deq(func, z0, solver_kwargs=case["solver_kwargs"] or None,
                              sradius_mode=case["sradius"] and not case["train"])
            flat = [t for z in z_out for t in (z if isinstance(z, (list, tuple)) else [z])]
            result = dict(states=[t.detach() for t in flat], info=dict(info))
            if case["train"]:
                if flat:  # (a phantom step kept by neither sup_gap nor sup_loc leaves none)
                    sum(((i + 1) * t).pow(2).sum() for i, t in enumerate(flat)).backward()
                result["grads"] = grads(cell)
        except Exception as err:  # noqa: BLE001 - compared below
            result = err
    return result, [str(w.message) for w in record]


def mishandled_indexing(case):
    """An ``indexing`` torchdeq runs silently wrong: a cut past the budget (sliced), a step outside
    1..budget (indexing core)."""
    flags = case["flags"]
    budget = case["solver_kwargs"].get("f_max_iter", flags["f_max_iter"]) if case["train"] else flags["f_max_iter"]
    if flags.get("n_states", 1) > 1 or not flags.get("indexing"):
        return False
    if flags["core"] == "sliced":
        return any(i > budget for i in flags["indexing"]) or any(i > flags["f_max_iter"] for i in flags["indexing"])
    return any(not 1 <= i <= b for i in flags["indexing"] for b in {budget, flags["f_max_iter"]})


def test_random_flag_sweep():
    pytest.importorskip("torchdeq")
    rng = random.Random(20240601)
    counts = dict(same=0, raise_both=0, indexing_raise=0, list_simple=0, fewer_states=0)
    for i in range(COMBINATIONS):
        case = draw(rng)
        compat.utils._warned.clear()
        (theirs, _), (ours, said) = both64(lambda lib: run(lib, case))
        where = f"combination {i}: {case}"
        for message in said:
            assert any(w in message for w in WARNINGS), (where, message)
        if isinstance(ours, Exception) and not isinstance(theirs, Exception):
            assert isinstance(ours, ValueError) and re.search(r"indexing=", str(ours)), (where, ours)
            assert mishandled_indexing(case), where
            counts["indexing_raise"] += 1
            continue
        assert not mishandled_indexing(case) or isinstance(theirs, Exception), where
        if isinstance(theirs, Exception):
            if isinstance(ours, Exception):
                counts["raise_both"] += 1
                continue
            # a list state with simple_fixed_point_iter: torchdeq keeps the list and fails on it
            assert case["cell"] == "pair" and case["flags"]["f_solver"] == "simple_fixed_point_iter", (where, theirs)
            counts["list_simple"] += 1
            continue
        worst = worst_difference(ours, theirs)
        assert worst <= 1e-9, (where, worst)
        counts["fewer_states"] += any("fewer states" in m for m in said)  # (asserted in test_compat_torchdeq)
        counts["same"] += 1
    assert counts["same"] >= 0.6 * COMBINATIONS and min(counts.values()) > 0, counts
