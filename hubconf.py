"""torch.hub entry points: ``torch.hub.load("ORG/moco-zoo", "moco_r50", pretrained=True)``.

Each zoo model is the timm model registered by :mod:`moco_zoo.models` (the same weights, data config and checks as
``timm.create_model("moco_r50", pretrained=True)``); ``backbone`` takes any spec :func:`moco_zoo.load_backbone` takes
(zoo name with tag, ``hf-hub:ORG/REPO``, a checkpoint path, ``random``, ``torchvision-supervised``).
"""
import timm

import moco_zoo

dependencies = ["torch", "torchvision", "timm", "huggingface_hub", "safetensors"]


def _zoo_model(name):
    def entry(pretrained: bool = True, **kwargs):
        return timm.create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__doc__ = f"MoCo ``{name}`` from the moco-zoo (timm model; ``pretrained`` loads the default tag's weights)."
    return entry


moco_r50 = _zoo_model("moco_r50")
moco_vit_small = _zoo_model("moco_vit_small")
moco_vit_base = _zoo_model("moco_vit_base")


def backbone(spec: str, arch: str = None, **kwargs):
    """A timm model holding the backbone weights of ``spec`` (pooled features unless ``num_classes`` is given)."""
    return moco_zoo.load_backbone(spec, arch, **kwargs)
