"""Write synthetic scenes as ImageFolder, PASCAL VOC and COCO datasets (real on-disk layouts), atomically.

Every writer validates its arguments first, renders into a temporary sibling directory and renames it into place
only when everything has been written, so an error (or Ctrl-C) never leaves a half-written dataset behind. A small
marker file (``.moco_zoo_data.json``, the generation parameters) identifies directories written here: only those
may be replaced with ``overwrite=True``.

Outputs are byte-for-byte reproducible for a given seed: fixed JPEG settings, PNGs without timestamps, JSON with
sorted keys, and per-image random generators derived from ``(seed, split, index)``.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

from .synthetic import CLASSES, GENERATOR_VERSION, SUPERCATEGORIES, Scene, render_scene, scene_rng, voc_palette

PathLike = Union[str, os.PathLike]

MARKER = ".moco_zoo_data.json"
JPEG_QUALITY = 90
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 4096
COCO_VAL_FRACTION = 0.25
COCO_CROWD_PROB = 0.15
VOC_MIN_IMAGES = 4  # so that VOC2007 train, val and test are all non-empty

__all__ = [
    "write_imagefolder",
    "write_voc",
    "write_coco",
    "ensure_dataset",
    "mask_to_polygons",
    "mask_to_rle",
    "scene_for",
    "default_data_root",
]


# ------------------------------------------------------------------------------------------------------ validation


def _check_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _check_common(num_images: Any, image_size: Any, seed: Any, min_images: int = 1) -> Tuple[int, int, int]:
    n = _check_int("num_images", num_images, 1)
    if n < min_images:
        raise ValueError(f"num_images must be >= {min_images} for this format, got {n}")
    size = _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    s = _check_int("seed", seed, 0)
    return n, size, s


# ------------------------------------------------------------------------------------------------- atomic output


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"output directory {out} is not empty; pass --overwrite (overwrite=True) to replace it")
    if not (out / MARKER).is_file():
        raise FileExistsError(
            f"refusing to overwrite {out}: it is not empty and was not written by `moco-zoo make-data` "
            f"(no {MARKER}); remove it yourself or choose another --out"
        )


@contextlib.contextmanager
def _staging(out: Path, overwrite: bool, params: Dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to write into; move it to ``out`` on success, delete it on error."""
    _check_target(out, overwrite)
    created = None  # topmost ancestor this call creates, removed again if the write fails
    for parent in reversed(out.parents):
        if not parent.exists():
            created = parent
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps(params, sort_keys=True, indent=1) + "\n", encoding="utf-8")
        _install(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            d = out.parent
            while True:  # remove the (now empty) directories this call created, nothing else
                with contextlib.suppress(OSError):
                    d.rmdir()
                if d == created:
                    break
                d = d.parent
        raise


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        _check_target(out, overwrite)  # it may have changed while we were writing
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)  # put the previous dataset back
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError as e:  # another process created a non-empty ``out`` meanwhile
        raise FileExistsError(f"output directory {out} appeared while writing: {e}") from e


# ---------------------------------------------------------------------------------------------------------- helpers


def _save_jpeg(scene: Scene, path: Path) -> None:
    scene.to_pil().save(path, "JPEG", quality=JPEG_QUALITY, subsampling=2, optimize=False)


def _scene_size(rng: np.random.Generator, image_size: int) -> Tuple[int, int]:
    """(width, height) with the long side ``image_size`` and a VOC/COCO-like aspect (mostly landscape)."""
    short = int(round(image_size * rng.uniform(0.7, 1.0) / 2)) * 2
    short = max(MIN_IMAGE_SIZE, min(short, image_size))
    return (image_size, short) if rng.random() < 0.75 else (short, image_size)


def scene_for(kind: str, split: str, index: int, image_size: int, seed: int = 0) -> Scene:
    """The scene a writer draws for image ``index`` of ``split`` (pure function of its arguments).

    ``kind``/``split``: "imagefolder" with "train"/"val" (class ``index % len(CLASSES)``), "voc" with
    "2007"/"2012", "coco" with "train"/"val". Tests use it to compare files on disk with what was drawn.
    """
    if kind == "imagefolder":
        rng = scene_rng(seed, f"imagefolder/{split}", index)
        return render_scene(rng, image_size, image_size, dominant=index % len(CLASSES))
    if kind == "voc":
        rng = scene_rng(seed, f"voc{split}", index)
        width, height = _scene_size(rng, image_size)
        return render_scene(rng, width, height)
    if kind == "coco":
        rng = scene_rng(seed, f"coco/{split}", index)
        width, height = _scene_size(rng, image_size)
        return render_scene(rng, width, height, crowd_prob=COCO_CROWD_PROB)
    raise ValueError(f"unknown dataset kind {kind!r}")


def _split_sizes(num_images: int, val_fraction: float) -> Tuple[int, int]:
    n_val = int(round(num_images * val_fraction))
    return num_images - n_val, n_val


# ----------------------------------------------------------------------------------------------------- imagefolder


def write_imagefolder(
    out: PathLike,
    num_images: int = 800,
    image_size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
    val_fraction: float = 0.25,
) -> Path:
    """ImageNet-style classification data: ``out/{train,val}/<class>/<n>.jpg``, one dominant object per image.

    ``num_images`` counts train + val; classes are balanced (image ``j`` of a split has class ``j % len(CLASSES)``),
    so each split needs at least ``len(CLASSES)`` images. Returns ``out``.
    """
    out = Path(out)
    n, size, seed = _check_common(num_images, image_size, seed)
    if not isinstance(val_fraction, (int, float)) or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_train, n_val = _split_sizes(n, float(val_fraction))
    k = len(CLASSES)
    if min(n_train, n_val) < k:
        raise ValueError(
            f"num_images={n} with val_fraction={val_fraction} gives {n_train} train / {n_val} val images; each split "
            f"needs at least one image per class ({k} classes): use num_images >= {int(np.ceil(k / min(val_fraction, 1 - val_fraction)))}"
        )
    params = dict(kind="imagefolder", num_images=n, image_size=size, seed=seed, val_fraction=float(val_fraction),
                  generator_version=GENERATOR_VERSION)
    with _staging(out, overwrite, params) as tmp:
        for split, count in (("train", n_train), ("val", n_val)):
            for c in CLASSES:
                (tmp / split / c).mkdir(parents=True)
            for j in range(count):
                scene = scene_for("imagefolder", split, j, size, seed)
                _save_jpeg(scene, tmp / split / CLASSES[j % k] / f"{split}_{j:06d}.jpg")
    return out


# ------------------------------------------------------------------------------------------------------------- VOC


def _voc_xml(folder: str, image_id: str, scene: Scene) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "moco-zoo synthetic scenes"
    ET.SubElement(source, "annotation").text = "moco-zoo"
    ET.SubElement(source, "image").text = "procedural"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(scene.width)
    ET.SubElement(size, "height").text = str(scene.height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "1"
    for inst in scene.instances:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = inst.name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(inst.truncated))
        ET.SubElement(obj, "difficult").text = str(int(inst.difficult))
        box = ET.SubElement(obj, "bndbox")
        x0, y0, x1, y1 = inst.box  # 0-based inclusive pixels -> VOC's 1-based inclusive pixels
        for tag, v in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(v + 1)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="utf-8") + b"\n"


def _void_band(instance_map: np.ndarray) -> np.ndarray:
    """Background pixels 4-adjacent to an object: VOC marks object outlines as void (255)."""
    fg = instance_map > 0
    near = np.zeros_like(fg)
    near[1:] |= fg[:-1]
    near[:-1] |= fg[1:]
    near[:, 1:] |= fg[:, :-1]
    near[:, :-1] |= fg[:, 1:]
    return near & ~fg


def _save_palette_png(index: np.ndarray, path: Path, palette: List[int]) -> None:
    img = Image.fromarray(index.astype(np.uint8), "P")
    img.putpalette(palette)
    img.save(path, "PNG", optimize=False)


def _write_voc_year(devkit: Path, year: str, n: int, size: int, seed: int, splits: Dict[str, Callable[[int], bool]]) -> None:
    root = devkit / f"VOC{year}"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass",
              "SegmentationObject"):
        (root / d).mkdir(parents=True)
    palette = voc_palette()
    ids: List[str] = []
    presence: List[Dict[int, int]] = []  # per image: class -> 1 (has a non-difficult object) or 0 (only difficult)
    for i in range(n):
        scene = scene_for("voc", year, i, size, seed)
        image_id = f"{i + 1:06d}" if year == "2007" else f"{year}_{i + 1:06d}"
        ids.append(image_id)
        _save_jpeg(scene, root / "JPEGImages" / f"{image_id}.jpg")
        (root / "Annotations" / f"{image_id}.xml").write_bytes(_voc_xml(f"VOC{year}", image_id, scene))
        obj = scene.instance_map.copy()
        cls = np.zeros_like(obj)
        for k, inst in enumerate(scene.instances, start=1):
            cls[obj == k] = inst.category + 1
        void = (obj == 255) | _void_band(obj)
        obj[void] = 255
        cls[void] = 255
        _save_palette_png(obj, root / "SegmentationObject" / f"{image_id}.png", palette)
        _save_palette_png(cls, root / "SegmentationClass" / f"{image_id}.png", palette)
        pres: Dict[int, int] = {}
        for inst in scene.instances:
            pres[inst.category] = max(pres.get(inst.category, 0), 0 if inst.difficult else 1)
        presence.append(pres)
    for split, member in splits.items():
        idx = [i for i in range(n) if member(i)]
        lines = "".join(f"{ids[i]}\n" for i in idx)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(lines, encoding="utf-8")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(lines, encoding="utf-8")
        for c, name in enumerate(CLASSES):
            rows = "".join(f"{ids[i]} {presence[i].get(c, -1):2d}\n" for i in idx)
            (root / "ImageSets" / "Main" / f"{name}_{split}.txt").write_text(rows, encoding="utf-8")


def write_voc(
    out: PathLike,
    num_images: int = 200,
    image_size: int = 160,
    seed: int = 0,
    overwrite: bool = False,
    voc2012: bool = False,
) -> Path:
    """A PASCAL VOC tree ``out/VOCdevkit/VOC2007`` (and ``VOC2012`` trainval with other images if ``voc2012``).

    VOC2007 gets ``num_images`` images split 1/4 train, 1/4 val, 1/2 test (by index); VOC2012 gets ``num_images``
    trainval images. ``image_size`` is the long side; the short side varies. The class list (``CLASSES``) is
    written to ``VOCdevkit/classes.txt``. Returns the ``VOCdevkit`` directory.
    """
    out = Path(out)
    n, size, seed = _check_common(num_images, image_size, seed, min_images=VOC_MIN_IMAGES)
    params = dict(kind="voc", num_images=n, image_size=size, seed=seed, voc2012=bool(voc2012),
                  generator_version=GENERATOR_VERSION)
    with _staging(out, overwrite, params) as tmp:
        devkit = tmp / "VOCdevkit"
        devkit.mkdir()
        (devkit / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES), encoding="utf-8")
        _write_voc_year(devkit, "2007", n, size, seed, {
            "train": lambda i: i % 4 == 0,
            "val": lambda i: i % 4 == 2,
            "trainval": lambda i: i % 2 == 0,
            "test": lambda i: i % 2 == 1,
        })
        if voc2012:
            _write_voc_year(devkit, "2012", n, size, seed, {
                "train": lambda i: i % 2 == 0,
                "val": lambda i: i % 2 == 1,
                "trainval": lambda i: True,
            })
    return out / "VOCdevkit"


# ------------------------------------------------------------------------------------------------------------ COCO


def _boundary_loops(mask: np.ndarray) -> List[np.ndarray]:
    """Closed pixel-edge boundary loops of a bool mask, as Kx2 integer (x, y) corner arrays.

    Edges are oriented with the object on their right (screen coordinates, y down): outer boundaries run
    clockwise (positive shoelace area), hole boundaries anticlockwise. Where two pixels touch only at a corner the
    trace turns right, so diagonal neighbours belong to different loops.
    """
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1]
    segs = []
    for exposed, (sx, sy, ex, ey) in (
        (inner & ~m[:-2, 1:-1], (0, 0, 1, 0)),  # top edge, heading right
        (inner & ~m[1:-1, 2:], (1, 0, 1, 1)),  # right edge, heading down
        (inner & ~m[2:, 1:-1], (1, 1, 0, 1)),  # bottom edge, heading left
        (inner & ~m[1:-1, :-2], (0, 1, 0, 0)),  # left edge, heading up
    ):
        r, c = np.nonzero(exposed)
        segs.append(np.stack([c + sx, r + sy, c + ex, r + ey], axis=1))
    edges = np.concatenate(segs).tolist()
    succ: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    for x0, y0, x1, y1 in edges:
        succ.setdefault((x0, y0), []).append((x1, y1))
    orig = {v: tuple(outs) for v, outs in succ.items()}
    junction = {v for v, outs in orig.items() if len(outs) > 1}

    def step(prev: Tuple[int, int], cur: Tuple[int, int]) -> Tuple[int, int]:
        if cur not in junction:
            return orig[cur][0]
        dx, dy = cur[0] - prev[0], cur[1] - prev[1]
        return (cur[0] - dy, cur[1] + dx)  # turn right (y down): the pixels touching at this corner separate

    loops: List[np.ndarray] = []
    # Start on ordinary vertices first; a loop whose corners are all junctions (a pixel touching four diagonal
    # neighbours) starts on a junction and closes when the turn rule would take its first edge again.
    for start in [v for v in orig if v not in junction] + [v for v in orig if v in junction]:
        while succ[start]:
            first = succ[start].pop()
            pts = [start]
            prev, cur = start, first
            while True:
                nxt = step(prev, cur)
                if cur == start and nxt == first:
                    break
                pts.append(cur)
                succ[cur].remove(nxt)
                prev, cur = cur, nxt
            arr = np.asarray(pts, dtype=np.int64)
            d_in = arr - np.roll(arr, 1, axis=0)
            d_out = np.roll(arr, -1, axis=0) - arr
            loops.append(arr[(d_in != d_out).any(1)])  # keep corners only
    return loops


def _signed_area(loop: np.ndarray) -> float:
    x, y = loop[:, 0].astype(np.float64), loop[:, 1].astype(np.float64)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _contains(loop: np.ndarray, px: float, py: float) -> bool:
    """Even-odd point-in-polygon test (the point is a pixel centre, never on an edge)."""
    x0, y0 = loop[:, 0].astype(np.float64), loop[:, 1].astype(np.float64)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    return bool(np.count_nonzero(crosses & (xs > px)) % 2)


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """COCO polygons (flat ``[x0, y0, x1, y1, ...]`` lists) whose pycocotools rasterisation is exactly ``mask``.

    Polygons follow pixel edges (pixel ``(r, c)`` is the square ``[c, c+1] x [r, r+1]``, COCO's convention). Each
    outer boundary is one polygon; its holes are appended to it through a connecting segment that is walked once
    in each direction, so pycocotools' even-odd fill cuts them out while the connector cancels itself.
    """
    loops = _boundary_loops(mask)
    areas = [_signed_area(lp) for lp in loops]
    outers = [i for i, a in enumerate(areas) if a > 0]
    holes_of: Dict[int, List[int]] = {i: [] for i in outers}
    for h, a in enumerate(areas):
        if a >= 0:
            continue
        lp = loops[h]
        (x0, y0), (x1, y1) = lp[0], lp[1]
        dx, dy = np.sign(x1 - x0), np.sign(y1 - y0)
        # centre of the hole pixel just left of the first edge (object pixels are on the right)
        px, py = x0 + 0.5 * dx + 0.5 * dy, y0 + 0.5 * dy - 0.5 * dx
        owners = [o for o in outers if _contains(loops[o], px, py)]
        if not owners:
            raise AssertionError("hole boundary outside every outer boundary")
        holes_of[min(owners, key=lambda o: areas[o])].append(h)
    polygons: List[List[float]] = []
    for o in outers:
        outer = loops[o]
        parts = [outer, outer[:1]]
        for h in holes_of[o]:
            parts += [loops[h], loops[h][:1], outer[:1]]
        polygons.append(np.concatenate(parts).astype(np.float64).ravel().tolist())
    return polygons


def mask_to_rle(mask: np.ndarray) -> Dict[str, Any]:
    """Uncompressed COCO RLE ``{"counts": [...], "size": [h, w]}`` (column-major runs, starting with zeros)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _coco_split(seed: int, split: str, n: int, size: int, id_offset: int, image_dir: Path) -> Dict[str, Any]:
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    for i in range(n):
        scene = scene_for("coco", split, i, size, seed)
        width, height = scene.width, scene.height
        image_id = id_offset + i + 1
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(scene, image_dir / file_name)
        images.append({
            "id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1,
            "coco_url": "", "flickr_url": "", "date_captured": "2017-01-01 00:00:00",
        })
        for k, inst in enumerate(scene.instances):
            x0, y0, x1, y1 = inst.box
            segmentation: Any = mask_to_rle(inst.mask) if inst.iscrowd else mask_to_polygons(inst.mask)
            annotations.append({
                "id": image_id * 100 + k, "image_id": image_id, "category_id": inst.category + 1,
                "segmentation": segmentation, "area": float(inst.area),
                "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)], "iscrowd": int(inst.iscrowd),
            })
    return {
        "info": {
            "description": f"moco-zoo synthetic scenes ({split}2017)", "url": "", "version": str(GENERATOR_VERSION),
            "year": 2017, "contributor": "moco-zoo", "date_created": "2017-01-01",
        },
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": name, "supercategory": SUPERCATEGORIES[name]} for c, name in enumerate(CLASSES)],
    }


def write_coco(
    out: PathLike,
    num_images: int = 200,
    image_size: int = 160,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """COCO 2017 layout: ``out/annotations/instances_{train,val}2017.json`` and ``out/{train,val}2017/*.jpg``.

    ``num_images`` counts train + val (a quarter goes to val). Objects get polygon segmentations that rasterise
    exactly to their visible pixels; crowd regions (``iscrowd=1``) get uncompressed RLE, as in COCO. Returns ``out``.
    """
    out = Path(out)
    n, size, seed = _check_common(num_images, image_size, seed, min_images=2)
    n_train, n_val = _split_sizes(n, COCO_VAL_FRACTION)
    n_val = max(n_val, 1)
    n_train = n - n_val
    params = dict(kind="coco", num_images=n, image_size=size, seed=seed, generator_version=GENERATOR_VERSION)
    with _staging(out, overwrite, params) as tmp:
        (tmp / "annotations").mkdir()
        for split, count, offset in (("train", n_train, 0), ("val", n_val, 1_000_000)):
            image_dir = tmp / f"{split}2017"
            image_dir.mkdir()
            data = _coco_split(seed, split, count, size, offset, image_dir)
            text = json.dumps(data, sort_keys=True, separators=(",", ":"))
            (tmp / "annotations" / f"instances_{split}2017.json").write_text(text, encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------------------ cache

_WRITERS: Dict[str, Callable[..., Path]] = {"imagefolder": write_imagefolder, "voc": write_voc, "coco": write_coco}


def default_data_root() -> Path:
    """``$MOCO_ZOO_DATA`` or ``~/.cache/moco_zoo/data``."""
    env = os.environ.get("MOCO_ZOO_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moco_zoo" / "data"


def ensure_dataset(kind: str, root: Optional[PathLike] = None, **params: Any) -> Path:
    """Return a cached synthetic dataset of ``kind`` ("imagefolder", "voc", "coco"), generating it if missing.

    ``params`` are the writer's keyword arguments (num_images, image_size, seed, ...). The cache directory is
    ``<root>/<kind>-<hash of all parameters and the generator version>``; the return value is what the writer
    returns for it (the ``VOCdevkit`` directory for VOC).
    """
    if kind not in _WRITERS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(_WRITERS)}")
    writer = _WRITERS[kind]
    sig = inspect.signature(writer)
    if "out" in params or "overwrite" in params:
        raise ValueError("ensure_dataset chooses the output directory itself; do not pass out/overwrite")
    try:
        bound = sig.bind_partial(**params)
    except TypeError as e:
        raise ValueError(f"bad parameters for {kind}: {e}") from None
    bound.apply_defaults()
    full = {k: v for k, v in bound.arguments.items() if k not in ("out", "overwrite")}
    key = json.dumps({"kind": kind, "generator_version": GENERATOR_VERSION, **full}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    out = Path(root).expanduser() if root is not None else default_data_root()
    out = out / f"{kind}-n{full['num_images']}-px{full['image_size']}-seed{full['seed']}-{digest}"
    result = out / "VOCdevkit" if kind == "voc" else out
    if (out / MARKER).is_file():
        return result
    try:
        return writer(out, **full)
    except FileExistsError:
        if (out / MARKER).is_file():  # another process generated it concurrently
            return result
        raise
