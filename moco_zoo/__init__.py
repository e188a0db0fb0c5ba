"""moco-zoo: MoCo pretrained backbones for timm, torchvision and detectron2.

Importing this package registers the zoo's models with timm (``timm.create_model('moco_r50', pretrained=True)``).
"""
__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers moco_r50 / moco_vit_small / moco_vit_base with timm)
from .backbones import load_backbone, load_backbone_state_dict  # noqa: E402,F401
