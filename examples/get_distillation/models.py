"""The one-step students: the Generative Equilibrium Transformer (GET) and a ViT baseline.

Both map a noise image ``e`` (and optionally a class label) to an image in one network call.
They share the stem (patch embedding + fixed 2-D sin-cos positions), the pre-LN transformer
block with additive q/k/v conditioning, and the head (LayerNorm -> zero-initialised linear ->
unpatchify). GET adds an equilibrium part: ``L_e`` weight-tied blocks solved to a fixed point
with deqkit, each receiving a per-token injection ``u_i`` in its q/k/v pre-activations
(Geng, Pokle, Kolter, "One-step diffusion distillation via deep equilibrium models", 2023).

Both return a :class:`ModelOutput` -- the same type in training and evaluation::

    >>> import torch
    >>> from examples.get_distillation.models import build
    >>> model = build("GET-Tiny/2", img_size=8, channels=1, num_classes=10).eval()
    >>> out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 7]))
    >>> out.images.shape, len(out.iterates), out.stats.nfev
    (torch.Size([2, 1, 8, 8]), 1, 6)

Parameter counts: :func:`count_params` counts trainable parameters. The paper's figures
(8.6M for GET-T/2 ... 302.6M for ViT-L/2) also count the fixed positional table, which the
original code stores as a frozen parameter (here it is a buffer); pass
``include_pos_embed=True`` to reproduce them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import deqkit

__all__ = ["GET", "ViT", "ModelOutput", "PRESETS", "build", "count_params", "macs"]


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """What a student returns, in training and evaluation alike.

    ``images``: (B, C, H, W), the prediction (GET: decoded from the solve's value, by default
    its last iterate). ``iterates``: decoded iterates for fixed-point correction, oldest first,
    never empty (ViT: ``(images,)``). ``stats``: the deqkit solve record (ViT: None).
    ``tokens``: GET's solve value ``f(z_k)`` (B, N, D) and ``injection``: its ``u`` (B, N, 3D*L_e),
    both with their graphs, for penalties on the map there (:meth:`GET.jacobian_penalty`); ViT: None.
    """

    images: Tensor
    iterates: tuple[Tensor, ...]
    stats: Optional[deqkit.Stats] = None
    tokens: Optional[Tensor] = None
    injection: Optional[Tensor] = None


# --------------------------------------------------------------------------------------------
# Shared parts
# --------------------------------------------------------------------------------------------

def sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positions, (grid*grid, dim): half the channels encode the column, half the row."""
    if dim % 4:
        raise ValueError(f"the embedding width must be divisible by 4 for 2-D sin-cos positions, got {dim}")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * freqs  # (N, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, D/2)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (N, D)


class Attention(nn.Module):
    """Multi-head self-attention whose q/k/v pre-activations take an additive injection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, inject: Optional[Tensor] = None) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x)  # (B, N, 3D)
        if inject is not None:
            qkv = qkv + inject  # (B, N, 3D); inject is (B, N, 3D) or (B, 1, 3D)
        q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, D/H) each
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # (B, N, D)


class Block(nn.Module):
    """Pre-LN transformer block: ``z + attn(LN z; inject)``, then ``z + MLP(LN z)`` (GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, z: Tensor, inject: Optional[Tensor] = None) -> Tensor:
        z = z + self.attn(self.norm1(z), inject)  # (B, N, D)
        return z + self.mlp(self.norm2(z))  # (B, N, D)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class _ImageTransformer(nn.Module):
    """Stem, head, class embedding, init and input checks shared by GET and ViT."""

    def __init__(self, img_size: int, channels: int, num_classes: Optional[int], patch: int, dim: int, heads: int):
        super().__init__()
        for name, value in (("img_size", img_size), ("channels", channels), ("patch", patch), ("dim", dim), ("heads", heads)):
            _check_int(name, value, 1)
        if img_size % patch:
            raise ValueError(f"img_size={img_size} is not divisible by patch={patch}")
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        num_classes = num_classes or 0
        _check_int("num_classes", num_classes, 0)
        self.img_size, self.channels, self.patch, self.dim = img_size, channels, patch, dim
        self.num_classes = num_classes
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_pos_embed(dim, img_size // patch).unsqueeze(0), persistent=False)
        self.class_embed = nn.Embedding(num_classes, 3 * dim) if num_classes else None
        self.head_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, patch * patch * channels)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def _init_weights(self) -> None:
        """DiT-style: xavier-uniform linears and patch conv, zero biases, zero head."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.dim, -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(self, noise: Tensor) -> Tensor:
        x = self.patch_embed(noise)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, D)

    def decode(self, z: Tensor) -> Tensor:
        """Tokens (B, N, D) -> images (B, C, H, W)."""
        b, p, g = z.shape[0], self.patch, self.img_size // self.patch
        x = self.head(self.head_norm(z))  # (B, N, p*p*C)
        x = x.reshape(b, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return x.reshape(b, self.channels, g * p, g * p)  # (B, C, H, W)

    def _condition(self, noise: Tensor, labels: Optional[Tensor]) -> Optional[Tensor]:
        """Check the inputs; return the class embedding (B, 1, 3D) or None."""
        want = (self.channels, self.img_size, self.img_size)
        if not isinstance(noise, Tensor):
            raise TypeError(f"noise must be a Tensor of shape (B, C, H, W) = (B, {', '.join(map(str, want))}), got {type(noise).__name__}")
        if noise.dim() != 4 or tuple(noise.shape[1:]) != want or noise.shape[0] == 0:
            raise ValueError(f"noise must have shape (B, C, H, W) = (B, {', '.join(map(str, want))}) with B >= 1, got {tuple(noise.shape)}")
        weight = self.patch_embed.weight
        if not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point tensor (B, C, H, W), got dtype {noise.dtype}")
        if noise.dtype != weight.dtype and not torch.is_autocast_enabled(noise.device.type):
            raise TypeError(f"noise has dtype {noise.dtype} but the model's weights are {weight.dtype}; cast one of them")
        if not self.conditional:
            if labels is not None:
                raise ValueError("labels were given to an unconditional model (built with num_classes=0)")
            return None
        if labels is None:
            raise ValueError(f"this model is class-conditional (num_classes={self.num_classes}): pass labels")
        if not isinstance(labels, Tensor) or labels.shape[0] != noise.shape[0]:
            raise ValueError(f"labels must be a Tensor with batch size {noise.shape[0]}, got {getattr(labels, 'shape', type(labels).__name__)}")
        if labels.is_floating_point():  # one-hot (or soft) labels, as the conditional pair sets store them
            if labels.shape != (noise.shape[0], self.num_classes):
                raise ValueError(f"one-hot labels must have shape (B, {self.num_classes}), got {tuple(labels.shape)}")
            c = labels.to(self.class_embed.weight.dtype) @ self.class_embed.weight  # (B, 3D)
        else:
            if labels.dim() != 1:
                raise ValueError(f"integer labels must have shape (B,), got {tuple(labels.shape)}")
            if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got values from {int(labels.min())} to {int(labels.max())}")
            c = self.class_embed(labels)  # (B, 3D)
        return c.unsqueeze(1)  # (B, 1, 3D)


# --------------------------------------------------------------------------------------------
# GET
# --------------------------------------------------------------------------------------------

#: GET's recipe as one record: ``max_steps`` plain calls of f (``tol=None``: all of them run and
#: the last image is returned), no divergence stop, and failures in the record, not raised.
GET_OPTIONS = deqkit.SolveOptions(tol=None, stop_mode="abs", max_steps=6, divergence=None, throw=False)


class GET(_ImageTransformer):
    """Generative Equilibrium Transformer: injection transformer, then an equilibrium transformer.

    ``noise`` -> patch tokens -> ``depth_injection`` blocks (MLP ratio ``mlp_ratio``) -> one
    bias-free ``Linear(D, 3*D*L_e)`` split into per-block injections ``u_1..u_{L_e}`` (fixed
    during the solve) -> the fixed point of ``f(z) = block_{L_e}(... block_1(z; u_1) ...; u_{L_e})``
    from ``z0 ~ N(0, I)`` (a fresh draw each call) -> head. The class embedding (when
    ``num_classes > 0``) is added to the q/k/v pre-activations of every block.

    The equilibrium is solved with ``deqkit.fixed_point``: by default GET's recipe, 6 plain
    fixed-point iterations back-propagated through (``FixedPoint()`` + ``Unrolled()``), a fixed
    number of them (``tol=None``: all ``max_steps`` run and the last image is returned);
    ``Unrolled(checkpoint=True)`` recomputes each
    iteration in the backward pass (gradient checkpointing). ``forward`` overrides
    ``solver``/``max_steps`` per call (for NFE sweeps, FixedPoint vs Anderson).

    Which iterates ``ModelOutput.iterates`` holds (``trajectory``: how many, default
    ``max_steps`` in training mode, 1 in eval mode):

    the last ``trajectory`` iterates ``f(z_k)`` of the solve, decoded, in every mode; under
    autograd each carries the backward mode's gradient at its own iterate (``Unrolled``: through
    the iterations; ``Phantom`` / ``OneStep`` / ``Implicit``: that mode's gradient at z_k).

    Args:
        img_size, channels, num_classes: the image shape and the number of classes (0 or
            None: unconditional).
        patch, dim, heads: patch size, token width, attention heads.
        depth_injection, depth_equilibrium: L_i and L_e.
        mlp_ratio, eq_mlp_ratio: MLP widths of the injection and the equilibrium blocks.
        solver, backward: deqkit objects (defaults: ``FixedPoint()``, ``Unrolled()``).
        options: the solve's ``deqkit.SolveOptions`` (default ``GET_OPTIONS``: GET's recipe,
            ``max_steps=6`` calls of f, ``tol=None`` so all of them run, no divergence stop,
            failures returned, not raised); keyword arguments named after its fields
            (``max_steps=``, ``tol=``, ``stop_mode=``, ...) replace them.
        output_norm: end f with a LayerNorm, ``f(z) = LN(block_{L_e}(...))`` (default False:
            GET's map). GET's pre-LN blocks give ``f(z) = z + r(z)`` with ``r`` blind to the
            scale of ``z``, so a fixed point needs ``r(z*) = 0``; when it is not met the
            iterate drifts along ``r`` and the relative residual falls only as 1/k. With the
            LayerNorm, f maps everything into a bounded set, so it has a fixed point
            (Brouwer), which a Jacobian penalty (``jacobian_penalty``) makes attracting.
    """

    def __init__(
        self,
        img_size: int = 32,
        channels: int = 3,
        num_classes: Optional[int] = 10,
        *,
        patch: int = 2,
        dim: int = 256,
        heads: int = 4,
        depth_injection: int = 6,
        depth_equilibrium: int = 3,
        mlp_ratio: float = 4.0,
        eq_mlp_ratio: float = 6.0,
        solver: Any = deqkit.FixedPoint(),
        backward: deqkit.AbstractBackward = deqkit.Unrolled(),
        options: deqkit.SolveOptions = GET_OPTIONS,
        output_norm: bool = False,
        **overrides: Any,
    ):
        super().__init__(img_size, channels, num_classes, patch, dim, heads)
        _check_int("depth_injection", depth_injection, 0)
        _check_int("depth_equilibrium", depth_equilibrium, 1)
        if isinstance(solver, type) or not (hasattr(solver, "init") and hasattr(solver, "step")):
            raise TypeError(f"solver must be a deqkit solver object (e.g. deqkit.FixedPoint()), got {solver!r}")
        if not isinstance(backward, deqkit.AbstractBackward):
            raise TypeError(f"backward must be a deqkit backward object (e.g. deqkit.Unrolled()), got {backward!r}")
        if not isinstance(options, deqkit.SolveOptions):
            raise TypeError(f"options must be a deqkit.SolveOptions, got {type(options).__name__}")
        self.depth_equilibrium = depth_equilibrium
        self.solver, self.backward = solver, backward
        self.options = options.replace(**overrides)
        self.injection_blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth_injection))
        self.injection = nn.Linear(dim, 3 * dim * depth_equilibrium, bias=False)
        self.equilibrium_blocks = nn.ModuleList(Block(dim, heads, eq_mlp_ratio) for _ in range(depth_equilibrium))
        if not isinstance(output_norm, bool):
            raise TypeError(f"output_norm must be True or False, got {output_norm!r}")
        self.output_norm = nn.LayerNorm(dim, eps=1e-6) if output_norm else None
        self._init_weights()

    @property
    def max_steps(self) -> int:
        """Calls of f per solve (``options.max_steps``)."""
        return self.options.max_steps

    def equilibrium_map(self, z: Tensor, u: Tensor) -> Tensor:
        """f(z; u): the L_e equilibrium blocks in sequence, block i taking u's i-th slice."""
        for block, u_i in zip(self.equilibrium_blocks, u.chunk(self.depth_equilibrium, dim=-1)):
            z = block(z, u_i)  # (B, N, D)
        if self.output_norm is not None:
            z = self.output_norm(z)  # (B, N, D)
        return z

    def jacobian_penalty(self, out: ModelOutput, n_samples: int = 1) -> Tensor:
        """Hutchinson estimate of ``||J_f(z)||_F^2 / dim`` at the solve's value (batch mean),
        differentiable in the weights (``deqkit.jacobian_reg``; Bai et al., 2021): add
        ``weight * penalty`` to the loss to make the fixed point attracting."""
        if out.tokens is None or out.injection is None:
            raise ValueError("jacobian_penalty needs a GET output (its tokens and injection)")
        u = out.injection
        return deqkit.jacobian_reg(lambda z: self.equilibrium_map(z, u), out.tokens.detach(), n_samples).mean

    def inject(self, noise: Tensor, c: Optional[Tensor]) -> Tensor:
        """The injection ``u`` (B, N, 3D*L_e) of checked ``noise``; ``c``: the class embedding
        (B, 1, 3D) from ``_condition``, or None."""
        x = self.embed(noise)  # (B, N, D)
        for block in self.injection_blocks:
            x = block(x, c)  # (B, N, D)
        u = self.injection(x)  # (B, N, 3D*L_e)
        if c is not None:
            u = u + c.repeat(1, 1, self.depth_equilibrium)  # (B, N, 3D*L_e)
        return u

    def forward(
        self,
        noise: Tensor,
        labels: Optional[Tensor] = None,
        *,
        solver: Any = None,
        max_steps: Optional[int] = None,
        trajectory: Optional[int] = None,
        z0: Optional[Tensor] = None,
    ) -> ModelOutput:
        """Images from ``noise`` (B, C, H, W); ``labels``: (B,) class indices or (B, K) one-hot.

        ``solver`` / ``max_steps`` override the model's for this call; ``trajectory``: iterates to
        decode (see the class docstring); ``z0``: the start (B, N, D) instead of a fresh draw.
        """
        c = self._condition(noise, labels)  # (B, 1, 3D) or None
        solver = self.solver if solver is None else solver
        max_steps = self.max_steps if max_steps is None else max_steps
        _check_int("max_steps", max_steps, 1)
        if trajectory is None:
            trajectory = max_steps if self.training else 1
        _check_int("trajectory", trajectory, 1)

        u = self.inject(noise, c)  # (B, N, 3D*L_e)
        shape = (*u.shape[:2], self.dim)
        if z0 is None:
            z0 = torch.randn(shape, dtype=u.dtype, device=u.device)  # (B, N, D)
        elif z0.shape != shape:
            raise ValueError(f"z0 must have shape (B, N, D) = {shape}, got {tuple(z0.shape)}")

        sol = deqkit.fixed_point(self.equilibrium_map, z0, inputs=(u,), solver=solver, backward=self.backward,
                                 options=self.options, max_steps=max_steps, trajectory=trajectory)
        images = self.decode(sol.value)  # (B, C, H, W)
        iterates = tuple(images if t is sol.value else self.decode(t) for t in sol.trajectory)
        return ModelOutput(images=images, iterates=iterates or (images,), stats=sol.stats, tokens=sol.value,
                           injection=u)


# --------------------------------------------------------------------------------------------
# ViT baseline
# --------------------------------------------------------------------------------------------

class ViT(_ImageTransformer):
    """The ViT baseline: GET's stem, head and q/k/v class conditioning around ``depth`` blocks.

    ``forward`` has GET's signature so that training and evaluation treat both alike;
    ``solver``, ``max_steps``, ``trajectory`` and ``z0`` have no effect. Returns
    ``ModelOutput(images, iterates=(images,), stats=None)``.
    """

    def __init__(
        self,
        img_size: int = 32,
        channels: int = 3,
        num_classes: Optional[int] = 10,
        *,
        patch: int = 2,
        dim: int = 384,
        heads: int = 6,
        depth: int = 12,
        mlp_ratio: float = 4.0,
    ):
        super().__init__(img_size, channels, num_classes, patch, dim, heads)
        _check_int("depth", depth, 1)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self._init_weights()

    def forward(self, noise: Tensor, labels: Optional[Tensor] = None, *, solver: Any = None,
                max_steps: Optional[int] = None, trajectory: Optional[int] = None, z0: Optional[Tensor] = None) -> ModelOutput:
        c = self._condition(noise, labels)  # (B, 1, 3D) or None
        x = self.embed(noise)  # (B, N, D)
        for block in self.blocks:
            x = block(x, c)  # (B, N, D)
        images = self.decode(x)  # (B, C, H, W)
        return ModelOutput(images=images, iterates=(images,), stats=None)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

_FAMILIES = {"GET": GET, "ViT": ViT}

#: Size presets (name -> family and constructor arguments); the CLI's choices.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's (CIFAR-10, 32x32x3, patch 2 -> 256 tokens).
    "GET-T/2": dict(family="GET", dim=256, heads=4, depth_injection=6, eq_mlp_ratio=6),
    "GET-M/2": dict(family="GET", dim=384, heads=6, depth_injection=6, eq_mlp_ratio=6),
    "GET-S/2": dict(family="GET", dim=512, heads=8, depth_injection=6, eq_mlp_ratio=8),
    "GET-B/2": dict(family="GET", dim=768, heads=12, depth_injection=1, eq_mlp_ratio=12),
    "GET-B+/2": dict(family="GET", dim=768, heads=12, depth_injection=6, eq_mlp_ratio=8),
    "ViT-S/2": dict(family="ViT", dim=384, heads=6, depth=12),
    "ViT-B/2": dict(family="ViT", dim=768, heads=12, depth=12),
    "ViT-L/2": dict(family="ViT", dim=1024, heads=16, depth=24),
    # CPU scale (8x8 digits): about 0.29M and 0.30M parameters. Patch 2 gives 16 tokens,
    # patch 4 gives 4 tokens of 4x4 pixels at the same size and 2.5x less compute per step,
    # which is what the demo's 2-core budget trains best (see the tutorial's measurements).
    "GET-Tiny/2": dict(family="GET", dim=64, heads=4, depth_injection=2, eq_mlp_ratio=4),
    "ViT-Tiny/2": dict(family="ViT", dim=64, heads=4, depth=6),
    "GET-Tiny/4": dict(family="GET", dim=64, heads=4, depth_injection=2, eq_mlp_ratio=4, patch=4),
    "ViT-Tiny/4": dict(family="ViT", dim=64, heads=4, depth=6, patch=4),
    # Half and twice Tiny/4's width (head width 16 throughout), for the parameter-efficiency
    # study at the digits' scale (about 0.08M/0.08M and 1.1M/1.2M parameters); not the paper's
    # GET-S/2 and ViT-S/2.
    "GET-Nano/4": dict(family="GET", dim=32, heads=2, depth_injection=2, eq_mlp_ratio=4, patch=4),
    "ViT-Nano/4": dict(family="ViT", dim=32, heads=2, depth=6, patch=4),
    "GET-Small/4": dict(family="GET", dim=128, heads=8, depth_injection=2, eq_mlp_ratio=4, patch=4),
    "ViT-Small/4": dict(family="ViT", dim=128, heads=8, depth=6, patch=4),
}


def build(name: str, img_size: int = 32, channels: int = 3, num_classes: Optional[int] = 10, **overrides: Any) -> nn.Module:
    """The model of preset ``name`` for the given image shape; ``overrides`` replace preset
    arguments or add constructor ones (``solver=``, ``backward=``, ``max_steps=`` for GET).

    Build under ``with torch.device("meta"):`` to count the parameters of a large preset
    without allocating it.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[name])
    family = _FAMILIES[kwargs.pop("family")]
    kwargs.update(overrides)
    return family(img_size, channels, num_classes, **kwargs)


def count_params(model: nn.Module, *, include_pos_embed: bool = False) -> int:
    """Trainable parameters; ``include_pos_embed`` adds the fixed positional table, as the
    paper's counts do (the original stores it as a frozen parameter)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if include_pos_embed and isinstance(getattr(model, "pos_embed", None), Tensor):
        total += model.pos_embed.numel()
    return total


def macs(model: nn.Module, max_steps: Optional[int] = None) -> int:
    """Multiply-accumulates per image of one forward pass (linears, convs and attention
    products; norms and activations ignored). GET counts ``max_steps`` calls of f (default:
    the model's)."""
    if not isinstance(model, _ImageTransformer):
        raise TypeError(f"macs() takes a GET or ViT model, got {type(model).__name__}")
    n, d = (model.img_size // model.patch) ** 2, model.dim
    out = model.patch * model.patch * model.channels

    def block_macs(block: Block) -> int:
        hidden = block.mlp[0].out_features
        return n * d * 4 * d + 2 * n * n * d + 2 * n * d * hidden

    total = n * d * out * 2  # patch embedding and head
    if isinstance(model, GET):
        steps = model.max_steps if max_steps is None else max_steps
        total += sum(block_macs(b) for b in model.injection_blocks)
        total += n * d * model.injection.out_features
        total += steps * sum(block_macs(b) for b in model.equilibrium_blocks)
    else:
        total += sum(block_macs(b) for b in model.blocks)
    return total
