"""ImageFolder loading with clear errors, and a resumable, distributed, exactly reproducible batch sampler.

Reproducibility: the batch sampler hands every sample a seed derived from (seed, epoch, sample index); the data set
seeds the ``torch`` and ``random`` generators with it around the augmentation. A sample's two views therefore depend
only on (seed, epoch, index), not on which DataLoader worker processed it nor on whether the run was resumed, and the
sampler can restart in the middle of an epoch (``set_epoch(epoch, start_step)``).
"""
from __future__ import annotations

import contextlib
import io
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from moco_zoo.data import ensure_dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The data directory or one of its files cannot be used; the message names it and says what was expected."""


class CorruptImageError(DataError):
    """An image file cannot be decoded."""


def _listdir(path: Path) -> List[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError as e:
        raise DataError(f"{path}: directory is not readable (permission denied); fix its permissions "
                        f"(e.g. chmod -R a+rX {path})") from e
    except NotADirectoryError as e:
        raise DataError(f"{path}: expected a directory, found a file") from e


def scan_imagefolder(root: Union[str, Path]) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples [(path, class index)], class names) of ``root/<class>/<image>``; raises :class:`DataError`."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: data directory does not exist (expected an ImageFolder root "
                        f"ROOT/<class>/<image>.jpg or ROOT/train/<class>/..., or DATA=synthetic)")
    entries = _listdir(root)
    class_dirs = [e for e in entries if e.is_dir()]
    loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    if not class_dirs:
        hint = (f" It holds {len(loose)} images directly (e.g. {loose[0]}); put them in class sub-directories "
                f"({root}/<class>/{loose[0]})." if loose else "")
        raise DataError(f"{root}: no class sub-directories found; expected an ImageFolder layout "
                        f"{root}/<class>/<image>.jpg.{hint}")
    classes = [e.name for e in class_dirs]
    samples: List[Tuple[str, int]] = []
    for ci, d in enumerate(class_dirs):
        for e in _listdir(Path(d.path)):
            if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS):
                samples.append((e.path, ci))
    if not samples:
        raise DataError(f"{root}: no images ({', '.join(IMG_EXTENSIONS[:3])}, ...) found in its {len(classes)} class "
                        f"directories ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    return samples, classes


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; a file PIL cannot decode raises :class:`CorruptImageError` naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read()  # one read: PIL parses the JPEG markers with many small reads of the file object
        return Image.open(io.BytesIO(data)).convert("RGB")  # forces the full decode inside the try
    except PermissionError as e:
        raise DataError(f"{path}: image file is not readable (permission denied)") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(f"{path}: cannot decode image ({type(e).__name__}: {e}); the file is corrupt or not "
                                f"an image - remove or replace it") from e


def resolve_split(data: Union[str, Path], split: str = "train") -> Path:
    """``DATA/split`` when it exists, else ``DATA`` itself (an ImageFolder root without splits)."""
    data = Path(data)
    return data / split if (data / split).is_dir() else data


def resolve_data_root(data: str, num_images: int = 800, image_size: int = 64, seed: int = 0) -> Path:
    """``synthetic`` -> the embedded synthetic ImageFolder (generated once into the cache), else ``data``."""
    if data == "synthetic":
        return Path(ensure_dataset("imagefolder", num_images=num_images, image_size=image_size, seed=seed))
    return Path(data)


def _mix64(*xs: int) -> int:
    """splitmix64 over the inputs: decorrelated 63-bit seeds from (seed, epoch, index)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return _mix64(seed, epoch, index)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Inside: torch's CPU generator and ``random`` seeded with ``seed``; their states are restored afterwards."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    # The CPU generator only: torch.manual_seed also queues a lazy CUDA/XPU/MTIA seeding call that records a Python
    # traceback when no device is initialised (~0.2 ms per sample on this CPU).
    torch.default_generator.manual_seed(int(seed))
    random.seed(int(seed))
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)


class ImageFolderDataset(Dataset):
    """``(transform(image), target, index)`` for every image of an ImageFolder tree.

    ``dataset[(index, seed)]`` seeds ``torch`` and ``random`` with ``seed`` for the transform (and restores their
    state afterwards), which is how :class:`ResumableBatchSampler` makes augmentations reproducible.
    """

    def __init__(self, root: Union[str, Path], transform: Optional[Callable] = None) -> None:
        self.root = Path(root)
        self.samples, self.classes = scan_imagefolder(self.root)
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: Union[int, Tuple[int, int]]) -> Tuple[Any, int, int]:
        if isinstance(item, (tuple, list)):
            index, seed = int(item[0]), int(item[1])
        else:
            index, seed = int(item), None
        path, target = self.samples[index]
        img = load_rgb(path)
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                with seeded_rng(seed):
                    img = self.transform(img)
        return img, target, index


class ResumableBatchSampler(Sampler[List[Tuple[int, int]]]):
    """Per-rank batches of ``(index, sample seed)`` with a shared per-epoch permutation; drops the last partial
    global batch (so all ranks step together); restartable at any step of an epoch.

    Rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of the permutation, ``batch_size`` (per rank) at a time.
    """

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"per-rank batch size must be >= 1, got {batch_size}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.rank, self.world_size, self.seed, self.shuffle = int(rank), int(world_size), int(seed), shuffle
        self.epoch, self.start_step = 0, 0
        if self.steps_per_epoch == 0:
            raise DataError(f"{num_samples} training images are fewer than one global batch "
                            f"({batch_size} x {world_size} ranks); lower --batch-size")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = int(epoch), int(start_step)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step}

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch - self.start_step)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix64(self.seed, self.epoch, 0x5A3D))
            perm = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            perm = list(range(self.num_samples))
        gb = self.batch_size * self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            chunk = perm[step * gb:(step + 1) * gb]
            mine = chunk[self.rank::self.world_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in mine]


def _worker_init(worker_id: int) -> None:
    # Per-sample seeding makes augmentation independent of this; still give numpy a distinct, reproducible seed.
    info = torch.utils.data.get_worker_info()
    np.random.seed(info.seed % 2**32)


def make_loader(dataset: Dataset, batch_sampler: Optional[Sampler] = None, *, batch_size: int = 1,
                workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                seed: int = 0, shuffle: bool = False, collate_fn: Optional[Callable] = None) -> DataLoader:
    """DataLoader that never draws from the global torch generator (so the training RNG stream is unaffected)."""
    kw: dict = dict(num_workers=workers, pin_memory=pin_memory and torch.cuda.is_available(),
                    generator=torch.Generator().manual_seed(seed), worker_init_fn=_worker_init,
                    collate_fn=collate_fn)
    if workers > 0:
        kw["persistent_workers"] = persistent_workers
        kw["prefetch_factor"] = 2
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **kw)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=False, **kw)
