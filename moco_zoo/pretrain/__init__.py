"""MoCo v1/v2 pretraining engine (arXiv:1911.05722, arXiv:2003.04297): the MoCo module and its three contrastive
mechanisms, shuffle BN, augmentations, the training loop with exact resumption, the kNN monitor and the linear
classification protocol. ``pretrain/main_moco.py`` and ``pretrain/main_lincls.py`` are the command-line front ends.
"""
from .builder import MoCo, MocoOutput, infonce_logits
from .config import MocoConfig, make_config

__all__ = ["MoCo", "MocoOutput", "infonce_logits", "MocoConfig", "make_config"]
