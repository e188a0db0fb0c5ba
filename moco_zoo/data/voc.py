"""Pascal VOC readers: detection annotations (XML) and semantic segmentation masks (palette PNG).

Layout read (the official VOCdevkit)::

    VOCdevkit/
      classes.txt                      optional: one class name per line (synthetic sets write it)
      VOC2007/
        Annotations/<id>.xml
        JPEGImages/<id>.jpg
        ImageSets/Main/{train,val,trainval,test}.txt
        ImageSets/Segmentation/{train,val,trainval}.txt
        SegmentationClass/<id>.png     palette PNG: index = class (0 background), 255 = "void" (ignored)
      VOC2012/ ...

Box convention: VOC XML stores 1-based inclusive pixel indices (xmin=1 is the first pixel column). We convert to the
0-based *continuous* xyxy convention used by torchvision and COCO: ``x0 = xmin - 1, y0 = ymin - 1, x1 = xmax,
y1 = ymax``, so a box covering pixels 1..W has width W and IoU is computed without VOC's historical ``+1`` (see
``transfer/evaluation/voc.py``). Labels are 1..C in the order of the class list; 0 is background.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

PathLike = Union[str, os.PathLike]

#: The 20 Pascal VOC object classes in the standard (alphabetical, devkit) order; label i+1 is VOC_CLASSES[i].
VOC_CLASSES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: Segmentation index of the "void" border / ignore region in SegmentationClass PNGs.
VOC_IGNORE_INDEX = 255

DEFAULT_DET_IMAGE_SETS: Tuple[Tuple[str, str], ...] = (("2007", "trainval"), ("2012", "trainval"))


class VOCFormatError(ValueError):
    """A VOC file is missing or malformed. The message names the file (and the object index when relevant)."""


def read_class_list(devkit_root: PathLike) -> List[str]:
    """``classes.txt`` at the VOCdevkit root (one name per line) when present, else the 20 real VOC classes."""
    path = Path(devkit_root) / "classes.txt"
    if not path.is_file():
        return list(VOC_CLASSES)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not names:
        raise VOCFormatError(f"{path}: class list is empty (expected one class name per line)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VOCFormatError(f"{path}: duplicate class names {dup}")
    if "background" in names or "__background__" in names:
        raise VOCFormatError(f"{path}: list only object classes; background is implicit (label 0)")
    return names


def _text(node: ET.Element, tag: str, path: Path, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise VOCFormatError(f"{path}: {where}missing <{tag}>")
    return child.text.strip()


def _number(node: ET.Element, tag: str, path: Path, where: str) -> float:
    raw = _text(node, tag, path, where)
    try:
        return float(raw)
    except ValueError:
        raise VOCFormatError(f"{path}: {where}<{tag}> is {raw!r}, expected a number") from None


def _flag(node: ET.Element, tag: str) -> bool:
    child = node.find(tag)
    if child is None or child.text is None:
        return False
    try:
        return int(float(child.text.strip())) != 0
    except ValueError:
        return False


def parse_voc_xml(path: PathLike, class_names: Sequence[str]) -> Dict[str, object]:
    """Parse one VOC annotation XML into numpy arrays (see module docstring for the box convention).

    Returns ``dict(filename, width, height, boxes float32 Nx4, labels int64 N (1..C), difficult bool N,
    truncated bool N)``. Raises :class:`VOCFormatError` naming the file (and ``object #i``) for a missing file,
    malformed XML, a class not in ``class_names``, a box outside the image or a degenerate box (x1 <= x0 after
    conversion, i.e. xmax < xmin in the file's 1-based inclusive indices).
    """
    path = Path(path)
    if not path.is_file():
        raise VOCFormatError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise VOCFormatError(f"{path}: malformed XML ({e})") from None
    if root.tag != "annotation":
        raise VOCFormatError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    index = {name: i + 1 for i, name in enumerate(class_names)}
    filename = root.findtext("filename")
    filename = filename.strip() if filename and filename.strip() else path.stem + ".jpg"
    size = root.find("size")
    if size is None:
        raise VOCFormatError(f"{path}: missing <size> (expected <width> and <height>)")
    width = int(_number(size, "width", path, "<size>: "))
    height = int(_number(size, "height", path, "<size>: "))
    if width <= 0 or height <= 0:
        raise VOCFormatError(f"{path}: image size {width}x{height} is not positive")

    boxes, labels, difficult, truncated = [], [], [], []
    for i, obj in enumerate(root.findall("object")):
        where = f"object #{i}: "
        name = _text(obj, "name", path, where)
        if name not in index:
            shown = list(class_names) if len(class_names) <= 25 else list(class_names[:25]) + ["..."]
            raise VOCFormatError(f"{path}: object #{i}: class {name!r} is not in the class list {shown}")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise VOCFormatError(f"{path}: object #{i} ({name}): missing <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bnd, t, path, f"object #{i} ({name}) <bndbox>: ")
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
        x0, y0, x1, y1 = xmin - 1.0, ymin - 1.0, xmax, ymax
        box_txt = f"(xmin={xmin:g}, ymin={ymin:g}, xmax={xmax:g}, ymax={ymax:g})"
        if x1 <= x0 or y1 <= y0:
            raise VOCFormatError(f"{path}: object #{i} ({name}): degenerate box {box_txt}: "
                                 f"expected xmin <= xmax and ymin <= ymax (1-based inclusive pixel indices)")
        # xmin = 0 occurs in a handful of real VOC files; tolerate it (clipped to 0) but nothing further outside.
        if x0 < -1.0 or y0 < -1.0 or x1 > width or y1 > height:
            raise VOCFormatError(f"{path}: object #{i} ({name}): box {box_txt} lies outside the "
                                 f"{width}x{height} image (expected 1 <= xmin <= xmax <= {width}, "
                                 f"1 <= ymin <= ymax <= {height})")
        boxes.append([max(x0, 0.0), max(y0, 0.0), x1, y1])
        labels.append(index[name])
        difficult.append(_flag(obj, "difficult"))
        truncated.append(_flag(obj, "truncated"))
    return {
        "filename": filename,
        "width": width,
        "height": height,
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "difficult": np.asarray(difficult, dtype=bool),
        "truncated": np.asarray(truncated, dtype=bool),
    }


def read_image_set(devkit_root: PathLike, year: str, split: str, kind: str = "Main") -> List[str]:
    """Image ids listed in ``VOC<year>/ImageSets/<kind>/<split>.txt`` (first token of each line)."""
    path = Path(devkit_root) / f"VOC{year}" / "ImageSets" / kind / f"{split}.txt"
    if not path.is_file():
        raise VOCFormatError(f"{path}: image-set file not found (VOC{year} {kind} split {split!r}); "
                             f"expected a VOCdevkit layout VOCdevkit/VOC{year}/ImageSets/{kind}/{split}.txt")
    ids = [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise VOCFormatError(f"{path}: image-set file is empty")
    return ids


def load_rgb(path: Path) -> Image.Image:
    if not path.is_file():
        raise VOCFormatError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise VOCFormatError(f"{path}: unreadable image ({e})") from None


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float CHW in [0, 1]."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _normalise_image_sets(image_sets) -> List[Tuple[str, str]]:
    # A single set may be given bare: "2007-trainval" or ("2007", "trainval").
    single_pair = (isinstance(image_sets, tuple) and len(image_sets) == 2
                   and all(isinstance(s, (str, int)) for s in image_sets) and not str(image_sets[1]).isdigit())
    if isinstance(image_sets, str) or single_pair:
        image_sets = [image_sets]
    out = []
    for item in image_sets:
        if isinstance(item, str):  # "2007-trainval" / "2007_trainval" / "2007:trainval"
            for sep in (":", "-", "_"):
                if sep in item:
                    y, s = item.split(sep, 1)
                    break
            else:
                raise ValueError(f"image set {item!r}: expected (year, split) or 'YEAR-split'")
            item = (y, s)
        year, split = item
        out.append((str(year), str(split)))
    return out


class VOCDetection(torch.utils.data.Dataset):
    """VOC detection dataset over one or more ``(year, split)`` image sets.

    ``dataset[i]`` is ``(image, target)``: ``image`` float CHW RGB in [0, 1]; ``target`` dict with ``boxes`` float32
    Nx4 (0-based xyxy), ``labels`` int64 N (1..C), ``difficult`` bool N, ``image_id`` int (index into the dataset,
    ``ids[image_id]`` gives ``(year, voc_id)``), ``orig_size`` int64 tensor ``[h, w]``. ``transforms(image, target)``
    is applied to the tensor image and returns the pair. With ``keep_difficult=False`` difficult objects are removed
    (the evaluation needs them: keep them for the test set). All XML files are parsed and validated up front so a bad
    file fails at construction, naming the file.
    """

    def __init__(self, devkit_root: PathLike, image_sets=DEFAULT_DET_IMAGE_SETS,
                 class_names: Optional[Sequence[str]] = None, transforms: Optional[Callable] = None,
                 keep_difficult: bool = True):
        self.root = Path(devkit_root)
        if not self.root.is_dir():
            raise VOCFormatError(f"{self.root}: VOCdevkit directory not found")
        self.class_names = list(class_names) if class_names is not None else read_class_list(self.root)
        self.image_sets = _normalise_image_sets(image_sets)
        self.transforms = transforms
        self.keep_difficult = keep_difficult
        self.ids: List[Tuple[str, str]] = []
        for year, split in self.image_sets:
            self.ids.extend((year, i) for i in read_image_set(self.root, year, split, "Main"))
        self._annotations = [self._parse(i) for i in range(len(self.ids))]

    def __len__(self) -> int:
        return len(self.ids)

    def annotation_path(self, index: int) -> Path:
        year, vid = self.ids[index]
        return self.root / f"VOC{year}" / "Annotations" / f"{vid}.xml"

    def image_path(self, index: int) -> Path:
        year, vid = self.ids[index]
        return self.root / f"VOC{year}" / "JPEGImages" / f"{vid}.jpg"

    def _parse(self, index: int) -> Dict[str, object]:
        ann = parse_voc_xml(self.annotation_path(index), self.class_names)
        if not self.keep_difficult:
            keep = ~ann["difficult"]
            for k in ("boxes", "labels", "difficult", "truncated"):
                ann[k] = ann[k][keep]
        return ann

    def get_annotation(self, index: int) -> Dict[str, object]:
        """Parsed annotation (numpy arrays, original image coordinates) without loading the image."""
        return self._annotations[index]

    def ground_truths(self) -> Dict[int, Dict[str, np.ndarray]]:
        """``{image_id: dict(boxes, labels, difficult)}`` in original coordinates, for ``evaluate_voc``."""
        return {i: {k: a[k] for k in ("boxes", "labels", "difficult")} for i, a in enumerate(self._annotations)}

    def __getitem__(self, index: int):
        ann = self._annotations[index]
        image = load_rgb(self.image_path(index))
        if image.size != (ann["width"], ann["height"]):
            raise VOCFormatError(f"{self.image_path(index)}: image is {image.size[0]}x{image.size[1]} but "
                                 f"{self.annotation_path(index)} says {ann['width']}x{ann['height']}")
        target = {
            "boxes": torch.from_numpy(ann["boxes"].copy()),
            "labels": torch.from_numpy(ann["labels"].copy()),
            "difficult": torch.from_numpy(ann["difficult"].copy()),
            "image_id": index,
            "orig_size": torch.tensor([ann["height"], ann["width"]], dtype=torch.int64),
        }
        img = to_tensor(image)
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target


# --------------------------------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------------------------------

def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC colour map (``n`` x 3 uint8): bit-interleaved colours, index 255 is (224, 224, 192)."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def read_segmentation_png(path: PathLike) -> np.ndarray:
    """HxW uint8 class-index mask from a SegmentationClass PNG (palette index = class, 255 = ignore).

    Palette ("P") and greyscale ("L") PNGs are read as indices; RGB PNGs are mapped back through the VOC colour map
    (an unknown colour is an error naming the file and the pixel).
    """
    path = Path(path)
    if not path.is_file():
        raise VOCFormatError(f"{path}: segmentation mask not found")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "L"):
                return np.array(im, dtype=np.uint8)
            rgb = np.array(im.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise VOCFormatError(f"{path}: unreadable mask ({e})") from None
    pal = voc_palette().astype(np.int64)
    codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
    lut = {int(c): i for i, c in enumerate(codes)}
    flat = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    out = np.zeros(flat.shape, dtype=np.uint8)
    for code in np.unique(flat):
        if int(code) not in lut:
            y, x = np.argwhere(flat == code)[0]
            raise VOCFormatError(f"{path}: pixel (x={x}, y={y}) has colour #{int(code):06x}, not in the VOC palette")
        out[flat == code] = lut[int(code)]
    return out


class VOCSegmentation(torch.utils.data.Dataset):
    """VOC semantic segmentation over ``ImageSets/Segmentation/<split>.txt`` lists.

    ``dataset[i]`` is ``(image, mask)``: ``image`` float CHW RGB in [0, 1], ``mask`` int64 HxW with 0 = background,
    1..C = classes, 255 = ignore. ``transforms(image, mask)`` returns the pair. Mask values that are neither a class
    index nor 255 raise an error naming the file (checked when the sample is read). ``mask_dir`` is the mask folder
    inside ``VOC<year>/`` (``SegmentationClassAug`` for the SBD-augmented set).
    """

    def __init__(self, devkit_root: PathLike, image_sets=(("2012", "train"),),
                 class_names: Optional[Sequence[str]] = None, transforms: Optional[Callable] = None,
                 mask_dir: str = "SegmentationClass"):
        self.root = Path(devkit_root)
        if not self.root.is_dir():
            raise VOCFormatError(f"{self.root}: VOCdevkit directory not found")
        self.class_names = list(class_names) if class_names is not None else read_class_list(self.root)
        self.num_classes = len(self.class_names) + 1  # with background
        self.image_sets = _normalise_image_sets(image_sets)
        self.transforms = transforms
        self.mask_dir = mask_dir
        self.ids: List[Tuple[str, str]] = []
        for year, split in self.image_sets:
            self.ids.extend((year, i) for i in read_image_set(self.root, year, split, "Segmentation"))

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        year, vid = self.ids[index]
        return self.root / f"VOC{year}" / "JPEGImages" / f"{vid}.jpg"

    def mask_path(self, index: int) -> Path:
        year, vid = self.ids[index]
        return self.root / f"VOC{year}" / self.mask_dir / f"{vid}.png"

    def read_mask(self, index: int) -> np.ndarray:
        path = self.mask_path(index)
        mask = read_segmentation_png(path)
        bad = (mask >= self.num_classes) & (mask != VOC_IGNORE_INDEX)
        if bad.any():
            y, x = np.argwhere(bad)[0]
            raise VOCFormatError(f"{path}: pixel (x={x}, y={y}) has class index {int(mask[y, x])}, expected "
                                 f"0..{self.num_classes - 1} or {VOC_IGNORE_INDEX} (ignore)")
        return mask

    def __getitem__(self, index: int):
        mask = self.read_mask(index)
        image = load_rgb(self.image_path(index))
        if mask.shape != (image.size[1], image.size[0]):
            raise VOCFormatError(f"{self.mask_path(index)}: mask is {mask.shape[1]}x{mask.shape[0]} but the image "
                                 f"{self.image_path(index)} is {image.size[0]}x{image.size[1]}")
        img = to_tensor(image)
        target = torch.from_numpy(mask.astype(np.int64))
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target
