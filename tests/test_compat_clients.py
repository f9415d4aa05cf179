"""Five programs' ways of using torchdeq, run on torchdeq and on deqkit.compat.torchdeq.

Each test is a small model written the way one of these programs uses torchdeq's API (written
here from reading their public code; no code of theirs is copied): DEQ-Flow (optical flow),
MDEQ (multiscale classification), deq-seq (sequence model), DEQ-INR (implicit neural
representations) and GET (generative equilibrium transformer). The parts that matter are the
calls: an argparse namespace holding the program's own flags beside torchdeq's, keywords the
validation loops pass, weight initialisation after ``apply_norm``, warm starts, DataParallel
checkpoints loaded with ``strict=False``, optimizer groups and EMA copies by parameter name.
Each runs a few optimizer steps on both libraries from the same seed in float64: outputs,
``info``, every gradient and the parameters after the steps agree to 1e-9.
"""

from __future__ import annotations

import argparse
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from deqkit.compat.torchdeq import TorchDEQCompatWarning
from test_compat_torchdeq import assert_same, both64, fresh_warnings, grads  # noqa: F401  (fixture)

F64 = torch.float64


def parser_with(lib, *flags):
    """An argparse parser with the program's own ``flags`` (name, keywords) and torchdeq's."""
    parser = argparse.ArgumentParser()
    for name, kwargs in flags:
        parser.add_argument(name, **kwargs)
    lib.add_deq_args(parser)
    return parser


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- DEQ-Flow: two states (hidden, flow), a namespace full of the program's flags -------------------
DEQ_FLOW_FLAGS = [("--gma", dict(action="store_true")), ("--tiny", dict(action="store_true")),
                  ("--all_grad", dict(action="store_true")), ("--mixed_precision", dict(action="store_true")),
                  ("--lr", dict(type=float, default=4e-4)), ("--wdecay", dict(type=float, default=1e-4)),
                  ("--gpus", dict(type=int, nargs="+", default=[0, 1])), ("--stage", dict(default="chairs")),
                  ("--validation", dict(nargs="+", default=["chairs"])), ("--restore_ckpt", dict(default=None))]


class FlowUpdate(nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.gate = nn.Conv2d(hidden + 2 + 3, hidden, 3, padding=1)
        self.flow_head = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, h, c, ctx):
        h = 0.5 * h + 0.5 * torch.tanh(self.gate(torch.cat([h, c, ctx], dim=1)))
        return h, 0.1 * self.flow_head(h)


class FlowModel(nn.Module):
    def __init__(self, lib, args):
        super().__init__()
        self.lib, self.args = lib, args
        if "dropout" not in args:  # the program adds its own keys to the namespace
            args.dropout = 0
        args.corr_levels = 4
        self.context = nn.Conv2d(3, 3, 3, padding=1)
        self.update_block = FlowUpdate()
        self.mask = nn.Conv2d(4, 2, 1)
        lib.apply_norm(self.update_block, args=args)
        self.deq = lib.get_deq(args)

    def forward(self, image, flow_gt=None, cached_result=None, writer=None, sradius_mode=False, **kwargs):
        ctx = torch.relu(self.context(image))
        b, _, h, w = image.shape
        net, flow = torch.zeros(b, 4, h, w, dtype=F64), torch.zeros(b, 2, h, w, dtype=F64)
        if cached_result:  # warm start from the previous frame's fixed point
            net, flow = cached_result
        self.lib.reset_norm(self.update_block)

        def func(h, c):
            if not self.args.all_grad:
                c = c.detach()
            new_h, delta = self.update_block(h, c, ctx)
            return new_h, c + delta

        z_out, info = self.deq(func, (net, flow), sradius_mode=sradius_mode, backward_writer=writer, **kwargs)
        preds = [c + self.mask(h) for h, c in z_out]
        if self.training:
            valid = (flow_gt.abs().sum(1, keepdim=True) < 10).to(F64)
            loss = self.lib.fp_correction(lambda p, g, v: ((p - g).abs() * v).mean(), (preds, flow_gt, valid),
                                          gamma=self.args.gamma)
            return loss, info
        return preds[-1], {"sradius": info["sradius"], "cached_result": tuple(z_out[-1])}


@pytest.mark.parametrize("argv", [
    ["--f_solver", "simple_fixed_point_iter", "--f_max_iter", "6", "--n_states", "2", "--grad", "1", "--gma"],
    ["--f_solver", "anderson", "--f_max_iter", "8", "--ift", "--b_max_iter", "10", "--norm_type", "spectral_norm", "--all_grad"],
])
def test_deq_flow(argv):
    def program(lib):
        args = parser_with(lib, *DEQ_FLOW_FLAGS).parse_args(argv)
        model = nn.DataParallel(FlowModel(lib, args), device_ids=args.gpus)  # the CPU runs the module itself
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wdecay)
        image, flow_gt = torch.randn(2, 3, 4, 5, dtype=F64), torch.randn(2, 2, 4, 5, dtype=F64)
        records, steps = [], []
        for _ in range(3):
            opt.zero_grad()
            loss, info = model(image, flow_gt, writer=records.append)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps.append((loss.detach(), dict(info), grads(model)))
        model.eval()
        best = {"epe": 1e8}
        with torch.no_grad():  # validation: the evaluation keywords reach the DEQ call
            flow, extra = model.module(image, sradius_mode=args.sradius_mode, best=best)
            warm, _ = model.module(image, cached_result=extra["cached_result"], best=best)
        fresh = nn.DataParallel(FlowModel(lib, parser_with(lib, *DEQ_FLOW_FLAGS).parse_args(argv)))
        keys = fresh.load_state_dict(model.state_dict(), strict=False)
        return steps, records, flow, extra, warm, state(model), keys.missing_keys + keys.unexpected_keys

    with pytest.warns(TorchDEQCompatWarning, match="the DEQ call ignores 'best', as torchdeq does"):
        theirs, ours = both64(program)
    assert_same(ours, theirs)
    assert ours[-1] == [] and any(k.endswith("update_block.gate.weight_g") for k in ours[-2])
    assert len(ours[1]) == (3 if "--ift" in argv else 0)  # backward_writer: one record per IFT backward


# -- MDEQ: a list of multi-resolution states, filter_out, writer= / solver_kwargs={'tau'} ---------------
MDEQ_FLAGS = [("--cfg", dict(default="cls_mdeq_LARGE.yaml")), ("--percent", dict(type=float, default=1.0)),
              ("--local_rank", dict(type=int, default=0)), ("--wd", dict(type=float, default=5e-4))]


class MultiScale(nn.Module):
    def __init__(self, c=3):
        super().__init__()
        self.branch = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)])
        self.fuse_layers = nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1), nn.Conv2d(c, c, 1)])

    def forward(self, z, u):
        hi, lo = (torch.tanh(0.4 * b(x) + inj) for b, x, inj in zip(self.branch, z, u))
        up = F.interpolate(self.fuse_layers[1](lo), scale_factor=2.0)
        return [0.5 * (hi + 0.5 * up), 0.5 * (lo + 0.5 * self.fuse_layers[0](hi))]


class MDEQClassifier(nn.Module):
    def __init__(self, lib, args, imagenet):
        super().__init__()
        self.lib, self.args, self.imagenet = lib, args, imagenet
        self.stem = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
        self.full_stage = MultiScale()
        self.head = nn.Linear(6, 4)
        lib.apply_norm(self.full_stage, args=args, filter_out="fuse_layers")
        self.deq = lib.get_deq(args)
        for m in self.modules():  # the program's init_weights, after apply_norm, through .data
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, 0.1)

    def forward(self, x, train_step=-1, **kwargs):
        u = [self.stem(x), torch.zeros(x.shape[0], 3, x.shape[2] // 2, x.shape[3] // 2, dtype=F64)]
        self.lib.reset_norm(self.full_stage)
        z_now = [torch.zeros_like(each) for each in u]
        func = lambda *z: self.full_stage(z, u)  # noqa: E731
        if self.imagenet:
            z_out, info = self.deq(func, z_now, solver_kwargs={"tau": self.args.tau})
        else:
            z_out, info = self.deq(func, z_now, writer=kwargs.get("writer", None))
        logits = [self.head(torch.cat([z.mean((2, 3)) for z in zs], dim=1)) for zs in z_out]
        return (logits if self.training else logits[-1]), info


@pytest.mark.parametrize("imagenet, argv, warning", [
    (False, ["--f_solver", "anderson", "--f_max_iter", "8", "--n_states", "2", "--tau", "0.8"],
     "the DEQ call ignores 'writer' \\(did you mean 'backward_writer'\\?\\)"),
    (True, ["--f_solver", "broyden", "--f_max_iter", "7", "--ift", "--b_solver", "broyden", "--f_stop_mode", "rel",
            "--tau", "0.6"], "torchdeq's broyden ignores 'tau'"),
])
def test_mdeq(imagenet, argv, warning):
    def program(lib):
        args = parser_with(lib, *MDEQ_FLAGS).parse_args(argv)
        model = MDEQClassifier(lib, args, imagenet)
        decay = [p for n, p in model.named_parameters() if not n.endswith(("bias", "weight_g")) and "stem.1" not in n]
        rest = [p for n, p in model.named_parameters() if n.endswith(("bias", "weight_g")) or "stem.1" in n]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": args.wd}, {"params": rest, "weight_decay": 0.0}],
                              lr=0.05, momentum=0.9, nesterov=True)
        x, target = torch.randn(3, 2, 4, 4, dtype=F64), torch.tensor([0, 3, 1])
        steps = []
        for step in range(3):
            opt.zero_grad()
            logits, info = model(x, train_step=step, writer=print)
            loss = lib.fp_correction(F.cross_entropy, (logits, target), gamma=args.gamma)
            loss.backward()
            opt.step()
            steps.append((loss.detach(), dict(info), grads(model)))
        checkpoint = {"state_dict": nn.DataParallel(model).module.state_dict(), "optimizer": opt.state_dict()}
        restored = MDEQClassifier(lib, args, imagenet)
        keys = restored.load_state_dict(checkpoint["state_dict"], strict=False)
        restored.eval()
        with torch.no_grad():
            evaluation = restored(x)
        return steps, evaluation, state(model), [len(g["params"]) for g in opt.param_groups], keys.missing_keys

    with pytest.warns(TorchDEQCompatWarning) as record:
        theirs, ours = both64(program)
    messages = {str(w.message) for w in record}
    assert any(re.search(warning, m) for m in messages)
    # init_weights wrote into the weight-normed convolutions: dropped at reset_norm, by both
    assert any(re.search("write into Conv2d.weight after apply_norm is dropped", m) for m in messages)
    assert_same(ours, theirs)
    assert ours[-2] == [6, 10] and ours[-1] == []  # name-based groups: conv weights decay, weight_g / biases do not


# -- deq-seq: weights_init after apply_norm, reset_deq, variational dropout, jac_reg --------------------
DEQ_SEQ_FLAGS = [("--d_model", dict(type=int, default=6)), ("--dropout", dict(type=float, default=0.2)),
                 ("--init", dict(default="normal")), ("--init_std", dict(type=float, default=0.05)),
                 ("--clip", dict(type=float, default=0.25)), ("--eval-interval", dict(type=int, default=4000)),
                 ("--multi_gpu", dict(action="store_true"))]


class SeqCell(nn.Module):
    def __init__(self, lib, d):
        super().__init__()
        self.qkv = nn.Conv1d(d, 3 * d, 1)
        self.out = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.drop = lib.VariationalDropout1d(0.2, token_first=False)

    def forward(self, z, u):  # (B, d, L), (B, 3d, L)
        q, k, v = (self.qkv(z) + u).chunk(3, dim=1)
        att = torch.softmax(q.transpose(1, 2) @ k / 3.0, dim=-1) @ v.transpose(1, 2)  # (B, L, d)
        return self.ln(self.out(att) + self.drop(z).transpose(1, 2)).transpose(1, 2)


class SeqModel(nn.Module):
    def __init__(self, lib, args, vocab=7):
        super().__init__()
        self.lib, self.args = lib, args
        self.emb = nn.Embedding(vocab, args.d_model)
        self.inject = nn.Conv1d(args.d_model, 3 * args.d_model, 1)
        self.func = SeqCell(lib, args.d_model)
        self.crit = nn.Linear(args.d_model, vocab)
        lib.apply_norm(self.func, args=args)
        self.deq = lib.get_deq(args)

    def forward(self, data, target, compute_jac_loss=True, sradius_mode=False, writer=None):
        self.lib.reset_deq(self)
        u = self.inject(self.emb(data).transpose(1, 2))
        z0 = torch.zeros(data.shape[0], self.args.d_model, data.shape[1], dtype=F64)
        func = lambda z: self.func(z, u)  # noqa: E731
        z_out, info = self.deq(func, z0, sradius_mode=sradius_mode, backward_writer=writer)
        jac_loss = self.lib.jac_reg(func(z_out[-1]), z_out[-1]) if self.training and compute_jac_loss else 0.0
        crit = lambda z, t: F.cross_entropy(self.crit(z.transpose(1, 2)).flatten(0, 1), t.flatten())  # noqa: E731
        return self.lib.fp_correction(crit, (z_out, target), gamma=self.args.gamma), jac_loss, info


def weights_init(args):
    def init(m):
        name = m.__class__.__name__
        if name.find("Linear") != -1 or name.find("Conv1d") != -1:
            if hasattr(m, "weight") and m.weight is not None:
                nn.init.normal_(m.weight, 0.0, args.init_std)
            if hasattr(m, "bias") and m.bias is not None:
                nn.init.constant_(m.bias, 0.0)
        elif name.find("LayerNorm") != -1:
            nn.init.normal_(m.weight, 1.0, args.init_std)

    return init


@pytest.mark.parametrize("argv", [
    ["--ift", "--f_solver", "broyden", "--b_solver", "broyden", "--f_stop_mode", "rel", "--b_stop_mode", "rel",
     "--f_tol", "1e-6", "--b_tol", "1e-6", "--f_max_iter", "12", "--b_max_iter", "12", "--norm_type", "weight_norm"],
    ["--norm_type", "spectral_norm", "--f_solver", "anderson", "--f_max_iter", "10", "--grad", "2", "--n_states", "2"],
])
def test_deq_seq(argv):
    def program(lib):
        args = parser_with(lib, *DEQ_SEQ_FLAGS).parse_args(argv)
        model = SeqModel(lib, args)
        model.apply(weights_init(args))  # after apply_norm, as the program does
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        data, target = torch.randint(0, 7, (2, 5)), torch.randint(0, 7, (2, 5))
        steps, records = [], []
        for _ in range(3):
            opt.zero_grad()
            loss, jac_loss, info = model(data, target, writer=lambda info: records.append(info["abs_lowest"].mean()))
            (loss + 0.1 * jac_loss).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            steps.append((loss.detach(), jac_loss.detach(), dict(info), grads(model)))
        model.eval()
        with torch.no_grad():
            evaluation = model(data, target, sradius_mode=True)
        return steps, records, evaluation, state(model)

    if "weight_norm" in argv:  # torchdeq drops the init at the first reset_deq; so does the layer, with a warning
        with pytest.warns(TorchDEQCompatWarning, match="after apply_norm is dropped"):
            theirs, ours = both64(program)
    else:  # spectral norm: the init lands in weight_orig, in both
        theirs, ours = both64(program)
    assert_same(ours, theirs)


# -- DEQ-INR: warm starts from a cache, skip_solver (f_max_iter=0), gradients of the output in x ---------
INR_FLAGS = [("--dataset", dict(default="nature")), ("--lr", dict(type=float, default=1e-3)),
             ("--filters", dict(nargs="+", default=["siren_like"])), ("--input_scale", dict(type=float, default=256.0)),
             ("--no_skip_solver", dict(action="store_true")), ("--verbose", dict(action="store_true"))]


class INRModel(nn.Module):
    def __init__(self, lib, args, channels=5):
        super().__init__()
        self.lib, self.channels = lib, channels
        self.injection = nn.Linear(2, channels)
        self.f = nn.ModuleList([nn.Linear(channels, channels), nn.Linear(channels, channels)])
        self.output_map = nn.Linear(channels, 1)
        lib.apply_norm(self.f, args=args)
        self.deq = lib.get_deq(args)

    def forward(self, x, z=None, skip_solver=False, verbose=False, include_grad=False, **kwargs):
        if z is None:
            z = torch.zeros(*x.shape[:-1], self.channels, dtype=F64)
        if include_grad:
            x.requires_grad_(True)
        u = torch.sin(self.injection(x))
        self.lib.reset_norm(self.f)
        func = lambda z: torch.sin(0.5 * self.f[1](torch.sin(self.f[0](z)))) * u  # noqa: E731
        z_out, info = self.deq(func, z, solver_kwargs={"f_max_iter": 0} if skip_solver else {}, **kwargs)
        out = {"output": self.output_map(z_out[-1]), "imp_layer_output": z_out[-1], "rel": info["rel_lowest"],
               "forward_steps": info["nstep"].mean().item()}
        if include_grad:
            out["grad"] = torch.autograd.grad(out["output"], [x], torch.ones_like(out["output"]), create_graph=True)[0]
        return out


def test_deq_inr():
    argv = ["--f_solver", "fixed_point_iter", "--f_max_iter", "15", "--f_tol", "1e-3", "--f_stop_mode", "abs", "--grad", "3"]

    def program(lib):
        args = parser_with(lib, *INR_FLAGS).parse_args(argv)
        model = INRModel(lib, args)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        coords, target = torch.rand(10, 2, dtype=F64), torch.rand(10, 1, dtype=F64)
        z_init = torch.zeros(10, model.channels, dtype=F64)  # the cache of fixed points, one per pixel
        steps = []
        for i in range(3):
            idx = torch.randperm(10)[:6]
            out = model(coords[idx], z_init[idx], skip_solver=not args.no_skip_solver and i > 0, verbose=args.verbose)
            z_init[idx] = out["imp_layer_output"].detach()
            loss = F.mse_loss(out["output"], target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps.append((loss.detach(), out["forward_steps"], out["rel"], grads(model)))
        out = model(coords, z_init, include_grad=True)  # d output / d x through the phantom steps, differentiated
        out["grad"].pow(2).sum().backward()
        model.eval()
        with torch.no_grad():
            evaluation = model(coords)["output"]
        return steps, out["grad"].detach(), grads(model), evaluation, z_init, state(model)

    theirs, ours = both64(program)
    assert_same(ours, theirs)


# -- GET: f_max_iter=0 with 6 phantom steps, mem_gc, an EMA copy updated by parameter name -----------
GET_FLAGS = [("--model", dict(default="GET-T/2")), ("--cond", dict(action="store_true")),
             ("--mem", dict(action="store_true")), ("--ema_decay", dict(type=float, default=0.9)),
             ("--lr", dict(type=float, default=1e-3)), ("--global_seed", dict(type=int, default=0))]


class GETBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, z, c, u):
        q, k, v = (self.qkv(self.ln(z)) + u).chunk(3, dim=-1)
        z = z + torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v
        return z + self.mlp(self.ln(z)) if c is None else z + self.mlp(self.ln(z)) * c


class GETModel(nn.Module):
    def __init__(self, lib, args, d=4):
        super().__init__()
        self.lib, self.mem = lib, args.mem
        self.x_embedder = nn.Linear(3, d)
        self.qkv_inj = nn.Linear(d, 3 * d * 2, bias=False)
        self.deq_blocks = nn.ModuleList([GETBlock(d), GETBlock(d)])
        self.final_layer = nn.Linear(d, 3)
        self.deq = lib.get_deq(args)
        lib.apply_norm(self.deq_blocks, args=args)

    def forward(self, x, y=None):
        self.lib.reset_norm(self)
        x = self.x_embedder(x)
        u_list = self.qkv_inj(x).chunk(2, dim=-1)

        def func(z):
            for block, u in zip(self.deq_blocks, u_list):
                z = self.lib.mem_gc(block, (z, None, u)) if self.mem else block(z, None, u)
            return z

        z_out, info = self.deq(func, torch.randn_like(x))
        return [self.final_layer(z) for z in z_out] if self.training else self.final_layer(z_out[-1])


@pytest.mark.parametrize("argv", [
    ["--grad", "6", "--sup_gap", "1", "--f_max_iter", "0", "--eval_f_max_iter", "6", "--norm_type", "none", "--mem"],
    ["--grad", "3", "--sup_gap", "1", "--f_max_iter", "0", "--eval_f_max_iter", "4", "--norm_type", "weight_norm"],
])
def test_get(argv):
    def program(lib):
        args = parser_with(lib, *GET_FLAGS).parse_args(argv)
        model, ema = GETModel(lib, args), GETModel(lib, args)
        for p in ema.parameters():
            p.requires_grad = False
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)

        @torch.no_grad()
        def update_ema(decay):
            ema_params = dict(ema.named_parameters())
            for name, param in model.named_parameters():
                ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)

        update_ema(0.0)
        model.train(), ema.eval()
        noise, image = torch.randn(2, 5, 3, dtype=F64), torch.randn(2, 5, 3, dtype=F64)
        steps = []
        for _ in range(3):
            preds = model(noise)
            loss, values = lib.fp_correction(nn.L1Loss(), (preds, image), return_loss_values=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            update_ema(args.ema_decay)
            steps.append((loss.detach(), values, grads(model)))
        with torch.no_grad():
            sample = ema(noise)
        return steps, sample, state(ema), [n for n, _ in ema.named_parameters()]

    theirs, ours = both64(program)
    assert_same(ours, theirs)
    assert len(ours[0][0][1]) == int(argv[1])  # one loss term per phantom step
