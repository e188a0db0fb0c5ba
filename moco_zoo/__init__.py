"""moco-zoo: MoCo pretrained backbones for timm, torchvision and detectron2.

Importing this package registers the zoo's models with timm (``timm.create_model('moco_r50', pretrained=True)``).
"""
__version__ = "0.1.0"
