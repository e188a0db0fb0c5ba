"""Encoders: a timm/torchvision ResNet whose ``fc`` is replaced by the MoCo projection head.

Keeping the head in ``fc`` gives exactly the key layout of the official MoCo checkpoints (``encoder_q.conv1.weight``,
..., ``encoder_q.fc.weight`` for v1, ``encoder_q.fc.0.*`` / ``encoder_q.fc.2.*`` for v2), which is what makes our
checkpoints convertible by the same code as the official ones.

* v1 (arXiv:1911.05722): ``fc = Linear(d, 128)``.
* v2 (arXiv:2003.04297): ``fc = Sequential(Linear(d, d), ReLU, Linear(d, 128))`` with ``d`` the backbone feature
  dimension (2048 for ResNet-50, as in the paper's "2048-d hidden layer").
"""
from __future__ import annotations

from typing import Tuple

import timm
import torch.nn as nn
import torchvision

TORCHVISION_PREFIX = "tv:"


class UnknownArchError(ValueError):
    """The requested backbone name is not a timm or torchvision model with an ``fc`` classifier."""


def _create_backbone(arch: str) -> nn.Module:
    if arch.startswith(TORCHVISION_PREFIX) or arch.startswith("torchvision:"):
        name = arch.split(":", 1)[1]
        try:
            return torchvision.models.get_model(name, weights=None)
        except (ValueError, KeyError) as e:
            known = ", ".join(n for n in torchvision.models.list_models() if "resnet" in n or "resnext" in n)
            raise UnknownArchError(f"unknown torchvision architecture {name!r} (from --arch {arch!r}); "
                                   f"ResNet-style choices: {known}") from e

    try:
        # The paper's encoders start from torchvision's ResNet init (last BN gamma of each block = 1); timm's
        # default zero-inits it, which leaves short runs with residual branches that are still almost off.
        kwargs = {"zero_init_last": False} if timm.is_model(arch) and "res" in arch else {}
        return timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        close = [n for n in timm.list_models(f"*{arch.split('.')[0][:6]}*")][:8]
        raise UnknownArchError(
            f"unknown architecture {arch!r}: not a timm model name (try resnet18, resnet50, wide_resnet50_2"
            f"{', ' + ', '.join(close) if close else ''}) and not 'tv:<torchvision name>'") from e


def build_encoder(arch: str, dim: int = 128, mlp: bool = False) -> Tuple[nn.Module, int]:
    """ResNet ``arch`` with its classifier replaced by the MoCo head; returns (encoder, backbone feature dim)."""
    model = _create_backbone(arch)
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise UnknownArchError(f"architecture {arch!r} has no linear 'fc' classifier; the MoCo v1/v2 engine "
                               f"supports ResNet-style models (resnet*, wide_resnet*, resnext*)")
    feat_dim = fc.in_features
    if mlp:
        model.fc = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True), nn.Linear(feat_dim, dim))
    else:
        model.fc = nn.Linear(feat_dim, dim)
    return model, feat_dim


def backbone_features(encoder: nn.Module, x):
    """Pooled backbone features (before the projection head) of an encoder built by :func:`build_encoder`."""
    if hasattr(encoder, "forward_features") and hasattr(encoder, "forward_head"):  # timm
        return encoder.forward_head(encoder.forward_features(x), pre_logits=True)
    fc = encoder.fc  # torchvision: run everything but fc
    encoder.fc = nn.Identity()
    try:
        return encoder(x)
    finally:
        encoder.fc = fc
