"""MoCo v3: Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", arXiv:2104.02057.

One training step (the paper's Algorithm 1), for two crops x1, x2 of the same N images::

    f_k.params = m * f_k.params + (1 - m) * f_q.params     # momentum update, m from a per-step schedule
    q1, q2 = g(f_q(x1)), g(f_q(x2))                         # NxC: base encoder + projector, then predictor g
    k1, k2 = f_k(x1), f_k(x2)                               # NxC: momentum encoder + its projector, no gradient
    loss = ctr(q1, k2) + ctr(q2, k1)                        # symmetrised
    ctr(q, k) = 2T * CrossEntropy(normalize(q) @ gather(normalize(k)).T / T, rank * N + arange(N))

There is no queue: the negatives are the other keys of the global batch (gathered over ranks, no gradient). The
encoders are timm models whose classifier slot (``fc`` for ResNets, ``head`` for ViTs) holds the projector MLP, so the
state dict has the layout of the official checkpoints (``base_encoder.fc.0.weight``, ``momentum_encoder.head.*``,
``predictor.*``) and the converter reads ours as it reads theirs.

ViT adjustments of the paper (Sec. 4 and 5), applied to a timm ``VisionTransformer`` after creation: the moco-v3
initialisation (xavier-uniform, Q/K/V treated as three matrices), a fixed 2-D sin-cos position embedding and a frozen
random patch projection (the "stop-gradient on the patch embedding" stability fix).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from moco_zoo.device import is_distributed, rank, world_size

from .heads import UnknownArchError, backbone_features
from .shuffle_bn import _grad_group, concat_all_gather

# Short names of the paper's ViTs -> timm architecture (moco-v3's ViT-S has 12 heads: ``moco_vit_small``).
VIT_ARCHS = {"vit_small": "moco_vit_small", "vit_base": "vit_base_patch16_224", "vit_tiny": "vit_tiny_patch16_224"}


def is_vit_arch(arch: str) -> bool:
    return arch in VIT_ARCHS or arch.startswith(("vit_", "moco_vit_", "deit_"))


def timm_arch(arch: str) -> str:
    return VIT_ARCHS.get(arch, arch)


# ---------------------------------------------------------------------------------------------------- heads
def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """Linear (no bias) -> BN -> ReLU for the hidden layers, then Linear and, with ``last_bn``, an affine-free BN
    (SimCLR's design, as in the paper). Indices: 0 Linear, 1 BN, 2 ReLU, 3 Linear, ... (the official key layout)."""
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------- ViT
def sincos_pos_embed_2d(grid: Tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (1+H*W)xD with a zero row for the class token. The patch in row r,
    column c gets [sin(r w), cos(r w), sin(c w), cos(c w)], w_j = temperature^(-j / (D/4)), j < D/4 (the layout of
    the official checkpoints for square grids)."""
    h, w = grid
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs an embedding dim divisible by 4, got {dim}")
    omega = temperature ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # D/4
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    ang_r = rows.reshape(-1, 1) * omega  # (H*W)x(D/4)
    ang_c = cols.reshape(-1, 1) * omega
    pe = torch.cat([ang_r.sin(), ang_r.cos(), ang_c.sin(), ang_c.cos()], dim=1)  # (H*W)xD
    return torch.cat([torch.zeros(1, dim, dtype=pe.dtype), pe]).unsqueeze(0).float()  # 1x(1+H*W)xD


@torch.no_grad()
def init_vit_moco_v3(model: nn.Module) -> None:
    """The paper's ViT initialisation: xavier-uniform linear layers (Q, K, V as three separate matrices), zero biases,
    class token ~ N(0, 1e-6), xavier-uniform patch projection seen as a (3*p*p)xD matrix."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=1e-6)
    proj = model.patch_embed.proj
    bound = math.sqrt(6.0 / (proj.weight[0].numel() + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


def adapt_vit_moco_v3(model: nn.Module, stop_grad_patch: bool = True) -> nn.Module:
    """A timm VisionTransformer -> the paper's ViT: moco-v3 init, fixed sin-cos position embedding, optionally a
    frozen random patch projection."""
    if getattr(model, "pos_embed", None) is None or getattr(model, "no_embed_class", False) \
            or getattr(model, "num_prefix_tokens", 1) != 1:
        raise UnknownArchError(f"{type(model).__name__}: MoCo v3 needs a ViT with one class token and a learned "
                               f"absolute position embedding that includes it")
    init_vit_moco_v3(model)
    pe = sincos_pos_embed_2d(tuple(model.patch_embed.grid_size), model.pos_embed.shape[-1])
    with torch.no_grad():
        model.pos_embed.copy_(pe)
    model.pos_embed.requires_grad_(False)
    if stop_grad_patch:
        model.patch_embed.proj.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------- encoders
def build_v3_encoder(arch: str, dim: int = 256, mlp_dim: int = 4096, image_size: int = 224,
                     stop_grad_patch: bool = True, proj_layers: Optional[int] = None) -> Tuple[nn.Module, int]:
    """timm ``arch`` (ResNet or ViT) with the projector MLP in its classifier slot; returns (encoder, feature dim).

    ResNet: 2-layer projector in ``fc`` (timm's zero-init of the last BN gamma per block, like the paper's
    ``zero_init_residual``). ViT: 3-layer projector in ``head``, class-token features."""
    name = timm_arch(arch)
    vit = is_vit_arch(arch)
    if not timm.is_model(name):
        raise UnknownArchError(f"unknown architecture {arch!r} for MoCo v3: expected a timm ResNet (resnet18, "
                               f"resnet50, ...) or ViT ({', '.join(VIT_ARCHS)}, or a timm vit_* name)")
    kwargs = {"img_size": image_size} if vit else {}
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    feat_dim = model.num_features
    if vit:
        adapt_vit_moco_v3(model, stop_grad_patch)
        model.head = build_mlp(proj_layers or 3, feat_dim, mlp_dim, dim)
    else:
        if not isinstance(getattr(model, "fc", None), nn.Identity):
            raise UnknownArchError(f"architecture {arch!r} has no 'fc' classifier slot; MoCo v3 supports timm "
                                   f"ResNet-style models and ViTs")
        model.fc = build_mlp(proj_layers or 2, feat_dim, mlp_dim, dim)
    return model, feat_dim


# ---------------------------------------------------------------------------------------------------- sync BN
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradients over ranks too (every rank's loss depends on the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x, group=_grad_group())
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=_grad_group())
        return grad


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, for devices without ``nn.SyncBatchNorm`` (CPU / gloo). Same
    parameters and buffers as BatchNorm (the state dict layout does not change); identical to BatchNorm in one
    process and in eval mode."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed() and world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        n_local = x.numel() // x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), xf.new_tensor([float(n_local)])])
        stats = _AllReduceSum.apply(stats)  # one collective: sum, sum of squares, count
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)  # biased, as BatchNorm normalises
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: cumulative average, as BatchNorm
                mom = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), mom)
                unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), mom)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm in ``module`` (in place where possible); parameters and buffers are kept."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
            new.load_state_dict(module.state_dict())
            if module.affine:
                new.weight.requires_grad_(module.weight.requires_grad)
                new.bias.requires_grad_(module.bias.requires_grad)
            return new.to(next(iter(module.state_dict().values())).device) if module.state_dict() else new
        for name, child in module.named_children():
            new_child = cls.convert(child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """SyncBN for DDP (the paper syncs BN across devices): ``nn.SyncBatchNorm`` on GPUs, :class:`AllReduceBatchNorm`
    where SyncBatchNorm does not run (CPU)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return AllReduceBatchNorm.convert(module)


# ---------------------------------------------------------------------------------------------------- MoCo v3
class MoCoV3(nn.Module):
    """Base encoder (+ projector), momentum encoder (+ projector) and predictor; ``forward(x1, x2, m)`` -> loss.

    Args:
        base_encoder: the encoder whose output is the projector's output (NxC), e.g. from :func:`build_v3_encoder`.
        predictor: the predictor MLP (CxC), on the base branch only.
        T: softmax temperature (1.0 ResNet, 0.2 ViT in the paper).
    """

    def __init__(self, base_encoder: nn.Module, predictor: nn.Module, T: float = 1.0) -> None:
        super().__init__()
        self.T = float(T)
        self.m = 0.99  # last momentum used (for logging); forward takes it per step
        self.base_encoder = base_encoder
        self.momentum_encoder = copy.deepcopy(base_encoder)  # initialised as a copy of the base encoder
        for p in self.momentum_encoder.parameters():
            p.requires_grad_(False)  # updated by the moving average only
        self.predictor = predictor

    @classmethod
    def from_arch(cls, arch: str, dim: int = 256, mlp_dim: int = 4096, T: float = 1.0, image_size: int = 224,
                  stop_grad_patch: bool = True) -> "MoCoV3":
        """The paper's model for a timm ``arch``: ResNet (2-layer projector, predictor without output BN) or ViT
        (3-layer projector, predictor with output BN, as facebookresearch/moco-v3)."""
        encoder, _ = build_v3_encoder(arch, dim, mlp_dim, image_size, stop_grad_patch)
        vit = is_vit_arch(arch)
        return cls(encoder, build_mlp(2, dim, mlp_dim, dim, last_bn=vit), T)

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q over parameters (one fused lerp); BN buffers are not copied (each
        encoder keeps the running statistics of its own forward passes)."""
        pk = list(self.momentum_encoder.parameters())
        pq = [p.detach() for p in self.base_encoder.parameters()]
        torch._foreach_lerp_(pk, pq, 1.0 - float(m))

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q: NxC (with gradient), k: NxC (no gradient) -> 2T * InfoNCE against the keys of the global batch."""
        dtype = torch.promote_types(q.dtype, torch.float32)  # the logits in fp32 (fp64 stays fp64) under autocast
        q = F.normalize(q.to(dtype), dim=1)
        k = concat_all_gather(F.normalize(k.to(dtype), dim=1))  # (W*N)xC
        logits = q @ k.T / self.T  # Nx(W*N)
        labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]  # positive of row i
        return F.cross_entropy(logits, labels) * (2.0 * self.T)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        """x1, x2: two crops NxCxHxW; m: momentum of this step -> scalar loss ctr(q1, k2) + ctr(q2, k1)."""
        self.m = float(m)
        q1 = self.predictor(self.base_encoder(x1))  # NxC
        q2 = self.predictor(self.base_encoder(x2))  # NxC
        with torch.no_grad():
            self.momentum_update(m)
            k1 = self.momentum_encoder(x1)  # NxC
            k2 = self.momentum_encoder(x2)  # NxC
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of the base encoder (ResNet: pooled, ViT: class token). x: NxCxHxW -> NxD."""
        return backbone_features(self.base_encoder, x)


def moco_momentum(step: int, total_steps: int, base_m: float = 0.99) -> float:
    """m increased from ``base_m`` to 1 by a half-cycle cosine over training (as in BYOL / MoCo v3)."""
    return 1.0 - (1.0 - base_m) * (math.cos(math.pi * step / max(1, total_steps)) + 1.0) / 2.0
