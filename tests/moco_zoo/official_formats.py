"""Builders of checkpoints in exactly the layouts the MoCo authors (and this project) publish, from real timm models.

Used by the conversion / zoo / backbone tests. Each builder returns ``(checkpoint_dict, encoder)`` where ``encoder``
is a headless timm model holding the query/base encoder's weights, i.e. the expected result of the conversion.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Tuple

import timm
import torch
import torch.nn as nn


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine params, so a wrong BN mapping cannot go unnoticed."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(1234)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def _headless(arch: str, seed: int, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    _randomize_bn(model, torch.Generator().manual_seed(seed + 1))
    return model.eval()


def _optimizer_state(n: int) -> Dict[str, Any]:
    return {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "params": list(range(n))}]}


def _prefixed(sd: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def _mlp_bn(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """MoCo v3 MLP layout: Linear(no bias), BN, ReLU, Linear(no bias), BN(affine=False)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False),
    )


def official_v1v2(version: str = "v2", arch: str = "resnet50", seed: int = 0, dim: int = 128, queue: int = 16,
                  hidden: int = 64, **model_kwargs: Any) -> Tuple[Dict[str, Any], nn.Module]:
    """facebookresearch/moco ``moco_v{1,2}_*_pretrain.pth.tar``: ``module.encoder_q.*`` + ``module.queue``.

    The v2 MLP head is ``fc.0`` (Linear), ReLU, ``fc.2`` (Linear) as published; its hidden width (2048 in the release)
    is ``hidden`` here to keep the files small. The key encoder shares the query encoder's tensors (it starts as a
    copy in MoCo), so ``torch.save`` writes them once.
    """
    encoder = _headless(arch, seed, **model_kwargs)
    feat = encoder.num_features
    q = copy.deepcopy(encoder)
    if version == "v1":
        q.fc = nn.Linear(feat, dim)
    else:
        q.fc = nn.Sequential(nn.Linear(feat, hidden), nn.ReLU(), nn.Linear(hidden, dim))
    sd_q = q.state_dict()
    state = {}
    state.update(_prefixed(sd_q, "module.encoder_q."))
    state.update({k.replace("module.encoder_q.", "module.encoder_k."): v for k, v in list(state.items())})
    state["module.queue"] = nn.functional.normalize(torch.randn(dim, queue), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    ckpt = {"epoch": 200, "arch": arch, "state_dict": state, "optimizer": _optimizer_state(len(list(q.parameters())))}
    return ckpt, encoder


def official_v3(arch: str = "resnet50", seed: int = 0, hidden: int = 64, dim: int = 32, **model_kwargs: Any
                ) -> Tuple[Dict[str, Any], nn.Module]:
    """facebookresearch/moco-v3 ``r-50-*.pth.tar`` / ``vit-*-300ep.pth.tar``.

    ``module.base_encoder.*`` (``fc`` = projector for ResNet, ``head`` = projector for ViT),
    ``module.momentum_encoder.*``, ``module.predictor.*``. ``hidden``/``dim`` are small stand-ins for 4096/256 so the
    files stay small; the key layout is the published one.
    """
    encoder = _headless(arch, seed, **model_kwargs)
    feat = encoder.num_features
    base = copy.deepcopy(encoder)
    is_vit = hasattr(base, "blocks")
    if is_vit:
        # ViT projector: 3-layer MLP (Linear-BN-ReLU x2, Linear-BN(affine=False))
        base.head = nn.Sequential(
            nn.Linear(feat, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, dim, bias=False), nn.BatchNorm1d(dim, affine=False),
        )
    else:
        base.fc = _mlp_bn(feat, hidden, dim)
    predictor = _mlp_bn(dim, hidden, dim)
    state = {}
    state.update(_prefixed(base.state_dict(), "module.base_encoder."))
    # the momentum encoder starts as a copy of the base encoder; sharing tensors keeps the file small
    state.update({k.replace("module.base_encoder.", "module.momentum_encoder."): v for k, v in list(state.items())})
    state.update(_prefixed(predictor.state_dict(), "module.predictor."))
    official_arch = {"resnet50": "resnet50", "moco_vit_small": "vit_small", "vit_base_patch16_224": "vit_base"}
    ckpt = {"epoch": 300, "arch": official_arch.get(arch, arch), "state_dict": state,
            "optimizer": _optimizer_state(3), "scaler": {"scale": 65536.0, "growth_factor": 2.0}}
    return ckpt, encoder


def official_lincls(arch: str = "resnet50", seed: int = 0, num_classes: int = 1000, **model_kwargs: Any
                    ) -> Tuple[Dict[str, Any], nn.Module]:
    """moco / moco-v3 ``main_lincls`` checkpoint (``linear-*.pth.tar``): DDP ``module.`` model with a trained fc/head."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_kwargs)
    _randomize_bn(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    official_arch = {"moco_vit_small": "vit_small", "vit_base_patch16_224": "vit_base"}.get(arch, arch)
    ckpt = {"epoch": 90, "arch": official_arch, "state_dict": _prefixed(model.state_dict(), "module."),
            "best_acc1": torch.tensor(72.8), "optimizer": _optimizer_state(2)}
    return ckpt, model


def our_pretrain(arch: str = "resnet18", seed: int = 0, version: str = "v2", mechanism: str = "moco", dim: int = 16,
                 queue: int = 32) -> Tuple[Dict[str, Any], nn.Module]:
    """This project's ``kind: moco-pretrain`` checkpoint (contract 2: no ``module.`` prefix)."""
    ckpt, encoder = official_v1v2(version, arch, seed, dim, queue)
    state = {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}
    if mechanism == "end2end":
        state = {k: v for k, v in state.items() if not k.startswith(("encoder_k.", "queue"))}
    ours = {
        "kind": "moco-pretrain", "format_version": 1, "arch": arch, "moco_version": version, "mechanism": mechanism,
        "config": {"arch": arch, "moco_dim": dim, "moco_k": queue}, "state_dict": state,
        "optimizer": ckpt["optimizer"], "scheduler": {}, "epoch": 3, "step_in_epoch": 0, "global_step": 30,
        "rng": {"torch": torch.get_rng_state()}, "metrics": {"knn_top1": 42.0},
    }
    return ours, encoder


def our_linear_probe(arch: str = "resnet18", seed: int = 0, num_classes: int = 8) -> Tuple[Dict[str, Any], nn.Module]:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    _randomize_bn(model, torch.Generator().manual_seed(seed + 1))
    model.eval()
    ckpt = {"kind": "linear-probe", "format_version": 1, "arch": arch, "num_classes": num_classes,
            "class_names": [f"class{i}" for i in range(num_classes)], "state_dict": model.state_dict(),
            "source": "some/pretrain.pth", "metrics": {"top1": 50.0}, "optimizer": {}, "epoch": 10}
    return ckpt, model


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pooled pre-logits features of a timm model (with or without a head)."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)
