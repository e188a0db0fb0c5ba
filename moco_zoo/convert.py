"""Checkpoint conversion: any MoCo checkpoint -> the canonical backbone state dict -> timm / torchvision / detectron2.

The pivot format is the *canonical backbone state dict*: the encoder's weights under timm key names (identical to
torchvision's for ResNets, timm ``VisionTransformer`` names for ViTs) with no classifier / projection head. A
checkpoint that carries a trained linear classifier (our linear-probe checkpoints, the MoCo ``main_lincls`` files)
keeps that classifier separately in :attr:`ConvertedCheckpoint.head`.

Recognised inputs (detected from the keys, never from the file name):

====================  ===========================================================================================
format                layout
====================  ===========================================================================================
``moco-pretrain``     this project's pretraining checkpoint (``kind``, ``state_dict`` with ``encoder_q.*``; MoCo v3:
                      ``base_encoder.*`` as the official v3 files)
``linear-probe``      this project's linear-probe checkpoint (``kind``, full classifier ``state_dict``)
``official-v1v2``     facebookresearch/moco: ``state_dict`` with ``module.encoder_q.*``, ``module.queue``
``official-v3``       facebookresearch/moco-v3: ``module.base_encoder.*``, ``module.momentum_encoder.*``,
                      ``module.predictor.*`` (ResNet-50 with ``fc`` = projector, or ViT with ``head`` = projector)
``classifier``        a plain model state dict with a classifier (e.g. the official ``linear-*.pth.tar`` files,
                      ``module.`` prefixes are removed)
``backbone``          a plain timm / torchvision state dict without classifier, or a ``.safetensors`` file
====================  ===========================================================================================

Files are read with ``torch.load(weights_only=True)``; anything that needs full unpickling is refused unless the
caller passes ``allow_pickle=True``. Every error is a :class:`~moco_zoo.checkpoint.CheckpointError` naming the file.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as st_save
from timm.layers import resample_abs_pos_embed

from .checkpoint import (
    KIND_BACKBONE,
    KIND_LINEAR_PROBE,
    KIND_PRETRAIN,
    KIND_TRANSFER,
    CheckpointError,
    PathLike,
    atomic_torch_save,
    atomic_write_bytes,
    safe_torch_load,
)

__all__ = [
    "FORMAT_PRETRAIN",
    "FORMAT_LINEAR_PROBE",
    "FORMAT_OFFICIAL_V1V2",
    "FORMAT_OFFICIAL_V3",
    "FORMAT_CLASSIFIER",
    "FORMAT_BACKBONE",
    "ConvertedCheckpoint",
    "load_checkpoint_file",
    "detect_format",
    "to_canonical",
    "infer_arch",
    "check_arch",
    "detectron2_key",
    "to_detectron2_state_dict",
    "save_timm",
    "save_torchvision",
    "save_detectron2",
    "dumps_detectron2",
    "convert_file",
    "adapt_pos_embed",
    "OUTPUT_FORMATS",
]

FORMAT_PRETRAIN = "moco-pretrain"
FORMAT_LINEAR_PROBE = "linear-probe"
FORMAT_OFFICIAL_V1V2 = "official-v1v2"
FORMAT_OFFICIAL_V3 = "official-v3"
FORMAT_CLASSIFIER = "classifier"
FORMAT_BACKBONE = "backbone"

OUTPUT_FORMATS = ("timm", "torchvision", "detectron2")

# Names the official MoCo scripts record in the "arch" field -> timm architecture of the backbone.
# MoCo v3's ViT-S uses 12 attention heads (timm's vit_small_patch16_224 has 6); the parameter shapes do not depend on
# the head count, so the arch name must carry it: ``moco_vit_small`` is registered by ``moco_zoo.models``.
OFFICIAL_ARCH_TO_TIMM = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnet152": "resnet152",
    "vit_small": "moco_vit_small",
    "vit_base": "vit_base_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",  # this project's CPU-size MoCo v3 ViT (no official weights)
    "vit_conv_small": "moco_vit_small",  # conv-stem variants are not supported by the zoo; keep the family
    "vit_conv_base": "vit_base_patch16_224",
}

# timm names whose default head count differs from MoCo v3's model of the same size.
_MOCO_V3_ARCH_FIX = {"vit_small_patch16_224": "moco_vit_small"}

_RESNET_DEPTHS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class ConvertedCheckpoint:
    """A checkpoint reduced to its backbone (plus the trained classifier, if it has one)."""

    state_dict: Dict[str, torch.Tensor]
    arch: Optional[str]
    source_format: str
    path: Optional[str] = None
    head: Optional[Dict[str, torch.Tensor]] = None  # {"weight": ..., "bias": ...} of a trained linear classifier
    class_names: Optional[List[str]] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return "vit" if _is_vit(self.state_dict) else "resnet"

    @property
    def head_name(self) -> str:
        """Name of the classifier module in timm (``fc`` for ResNets, ``head`` for ViTs)."""
        return "head" if self.family == "vit" else "fc"

    @property
    def num_classes(self) -> int:
        return int(self.head["weight"].shape[0]) if self.head else 0

    @property
    def is_classifier(self) -> bool:
        return self.head is not None

    def full_state_dict(self, with_head: bool = True) -> Dict[str, torch.Tensor]:
        """Backbone (+ classifier as ``fc.*`` / ``head.*`` when present and ``with_head``)."""
        out = dict(self.state_dict)
        if with_head and self.head:
            for k, v in self.head.items():
                out[f"{self.head_name}.{k}"] = v
        return out


# ---------------------------------------------------------------------------------------------------------- loading


def _name(path: Optional[PathLike]) -> str:
    return str(path) if path is not None else "<in-memory checkpoint>"


def _is_safetensors_file(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n < 100_000_000 and head[8:9] == b"{"


def load_checkpoint_file(path: PathLike, *, allow_pickle: bool = False) -> Tuple[Any, Dict[str, str]]:
    """Read a checkpoint file safely. Returns ``(object, metadata)``; metadata is only non-empty for safetensors."""
    path = Path(path)
    if path.is_dir():
        for candidate in ("model.safetensors", "pytorch_model.bin"):
            if (path / candidate).is_file():
                return load_checkpoint_file(path / candidate, allow_pickle=allow_pickle)
        raise CheckpointError(f"{path}: directory has no model.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if _is_safetensors_file(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path), device="cpu"), meta
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    obj = safe_torch_load(path, allow_pickle=allow_pickle)
    return obj, {}


# -------------------------------------------------------------------------------------------------------- detection


def _strip_wrappers(sd: Mapping[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k = k[len(p):]
                    changed = True
        out[k] = v
    return out


def _inner_state_dict(obj: Any) -> Optional[Dict[str, Any]]:
    """The model state dict inside a checkpoint object (``state_dict`` / ``model`` / the dict itself)."""
    if not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    if obj and all(isinstance(k, str) for k in obj) and any(isinstance(v, torch.Tensor) for v in obj.values()):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) >= max(1, len(obj) // 2):
            return tensors
    return None


def _is_vit(sd: Mapping[str, Any]) -> bool:
    return "cls_token" in sd or "patch_embed.proj.weight" in sd or any(k.startswith("blocks.0.") for k in sd)


def _is_resnet(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("layer1.") for k in sd) and ("conv1.weight" in sd or "conv1.0.weight" in sd)


def _looks_like_model(sd: Mapping[str, Any]) -> bool:
    return _is_vit(sd) or _is_resnet(sd)


def detect_format(obj: Any) -> str:
    """Name of the checkpoint layout of a loaded object (one of the ``FORMAT_*`` constants), or ``""``."""
    if isinstance(obj, Mapping):
        kind = obj.get("kind")
        if kind == KIND_PRETRAIN:
            return FORMAT_PRETRAIN
        if kind == KIND_LINEAR_PROBE:
            return FORMAT_LINEAR_PROBE
        if kind == KIND_BACKBONE:
            return FORMAT_BACKBONE
        if kind == KIND_TRANSFER:
            return ""
    sd = _inner_state_dict(obj)
    if not sd:
        return ""
    sd = _strip_wrappers(sd)
    if any(k.startswith("encoder_q.") for k in sd):
        return FORMAT_OFFICIAL_V1V2 if not (isinstance(obj, Mapping) and obj.get("kind")) else FORMAT_PRETRAIN
    if any(k.startswith("base_encoder.") for k in sd):
        return FORMAT_OFFICIAL_V3
    if _looks_like_model(sd):
        head = "head" if _is_vit(sd) else "fc"
        if f"{head}.weight" in sd:
            return FORMAT_CLASSIFIER
        return FORMAT_BACKBONE
    return ""


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        sd = _inner_state_dict(obj)
        text = f"top-level keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
        if sd is not None and sd is not obj:
            sk = list(sd.keys())
            text += f"; state_dict keys {sk[:6]}{' ...' if len(sk) > 6 else ''}"
        return text
    return f"a {type(obj).__name__}"


# ---------------------------------------------------------------------------------------------------- architecture


def infer_arch(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Best guess of the timm architecture of a canonical backbone state dict (``None`` if unknown)."""
    if _is_vit(sd):
        if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
            return None
        dim = sd["cls_token"].shape[-1]
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        patch = sd["patch_embed.proj.weight"].shape[-1]
        num_tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
        if patch == 16 and depth == 12 and num_tokens in (None, 197):
            return {384: "moco_vit_small", 768: "vit_base_patch16_224"}.get(dim)
        return None
    if _is_resnet(sd) and "conv1.weight" in sd:
        counts = []
        for i in range(1, 5):
            idx = {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{i}.")}
            counts.append(max(idx) + 1 if idx else 0)
        bottleneck = "layer1.0.conv3.weight" in sd
        arch = _RESNET_DEPTHS.get((bottleneck, tuple(counts)))
        if arch == "resnet50" and sd["layer1.0.conv1.weight"].shape[0] == 128:
            return "wide_resnet50_2"
        return arch
    return None


def _arch_from_hint(hint: Any) -> Optional[str]:
    if not isinstance(hint, str) or not hint:
        return None
    return OFFICIAL_ARCH_TO_TIMM.get(hint, hint)


def _expected_backbone_shapes(arch: str) -> Dict[str, Tuple[int, ...]]:
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as e:
        raise CheckpointError(f"unknown architecture {arch!r} ({type(e).__name__}: {e})") from e
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_arch(sd: Mapping[str, torch.Tensor], arch: str, *, source: Optional[PathLike] = None) -> None:
    """Raise :class:`CheckpointError` unless ``sd`` is exactly the backbone of the timm architecture ``arch``."""
    expected = _expected_backbone_shapes(arch)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    # a ViT position embedding for another image size is fine (it is resampled on load)
    mismatched = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k] and k != "pos_embed"]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatches (e.g. {k}: checkpoint {tuple(sd[k].shape)} vs {expected[k]})"
            )
        guess = infer_arch(sd)
        hint = f"; the weights look like {guess!r}" if guess and guess != arch else ""
        raise CheckpointError(
            f"{_name(source)}: backbone does not match architecture {arch!r}: {'; '.join(parts)}{hint}"
        )


# ------------------------------------------------------------------------------------------------------ conversion


def _split_head(sd: Dict[str, torch.Tensor], prefixes: Tuple[str, ...]) -> Tuple[Dict, Dict]:
    backbone, head = {}, {}
    for k, v in sd.items():
        for p in prefixes:
            if k == p or k.startswith(p + "."):
                head[k[len(p) + 1:]] = v
                break
        else:
            backbone[k] = v
    return backbone, head


def _sub(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _linear_head(head: Dict[str, torch.Tensor], source: Optional[PathLike]) -> Optional[Dict[str, torch.Tensor]]:
    if not head:
        return None
    if set(head) != {"weight", "bias"} or head["weight"].ndim != 2:
        raise CheckpointError(
            f"{_name(source)}: classifier head is not a single linear layer (keys {sorted(head)[:6]})"
        )
    return {"weight": head["weight"], "bias": head["bias"]}


def _canonical_tensors(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def to_canonical(
    ckpt: Union[PathLike, Mapping[str, Any]],
    arch: Optional[str] = None,
    *,
    allow_pickle: bool = False,
    source: Optional[PathLike] = None,
    check: bool = True,
) -> ConvertedCheckpoint:
    """Convert a checkpoint (a path or an already loaded object) to the canonical backbone.

    ``arch`` (a timm architecture) overrides the architecture recorded in / inferred from the checkpoint; with
    ``check=True`` the backbone is verified against it (key names and shapes) and a mismatch raises
    :class:`CheckpointError`.
    """
    meta: Dict[str, str] = {}
    if isinstance(ckpt, (str, os.PathLike)):
        source = source or ckpt
        obj, meta = load_checkpoint_file(ckpt, allow_pickle=allow_pickle)
    else:
        obj = ckpt
    name = _name(source)
    fmt = detect_format(obj)
    if not fmt:
        if isinstance(obj, Mapping) and obj.get("kind") == KIND_TRANSFER:
            raise CheckpointError(f"{name}: a transfer (detection/segmentation) checkpoint is not a backbone checkpoint")
        raise CheckpointError(
            f"{name}: unknown checkpoint layout ({_describe(obj)}); expected a MoCo pretraining checkpoint "
            f"(encoder_q.* / module.encoder_q.* / module.base_encoder.*), a linear-probe checkpoint or a "
            f"timm/torchvision ResNet or ViT state dict"
        )
    sd = _strip_wrappers(_inner_state_dict(obj) or {})
    hint = None
    class_names = None
    head: Optional[Dict[str, torch.Tensor]] = None
    if isinstance(obj, Mapping):
        hint = obj.get("arch")
    hint = hint or meta.get("arch") or meta.get("architecture")

    v3_layout = any(k.startswith("base_encoder.") for k in sd)  # official v3 files and our v3 pretraining
    if fmt in (FORMAT_PRETRAIN, FORMAT_OFFICIAL_V1V2) and not v3_layout:
        enc = _sub(sd, "encoder_q.")
        backbone, proj = _split_head(enc, ("fc", "head"))
    elif fmt == FORMAT_OFFICIAL_V3 or v3_layout:
        enc = _sub(sd, "base_encoder.")
        prefixes = ("head",) if _is_vit(enc) else ("fc",)
        backbone, proj = _split_head(enc, prefixes)
    else:  # classifier / linear-probe / backbone: a plain model state dict
        prefixes = ("head",) if _is_vit(sd) else ("fc",)
        backbone, raw_head = _split_head(sd, prefixes)
        head = _linear_head(raw_head, source)
        if isinstance(obj, Mapping) and isinstance(obj.get("class_names"), (list, tuple)):
            class_names = list(obj["class_names"])
        elif meta.get("class_names"):
            try:
                class_names = list(json.loads(meta["class_names"]))
            except ValueError:
                class_names = None
    if not backbone or not _looks_like_model(backbone):
        raise CheckpointError(f"{name}: {fmt} checkpoint has no recognisable ResNet/ViT encoder ({_describe(obj)})")

    if arch:
        final_arch: Optional[str] = arch
        if check:
            check_arch(backbone, arch, source=source)
    else:
        # The "arch" recorded in the file (official names are mapped to timm), else a guess from the weights; a
        # candidate that does not fit the weights exactly is dropped rather than trusted.
        final_arch, recorded_mismatch = None, None
        for cand in (_arch_from_hint(hint), infer_arch(backbone)):
            if not cand or not _is_known_arch(cand):
                continue
            if not check:
                final_arch = cand
                break
            try:
                check_arch(backbone, cand, source=source)
            except CheckpointError:
                if cand == _arch_from_hint(hint):
                    recorded_mismatch = cand
                continue
            final_arch = cand
            break
        if recorded_mismatch and final_arch:
            warnings.warn(f"{name}: the checkpoint records arch {hint!r} but its tensors are those of {final_arch!r}; "
                          f"converting as {final_arch!r}", stacklevel=2)
    if final_arch in _MOCO_V3_ARCH_FIX and (
        fmt == FORMAT_OFFICIAL_V3 or v3_layout or hint in OFFICIAL_ARCH_TO_TIMM
        or meta.get("source_format") == FORMAT_OFFICIAL_V3
    ):
        # MoCo v3's ViT-S has 12 heads: same parameter shapes as timm's 6-head ViT-S, different computation.
        final_arch = _MOCO_V3_ARCH_FIX[final_arch]
    info: Dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k in ("epoch", "moco_version", "mechanism", "metrics", "source", "config"):
            if k in obj:
                info[k] = obj[k]
    if meta:
        info["safetensors_metadata"] = meta
    return ConvertedCheckpoint(
        state_dict=_canonical_tensors(backbone),
        arch=final_arch,
        source_format=fmt,
        path=str(source) if source is not None else None,
        head=_canonical_tensors(head) if head else None,
        class_names=class_names,
        meta=info,
    )


def _is_known_arch(name: str) -> bool:
    try:
        return bool(timm.is_model(name))
    except Exception:
        return False


def adapt_pos_embed(sd: Dict[str, torch.Tensor], model: "torch.nn.Module") -> Dict[str, torch.Tensor]:
    """Resample a ViT ``pos_embed`` to ``model``'s patch grid (e.g. a 224 px checkpoint into a 64 px model)."""
    pe = sd.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pe is None or target is None or tuple(pe.shape) == tuple(target.shape):
        return sd
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    out = dict(sd)
    out["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    return out


# ------------------------------------------------------------------------------------------------------- detectron2


def detectron2_key(key: str) -> str:
    """Rename one torchvision/timm ResNet key the way facebookresearch/moco's detectron2 converter does."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    key = key.replace("downsample.0", "shortcut")
    key = key.replace("downsample.1", "shortcut.norm")
    return key


def to_detectron2_state_dict(converted: ConvertedCheckpoint) -> Dict[str, "Any"]:
    """Backbone weights under detectron2 ResNet names, as numpy arrays."""
    if converted.family != "resnet":
        raise CheckpointError(f"{_name(converted.path)}: detectron2 export supports ResNet backbones only")
    return {detectron2_key(k): v.numpy() for k, v in converted.state_dict.items()}


class _NumpyCompatPickler(pickle.Pickler):
    """Pickles numpy arrays as ``numpy.array(numpy.ndarray(shape, dtype_str, raw_bytes))``.

    numpy >= 2 pickles arrays through ``numpy._core.multiarray._reconstruct``, which numpy 1.x cannot import. Routing
    every array through the public ``numpy.ndarray`` constructor and ``numpy.array`` (present under the same names in
    every numpy release) gives a file that unpickles under numpy 1.x and 2.x, into ordinary writable arrays.
    """

    def reducer_override(self, obj):  # noqa: D401 (pickle hook)
        if type(obj) is np.ndarray:
            if obj.dtype.hasobject or obj.dtype.fields is not None:
                raise pickle.PicklingError("only plain numeric arrays can be written to a detectron2 file")
            return np.array, (_RawArray(obj),)
        if type(obj) is _RawArray:
            a = obj.array
            return np.ndarray, (tuple(int(s) for s in a.shape), a.dtype.str, a.tobytes(order="C"))
        return NotImplemented


class _RawArray:
    __slots__ = ("array",)

    def __init__(self, array):
        self.array = array


def dumps_detectron2(converted: ConvertedCheckpoint) -> bytes:
    """The bytes of a detectron2 weight file (``DetectionCheckpointer`` accepts it as a ``.pkl``)."""
    obj = {"model": to_detectron2_state_dict(converted), "__author__": "MOCO", "matching_heuristics": True}
    buf = io.BytesIO()
    _NumpyCompatPickler(buf, protocol=4).dump(obj)  # native bytes: no latin-1 blow-up
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------- writers


def save_timm(converted: ConvertedCheckpoint, out: PathLike, *, with_head: bool = True) -> Path:
    """``model.safetensors`` for timm (strict-loads into the architecture; + classifier for classifiers)."""
    meta = {"format": "pt", "source_format": converted.source_format}
    if converted.arch:
        meta["arch"] = converted.arch
    if with_head and converted.head:
        meta["num_classes"] = str(converted.num_classes)
        if converted.class_names:
            meta["class_names"] = json.dumps(list(converted.class_names))
    tensors = {k: v.contiguous() for k, v in converted.full_state_dict(with_head).items()}
    return atomic_write_bytes(out, _sorted_safetensors_header(st_save(tensors, metadata=meta)))


def _sorted_safetensors_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header keys sorted.

    safetensors writes metadata in hash-map order, so identical weights would get a different sha256 on every save
    (and a new Hub commit on every republish). Data offsets are relative to the end of the header, so only the header
    changes: 8-byte little-endian length, JSON, space padding to a multiple of 8.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def save_torchvision(converted: ConvertedCheckpoint, out: PathLike, *, with_head: bool = True) -> Path:
    """A plain state dict for ``torchvision.models.<arch>`` (strict without ``fc``, or with the trained ``fc``)."""
    if converted.family != "resnet":
        raise CheckpointError(f"{_name(converted.path)}: torchvision export supports ResNet backbones only")
    return atomic_torch_save(converted.full_state_dict(with_head), out)


def save_detectron2(converted: ConvertedCheckpoint, out: PathLike) -> Path:
    """detectron2 weights (``{"model", "__author__": "MOCO", "matching_heuristics": True}``), numpy 1.x/2.x safe."""
    return atomic_write_bytes(out, dumps_detectron2(converted))


def convert_file(
    ckpt: PathLike, to: str, out: PathLike, *, arch: Optional[str] = None, allow_pickle: bool = False
) -> Tuple[Path, ConvertedCheckpoint]:
    """Convert checkpoint file ``ckpt`` to ``to`` (timm | torchvision | detectron2) at ``out``."""
    converted = to_canonical(ckpt, arch, allow_pickle=allow_pickle)
    if to == "timm":
        path = save_timm(converted, out)
    elif to == "torchvision":
        path = save_torchvision(converted, out)
    elif to == "detectron2":
        path = save_detectron2(converted, out)
    else:
        raise ValueError(f"unknown output format {to!r}; expected one of {OUTPUT_FORMATS}")
    return path, converted
