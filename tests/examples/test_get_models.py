"""The GET student and the ViT baseline: sizes, shapes, the output contract, training, errors.

Large presets are built on the meta device (no memory, no init cost); everything that runs
uses the CPU presets at 8x8x1 (16 tokens).
"""

from __future__ import annotations

import doctest
import warnings

import pytest
import torch

import deqkit
from examples.get_distillation import models
from examples.get_distillation.models import GET, PRESETS, ModelOutput, ViT, build, count_params, macs

IMG, CH, K = 8, 1, 10  # digits shape

# Paper figures (CIFAR-10 shapes, 10 classes), in millions; GMACs per image at 6 iterations.
PAPER_PARAMS = {
    "GET-T/2": 8.6, "GET-M/2": 19.2, "GET-S/2": 37.2, "GET-B/2": 62.2, "GET-B+/2": 83.5,
    "ViT-S/2": 21.4, "ViT-B/2": 85.3, "ViT-L/2": 302.6,
}
PAPER_GMACS = {"GET-T/2": 7.0, "GET-B/2": 81.0, "ViT-B/2": 23.0, "ViT-L/2": 80.5}


def tiny(name="GET-Tiny/2", num_classes=K, **kw):
    torch.manual_seed(0)
    return build(name, img_size=IMG, channels=CH, num_classes=num_classes, **kw)


def noise(b=4):
    return torch.randn(b, CH, IMG, IMG)


def labels(b=4):
    return torch.arange(b) % K


# -- sizes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    with torch.device("meta"):
        model = build(name, img_size=32, channels=3, num_classes=10)
    # The paper counts the fixed positional table too (a frozen parameter in the original).
    assert round(count_params(model, include_pos_embed=True) / 1e6, 1) == PAPER_PARAMS[name]
    assert count_params(model) == count_params(model, include_pos_embed=True) - 256 * model.dim
    assert "pos_embed" in dict(model.named_buffers()) and "pos_embed" not in dict(model.named_parameters())


@pytest.mark.parametrize("name", list(PAPER_GMACS))
def test_macs_match_the_paper(name):
    with torch.device("meta"):
        model = build(name)
    assert macs(model) / 1e9 == pytest.approx(PAPER_GMACS[name], rel=0.02)


@pytest.mark.parametrize("patch", [2, 4])
def test_cpu_presets_are_comparable_in_size(patch):
    get, vit = tiny(f"GET-Tiny/{patch}"), tiny(f"ViT-Tiny/{patch}")
    assert get.patch == vit.patch == patch
    assert 0.28e6 <= count_params(get) <= 0.30e6
    assert abs(count_params(vit) / count_params(get) - 1) < 0.06


@pytest.mark.parametrize("size, dim, params", [("Nano", 32, (0.07e6, 0.08e6)), ("Tiny", 64, (0.28e6, 0.31e6)),
                                                ("Small", 128, (1.1e6, 1.2e6))])
def test_the_scaling_presets_double_the_width_at_head_width_16(size, dim, params):
    get, vit = tiny(f"GET-{size}/4"), tiny(f"ViT-{size}/4")
    for name, model in ((f"GET-{size}/4", get), (f"ViT-{size}/4", vit)):
        assert model.dim == dim and model.patch == 4 and dim // PRESETS[name]["heads"] == 16
        assert params[0] <= count_params(model) <= params[1]
    assert abs(count_params(vit) / count_params(get) - 1) < 0.06


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_its_family(name):
    with torch.device("meta"):
        model = build(name)
    assert isinstance(model, GET if name.startswith("GET") else ViT)
    assert model.conditional and model.class_embed.weight.shape == (10, 3 * model.dim)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="GET-T/2.*ViT-L/2"):
        build("GET-XL/2")


def test_module_docstring_example_runs():
    result = doctest.testmod(models, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# -- output contract ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["GET-Tiny/2", "ViT-Tiny/2", "GET-Tiny/4", "ViT-Tiny/4"])
@pytest.mark.parametrize("num_classes", [0, None, K])
def test_one_step_shapes(name, num_classes):
    model = tiny(name, num_classes=num_classes).eval()
    y = labels() if num_classes else None
    out = model(noise(), y)
    assert isinstance(out, ModelOutput)
    assert out.images.shape == (4, CH, IMG, IMG)
    assert len(out.iterates) == 1 and out.iterates[0].shape == out.images.shape
    if name.startswith("GET"):
        assert isinstance(out.stats, deqkit.Stats) and out.stats.nfev == 6
    else:
        assert out.stats is None and out.iterates[0] is out.images


@pytest.mark.parametrize("name", ["GET-Tiny/2", "ViT-Tiny/2"])
def test_same_output_type_in_train_and_eval(name):
    model = tiny(name)
    train_out = model.train()(noise(), labels())
    with torch.no_grad():
        eval_out = model.eval()(noise(), labels())
    assert type(train_out) is type(eval_out) is ModelOutput
    assert type(train_out.stats) is type(eval_out.stats)


def test_one_hot_labels_equal_integer_labels():
    model = tiny().eval()
    z0 = torch.randn(4, 16, 64)
    y = labels()
    a = model(noise(), y, z0=z0)
    b = model(noise(), torch.nn.functional.one_hot(y, K).float(), z0=z0)
    torch.testing.assert_close(a.images, b.images)


def test_class_embedding_enters_every_block():
    model = tiny().eval()
    z0, e = torch.randn(4, 16, 64), noise()
    with torch.no_grad():
        model.class_embed.weight.normal_()
        model.head.weight.normal_()  # the zero-initialised head would hide any difference
        a = model(e, labels(), z0=z0).images
        b = model(e, (labels() + 1) % K, z0=z0).images
    assert not torch.allclose(a, b)


def test_training_returns_every_iterate_with_grad():
    model = tiny().train()
    out = model(noise(), labels())
    assert len(out.iterates) == 6 and out.stats.nfev == 6
    assert all(t.requires_grad and t.shape == (4, CH, IMG, IMG) for t in out.iterates)
    assert int(out.stats.steps.min()) == 6  # the tolerance is never met: all 6 iterations run
    out3 = model(noise(), labels(), trajectory=3)
    assert len(out3.iterates) == 3


def test_images_are_the_last_iterate_as_in_gets_recipe():
    model = tiny().eval()
    with torch.no_grad():
        for p in model.parameters():  # a non-trivial map and head, so that iterates differ
            p.add_(0.05 * torch.randn_like(p))
        out = model(noise(8), labels(8), trajectory=6)
    assert out.stats.tol is None and bool((out.stats.steps == 6).all())
    assert torch.equal(out.images, out.iterates[-1])
    assert not torch.equal(out.iterates[-2], out.iterates[-1])


def test_fixed_start_is_deterministic_and_random_start_is_not():
    model = tiny().eval()
    with torch.no_grad():
        model.head.weight.normal_()
        e, z0 = noise(), torch.randn(4, 16, 64)
        torch.testing.assert_close(model(e, labels(), z0=z0).images, model(e, labels(), z0=z0).images)
        assert not torch.allclose(model(e, labels()).images, model(e, labels()).images)


def test_solver_and_max_steps_overrides():
    model = tiny().eval()
    e, y = noise(), labels()
    with torch.no_grad():
        assert model(e, y).stats.nfev == 6
        assert model(e, y, max_steps=12).stats.nfev == 12
        assert model(e, y, max_steps=1).stats.nfev == 1
        anderson = model(e, y, solver=deqkit.Anderson(m=3), max_steps=9, trajectory=4)
    assert anderson.stats.nfev == 9 and anderson.stats.trace.shape == (4, 9)
    assert len(anderson.iterates) == 4
    assert model.solver == deqkit.FixedPoint() and model.max_steps == 6  # not changed


def test_checkpointing_gives_the_same_gradients():
    e, y, z0 = noise(), labels(), torch.randn(4, 16, 64)
    grads = []
    for backward in (deqkit.Unrolled(), deqkit.Unrolled(checkpoint=True)):
        model = tiny(backward=backward).train()
        with torch.no_grad():
            model.head.weight.normal_()
        out = model(e, y, z0=z0)
        deqkit.fp_correction(lambda x: x.square().mean(), out.iterates).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "backward",
    [
        pytest.param(deqkit.Phantom(steps=6, tau=1.0), id="phantom"),
        pytest.param(deqkit.Phantom(steps=3, tau=0.5), id="phantom_short"),
        pytest.param(deqkit.OneStep(), id="one_step"),
        pytest.param(deqkit.Implicit(max_steps=5), id="implicit"),
    ],
)
def test_every_iterate_trains_under_every_mode(backward):
    model = tiny(backward=backward).train()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():  # away from the zero-initialised head, whose zeros stop every gradient
            p.add_(0.05 * torch.randn_like(p))
    e, y, z0 = noise(), labels(), torch.randn(4, 16, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the untrained map's adjoint may hit max_steps
        out = model(e, y, z0=z0)
        assert len(out.iterates) == 6 and all(t.requires_grad for t in out.iterates)
        with torch.no_grad():  # the same values without autograd
            plain = model(e, y, z0=z0)
        assert all(torch.equal(a.detach(), b) for a, b in zip(out.iterates, plain.iterates))
        target = torch.rand_like(out.images)
        deqkit.fp_correction(lambda im: (im - target).square().mean(), out.iterates).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"parameters without a gradient under {backward!r}: {missing}"


# -- training -------------------------------------------------------------------------------

def _train(model, steps=20, lr=1e-3, fresh_start=False):
    """Adam on 16 fixed (noise, target) pairs with GET's loss; returns the loss per step.

    The equilibrium start z0 is fixed too: with a fresh draw per step (GET's default) the
    residual blocks carry z0 into the output until the network learns to cancel it, and the
    first 20 steps mostly fight that noise (the loss still falls, but by a few percent only).
    """
    torch.manual_seed(1)
    e, y, z0 = noise(16), labels(16), torch.randn(16, 16, 64)
    pattern = torch.rand(1, CH, IMG, IMG) * 2 - 1
    target = 0.6 * pattern + 0.3 * torch.tanh(e)  # a fixed image plus a noise-dependent part
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        out = model(e, y if model.conditional else None, z0=None if fresh_start else z0)
        loss = deqkit.fp_correction(lambda x: (x - target).abs().mean(), out.iterates, gamma=0.8)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / sum(deqkit.fp_weights(len(out.iterates))))
    return losses


def _fell(losses, factor=0.9):
    return sum(losses[-3:]) < factor * sum(losses[:3])


@pytest.mark.parametrize(
    "backward",
    [
        pytest.param(deqkit.Unrolled(), id="unrolled"),
        pytest.param(deqkit.Unrolled(checkpoint=True), id="unrolled_checkpoint"),
        pytest.param(deqkit.Phantom(steps=6, tau=1.0), id="phantom"),
        pytest.param(deqkit.OneStep(), id="one_step"),
        pytest.param(deqkit.Implicit(max_steps=20, tol=1e-4), id="implicit"),
    ],
)
def test_a_few_adam_steps_lower_the_loss_get(backward):
    model = tiny(backward=backward)
    with warnings.catch_warnings():
        # 6 iterations from a random start do not converge, so the implicit adjoint is only
        # approximate and deqkit says so; that is expected here.
        warnings.filterwarnings("ignore", message="implicit backward solve", category=RuntimeWarning)
        losses = _train(model)
    assert _fell(losses), losses
    for name, p in model.equilibrium_blocks.named_parameters():  # the gradient reached the solve
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gets_own_recipe_lowers_the_loss_with_fresh_starts():
    losses = _train(tiny(), fresh_start=True)  # z0 ~ N(0, I) drawn anew every step, as in GET
    assert _fell(losses, factor=0.98), losses


@pytest.mark.parametrize("num_classes", [0, K])
def test_a_few_adam_steps_lower_the_loss_vit(num_classes):
    model = tiny("ViT-Tiny/2", num_classes=num_classes)
    losses = _train(model)
    assert _fell(losses), losses
    if num_classes:
        assert model.class_embed.weight.grad is not None and model.class_embed.weight.grad.abs().sum() > 0


def test_anderson_trains_too():
    model = tiny(solver=deqkit.Anderson(m=3))
    losses = _train(model, steps=10)
    assert losses[-1] < losses[0]


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["GET-Tiny/2", "ViT-Tiny/2"])
def test_input_errors(name):
    model = tiny(name).eval()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) = \(B, 1, 8, 8\)"):
        model(torch.randn(4, 3, 8, 8), labels())
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(1, 8, 8), labels(1))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(4, CH, IMG, IMG, dtype=torch.long), labels())
    with pytest.raises(TypeError, match="float64"):
        model(noise().double(), labels())
    with pytest.raises(ValueError, match="class-conditional"):
        model(noise())
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        model(noise(), torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="batch size 4"):
        model(noise(), labels(3))
    uncond = tiny(name, num_classes=0)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(noise(), labels())


def test_construction_errors():
    with pytest.raises(ValueError, match="img_size=30 is not divisible by patch=4"):
        build("GET-Tiny/2", img_size=30, patch=4)
    with pytest.raises(ValueError, match="dim=64 is not divisible by heads=5"):
        build("ViT-Tiny/2", img_size=8, heads=5)
    with pytest.raises(TypeError, match="not a class|solver object"):
        build("GET-Tiny/2", img_size=8, solver=deqkit.FixedPoint)
    with pytest.raises(TypeError, match="backward"):
        build("GET-Tiny/2", img_size=8, backward="unrolled")
    with pytest.raises(ValueError, match="max_steps"):
        build("GET-Tiny/2", img_size=8, max_steps=0)
    model = tiny().eval()
    with pytest.raises(ValueError, match="trajectory"):
        model(noise(), labels(), trajectory=0)
    with pytest.raises(ValueError, match="z0 must have shape"):
        model(noise(), labels(), z0=torch.randn(4, 16, 32))


def test_get_holds_one_solve_options_record():
    import deqkit

    model = models.build("GET-Tiny/4", img_size=8, channels=1, num_classes=10)
    assert model.options == models.GET_OPTIONS and model.max_steps == 6
    tuned = models.build("GET-Tiny/4", img_size=8, channels=1, num_classes=10, max_steps=3, tol=1e-3, stop_mode="rel")
    assert tuned.options == models.GET_OPTIONS.replace(max_steps=3, tol=1e-3, stop_mode="rel") and tuned.max_steps == 3
    own = deqkit.SolveOptions(tol=None, max_steps=2, throw=False)
    assert models.build("GET-Tiny/4", img_size=8, channels=1, options=own).options == own
    with pytest.raises(TypeError, match=r"unknown solve option 'max_step' \(did you mean 'max_steps'\?\)"):
        models.build("GET-Tiny/4", img_size=8, channels=1, max_step=3)
    with pytest.raises(TypeError, match="options must be a deqkit.SolveOptions, got dict"):
        models.GET(8, 1, 10, options={"max_steps": 3})
    out = tuned.eval()(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert out.stats.tol == 1e-3 and out.stats.stop_mode == "rel" and int(out.stats.steps.max()) <= 3
