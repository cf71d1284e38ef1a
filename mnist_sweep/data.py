"""MNIST: read its IDX files (downloaded with torchvision when missing), split off a validation set, and serve
batches.

Two loader modes serve the same split:
- ``memory`` (default): the uint8 images are normalized once into one float tensor on the training device and
  each epoch is a seeded permutation sliced into batches. No PIL, no per-image work, no host copies per batch.
- ``classic``: torchvision's dataset with ``ToTensor`` + ``Normalize`` through a ``DataLoader``, image by image,
  as in pytorch/examples. Kept so the two can be measured side by side.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, DataError, one_line
from .model import NUM_CLASSES

LOADERS = ("memory", "classic")
MAX_ELASTIC_SIGMA = 7.0  # pixels: the smoothing kernel (8 sigma + 1 taps, as torchvision's) reflects inside 28 pixels
DOWNLOAD_TIMEOUT_S = 30.0  # seconds a mirror may take to connect or to send the next bytes of a download
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class DataConfig:
    root: str  # folder that holds MNIST/raw/
    download: bool = True  # let torchvision fetch missing files
    val_size: int = 5000  # images held out of the 60k training set for validation
    split_seed: int = 0  # fixes which images are held out, independent of the training seed
    # also train on the held-out images: the final fit of settings already chosen on validation (val/* then
    # score images the model was trained on, so a sweep must not optimize them)
    train_on_val: bool = False
    batch_size: int = 64  # training batch
    eval_batch_size: int = 1000  # validation/test batch
    mean: float = 0.1307  # normalization, on pixel values in [0, 1]
    std: float = 0.3081
    max_shift: int = 0  # augmentation: random translation in pixels (0 = off)
    max_rotation: float = 0.0  # augmentation: random rotation in degrees (0 = off)
    max_zoom: float = 0.0  # augmentation: random scale in [1 - max_zoom, 1 + max_zoom] (0 = off)
    elastic_alpha: float = 0.0  # augmentation: elastic distortion's strength in pixels (Simard's alpha; 0 = off)
    elastic_sigma: float = 4.0  # augmentation: the distortion field's Gaussian smoothing in pixels
    loader: str = "memory"  # memory | classic
    num_workers: int = 0  # DataLoader workers, classic loader only

    def __post_init__(self) -> None:
        if not isinstance(self.root, str) or not self.root.strip():  # '' would be the current folder
            raise ConfigError(f"data.root={self.root!r} is empty: point it at the folder that holds MNIST/raw/, e.g. "
                              "data.root=../shared/data, or leave it out and export MNIST_ROOT")
        if self.loader not in LOADERS:
            raise ConfigError(f"data.loader={self.loader!r} is not a loader; allowed: {', '.join(LOADERS)}")
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 1")
        if self.val_size < 1:
            raise ConfigError(f"data.val_size={self.val_size} must be >= 1: the validation set drives model "
                              "selection and the sweep objective")
        if self.std <= 0:
            raise ConfigError(f"data.std={self.std} must be > 0")
        if self.max_shift < 0 or self.max_rotation < 0:
            raise ConfigError(f"data.max_shift={self.max_shift} and data.max_rotation={self.max_rotation} "
                              "must be >= 0")
        if not 0 <= self.max_zoom < 1:
            raise ConfigError(f"data.max_zoom={self.max_zoom} must be in [0, 1): a scale factor in "
                              "[1 - max_zoom, 1 + max_zoom] (0 = off)")
        if self.elastic_alpha < 0:
            raise ConfigError(f"data.elastic_alpha={self.elastic_alpha} must be >= 0: the distortion's strength in "
                              "pixels (0 = off)")
        if not 0 < self.elastic_sigma < MAX_ELASTIC_SIGMA:
            raise ConfigError(f"data.elastic_sigma={self.elastic_sigma} must be in (0, {MAX_ELASTIC_SIGMA:g}): the "
                              "smoothing in pixels, whose kernel must fit inside the 28-pixel image")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0")

    @property
    def background(self) -> float:
        """The normalized value of a black pixel: what a test-time shift uncovers."""
        return background(self.mean, self.std)


def background(mean: float, std: float) -> float:
    """The value of a black pixel after normalizing with (mean, std)."""
    return (0.0 - mean) / std


@dataclass(frozen=True)
class MnistArrays:
    """The raw dataset as uint8 images (N, 28, 28) and int64 labels (N,)."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor

    @functools.cached_property
    def content_digest(self) -> str:
        """digest(self), hashed once: every trial of a sweep logs it, and hashing 55 MB takes a tenth of a second."""
        return digest(self)


_CACHE: dict[tuple[str, bool], MnistArrays] = {}


def load_mnist(root: str, download: bool) -> MnistArrays:
    """Read MNIST through torchvision (which downloads it when allowed), once per process: a sweep's worker runs
    many trials on one copy."""
    key = (str(Path(root).expanduser().resolve()), download)
    if key not in _CACHE:
        train = _torchvision_mnist(root, train=True, download=download)
        test = _torchvision_mnist(root, train=False, download=download)
        for name, part in (("train", train), ("t10k", test)):
            if part.data.shape[1:] != (28, 28) or len(part.data) != len(part.targets):
                raise DataError(f"MNIST {name} files under {Path(part.raw_folder).absolute()} disagree: "
                                f"{len(part.data)} images but {len(part.targets)} labels, images of shape "
                                f"{tuple(part.data.shape[1:])} (expected 28x28). Replace them with the official "
                                "files.")
            _check_labels(part.targets, Path(part.raw_folder).absolute() / f"{name}-labels-idx1-ubyte")
        _CACHE[key] = MnistArrays(train.data, train.targets, test.data, test.targets)
    return _CACHE[key]


def _check_labels(labels: Tensor, path: Path) -> None:
    """Every label a class of the net: a stray 200 would stop training midway with "Target 200 is out of bounds"."""
    bad = ((labels < 0) | (labels >= NUM_CLASSES)).nonzero()
    if len(bad):
        i = bad[0].item()
        raise DataError(f"MNIST labels file {path} holds label {labels[i].item()} at position {i} ({len(bad)} "
                        f"label(s) out of range); allowed: 0..{NUM_CLASSES - 1}. Replace it with the official file.")


def clear_cache() -> None:
    _CACHE.clear()
    _TENSOR_CACHE.clear()


def _torchvision_mnist(root: str, train: bool, download: bool, transform=None):
    from torchvision.datasets import MNIST

    raw = Path(root).expanduser().absolute() / "MNIST" / "raw"
    fix = (f"Point data.root (or the MNIST_ROOT environment variable) at a folder that holds MNIST/raw/ with "
           f"{', '.join(RAW_FILES)}; e.g. `export MNIST_ROOT=../shared/data` or `data.root=/path/to/data`, "
           "or run once with internet access and data.download=true.")
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S) if download else contextlib.nullcontext():
            return MNIST(root=str(Path(root).expanduser()), train=train, download=download, transform=transform)
    except (RuntimeError, OSError) as e:
        missing = [f for f in RAW_FILES if not (raw / f).is_file()]
        if missing:
            how = "download failed" if download else "data.download=false"
            why = one_line(e, typed=False)  # torchvision's RuntimeError: its text says it all
            if isinstance(e, TimeoutError):
                why = f"a mirror sent nothing for {DOWNLOAD_TIMEOUT_S:g} s: {why}"
            raise DataError(f"MNIST not found: {raw} lacks {', '.join(missing)} ({how}: {why}). {fix}") from None
        header = _header_problem(raw)
        if header:
            raise DataError(header) from None
        raise DataError(f"MNIST files under {raw} could not be read ({one_line(e)}). They may be truncated "
                        f"or corrupt: compare their md5 with the official ones, or delete them and download "
                        f"again. {fix}") from None
    except Exception as e:  # parsing errors from torchvision's IDX reader (AssertionError, ValueError, ...)
        header = _header_problem(raw)
        if header:
            raise DataError(header) from None
        raise DataError(f"MNIST files under {raw} could not be parsed ({one_line(e)}). "
                        f"They may be truncated or corrupt: delete them and download again. {fix}") from None


# The first 4 bytes of an IDX file: 0, 0, the element type (0x08 = unsigned byte), the number of dimensions
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}
GZIP_MAGIC = b"\x1f\x8b"


def _header_problem(raw: Path) -> str | None:
    """Why torchvision's IDX reader failed, when a file's header says it: the first file under `raw` whose magic
    number is not MNIST's, explained; None when every header looks right."""
    for name in RAW_FILES:
        path = raw / name
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            continue
        expected = IDX_MAGIC["images" if "images" in name else "labels"]
        if len(head) == 4 and int.from_bytes(head, "big") == expected:
            continue
        found = f"0x{int.from_bytes(head, 'big'):08x}" if len(head) == 4 else f"only {len(head)} byte(s)"
        dims = expected & 0xFF
        hint = " It looks gzip-compressed: gunzip it." if head.startswith(GZIP_MAGIC) else ""
        return (f"MNIST file {path} has magic number {found}, expected 0x{expected:08x} (an IDX file of unsigned "
                f"bytes with {dims} dimension{'s' if dims > 1 else ''}): it is not an MNIST {name.split('-')[1]} "
                f"file.{hint} Delete it and download again, or replace it with the official file.")
    return None


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision's downloads open URLs without a timeout: a mirror that accepts and never answers would hang
    the run forever. The process-wide default timeout bounds each connect and read; restored afterwards."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def split_indices(n: int, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random split of range(n) into (train, val) index sets."""
    if not 0 < val_size < n:
        raise ConfigError(f"data.val_size={val_size} leaves no training data: the training set has {n} images "
                          f"(allowed: 1..{n - 1})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def normalize(images: Tensor, mean: float, std: float, device: torch.device) -> Tensor:
    """uint8 (N, 28, 28) -> normalized float32 (N, 1, 28, 28) on `device`, the same values ToTensor+Normalize give."""
    x = images.to(device=device, non_blocking=True).unsqueeze(1).float().div_(255.0)
    return x.sub_(mean).div_(std)


class TensorBatches:
    """Batches sliced from tensors that already sit on the device; a seeded reshuffle per epoch.

    Every index appears exactly once per epoch. The last batch is smaller when the size does not divide.
    """

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                 max_shift: int = 0, max_rotation: float = 0.0, max_zoom: float = 0.0,
                 elastic_alpha: float = 0.0, elastic_sigma: float = 4.0) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.max_shift, self.max_rotation, self.max_zoom = max_shift, max_rotation, max_zoom
        self.elastic_alpha, self.elastic_sigma = elastic_alpha, elastic_sigma
        # The order and the augmentation are drawn where the images are: a CPU generator on a GPU would send each
        # epoch's permutation and each batch's random angles to the device (a host copy and a sync each).
        self.generator = torch.Generator(device=images.device).manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def epoch_order(self) -> Tensor:
        n, device = len(self.labels), self.images.device
        return torch.randperm(n, generator=self.generator, device=device) if self.shuffle else torch.arange(
            n, device=device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.epoch_order()
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x = self.images[idx]
            if self.max_shift or self.max_rotation or self.max_zoom or self.elastic_alpha:
                x = augment(x, self.max_shift, self.max_rotation, self.generator, self.max_zoom,
                            self.elastic_alpha, self.elastic_sigma)
            yield x, self.labels[idx]


class Reshuffle(torch.utils.data.Sampler):
    """The classic loader's order: a seeded permutation per epoch, drawn as TensorBatches draws its own, so both
    loaders visit the same images in the same order (the fast-vs-classic equivalence test relies on it)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def augment(x: Tensor, max_shift: int, max_rotation: float, generator: torch.Generator,
            max_zoom: float = 0.0, elastic_alpha: float = 0.0, elastic_sigma: float = 4.0) -> Tensor:
    """Random rotation, translation, (with max_zoom) scale and (with elastic_alpha) elastic distortion of a
    normalized batch, all in one resampling of the batch. An option that is off draws no random numbers, so the
    random stream, and the runs, stay those of before the option."""
    n, device = x.shape[0], x.device  # `generator` lives on x's device: no host copy per batch
    angle = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(max_rotation)
    # affine_grid works in [-1, 1] coordinates: one pixel is 2/28
    shift = (torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator, device=device).float()
             * 2 / x.shape[-1])
    cos, sin = angle.cos(), angle.sin()
    if max_zoom:  # the grid samples the input at output / scale: dividing the rotation by the scale zooms by it
        scale = 1 + (torch.rand(n, generator=generator, device=device) * 2 - 1) * max_zoom
        cos, sin = cos / scale, sin / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    if elastic_alpha:
        grid = grid + elastic_displacement(n, x.shape[-1], elastic_alpha, elastic_sigma, generator).to(x.dtype)
    background = x.amin()  # the normalized value of a black pixel
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background


def elastic_displacement(n: int, size: int, alpha: float, sigma: float, generator: torch.Generator) -> Tensor:
    """Simard et al. (2003)'s elastic distortion: per pixel and axis a uniform displacement in [-1, 1], smoothed by
    a Gaussian of `sigma` pixels and scaled by `alpha` pixels; one field per image, (n, size, size, 2) in
    affine_grid's units (2 / size per pixel). torchvision's ElasticTransform draws the same field one image at a
    time, with its alpha in half-pixels."""
    device = generator.device
    noise = torch.rand(n * 2, size, size, generator=generator, device=device) * 2 - 1
    blur = gaussian_blur_matrix(size, sigma, device)
    field = blur @ noise @ blur.T  # the separable blur as two matmuls: ~10x faster on a CPU than two conv2d
    return (field * alpha * 2 / size).view(n, 2, size, size).permute(0, 2, 3, 1)


@functools.lru_cache(maxsize=8)  # one per (size, sigma, device): not rebuilt for every training batch
def gaussian_blur_matrix(size: int, sigma: float, device: torch.device) -> Tensor:
    """The (size, size) matrix that blurs a vector as torchvision's gaussian_blur does: a normalized Gaussian of
    8 sigma + 1 taps, reflect padding."""
    radius = int(4 * sigma)
    taps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    basis = F.pad(torch.eye(size, device=device).unsqueeze(1), (radius, radius), mode="reflect")
    return F.conv1d(basis, kernel.view(1, 1, -1)).squeeze(1).T  # column j: the blur of the j-th unit vector


def shift(x: Tensor, down: int, right: int, background: float) -> Tensor:
    """A batch (N, C, H, W) moved by whole pixels (negative: up, left); the uncovered rows and columns get
    `background`. Padding, not torch.roll: a roll would wrap the far edge's pixels round, ink included where a
    digit touches it. Keeps x's memory format (channels_last)."""
    h, w = x.shape[-2:]
    out = torch.full_like(x, background)
    out[..., max(down, 0):h + min(down, 0), max(right, 0):w + min(right, 0)] = (
        x[..., max(-down, 0):h - max(down, 0), max(-right, 0):w - max(right, 0)])
    return out


@dataclass
class Splits:
    """What training needs: batches for train, val and test."""

    train: object  # TensorBatches or a DataLoader
    val: object
    test: object
    num_train: int
    num_val: int
    num_test: int


def build_splits(cfg: DataConfig, device: torch.device, seed: int) -> Splits:
    """Load (or reuse) MNIST and build the three batch iterables for `cfg.loader`."""
    arrays = load_mnist(cfg.root, cfg.download)
    train_idx, val_idx = split_indices(len(arrays.train_labels), cfg.val_size, cfg.split_seed)
    if cfg.train_on_val:
        train_idx = torch.arange(len(arrays.train_labels))
    if cfg.loader == "memory":
        return _memory_splits(cfg, arrays, train_idx, val_idx, device, seed)
    return _classic_splits(cfg, train_idx, val_idx, device, seed)


def _memory_splits(cfg: DataConfig, arrays: MnistArrays, train_idx: Tensor, val_idx: Tensor,
                   device: torch.device, seed: int) -> Splits:
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = _device_tensors(cfg, arrays, train_idx, val_idx, device)
    return Splits(
        train=TensorBatches(train_x, train_y, cfg.batch_size, shuffle=True, seed=seed,
                            max_shift=cfg.max_shift, max_rotation=cfg.max_rotation, max_zoom=cfg.max_zoom,
                            elastic_alpha=cfg.elastic_alpha, elastic_sigma=cfg.elastic_sigma),
        val=TensorBatches(val_x, val_y, cfg.eval_batch_size, shuffle=False),
        test=TensorBatches(test_x, test_y, cfg.eval_batch_size, shuffle=False),
        num_train=len(train_y), num_val=len(val_y), num_test=len(test_y),
    )


# The last normalized split on its device, so that trials of a sweep in one process skip the ~0.3 s of
# normalizing and gathering 70k images. One entry: a sweep over the split or normalization must not pile up copies.
_TENSOR_CACHE: dict[tuple, tuple] = {}


def _device_tensors(cfg: DataConfig, arrays: MnistArrays, train_idx: Tensor, val_idx: Tensor,
                    device: torch.device) -> tuple:
    key = (id(arrays), cfg.val_size, cfg.split_seed, cfg.train_on_val, cfg.mean, cfg.std, str(device))
    if key not in _TENSOR_CACHE:
        _TENSOR_CACHE.clear()
        images = normalize(arrays.train_images, cfg.mean, cfg.std, device)
        labels = arrays.train_labels.to(device)
        train_idx, val_idx = train_idx.to(device), val_idx.to(device)
        _TENSOR_CACHE[key] = ((images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx]),
                              (normalize(arrays.test_images, cfg.mean, cfg.std, device), arrays.test_labels.to(device)))
    return _TENSOR_CACHE[key]


def _classic_splits(cfg: DataConfig, train_idx: Tensor, val_idx: Tensor, device: torch.device,
                    seed: int) -> Splits:
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize((cfg.mean,), (cfg.std,))])
    augmented = plain
    if cfg.max_shift or cfg.max_rotation or cfg.max_zoom or cfg.elastic_alpha:
        zoom = (1 - cfg.max_zoom, 1 + cfg.max_zoom) if cfg.max_zoom else None
        # torchvision's ElasticTransform counts alpha in half-pixels (its field is in [-1, 1] grid units / size)
        elastic = [transforms.ElasticTransform(alpha=2 * cfg.elastic_alpha, sigma=cfg.elastic_sigma)
                   ] if cfg.elastic_alpha else []
        augmented = transforms.Compose([
            transforms.RandomAffine(degrees=cfg.max_rotation, translate=(cfg.max_shift / 28, cfg.max_shift / 28),
                                    scale=zoom),
            *elastic, plain])
    train_set = _torchvision_mnist(cfg.root, train=True, download=cfg.download, transform=augmented)
    val_set = _torchvision_mnist(cfg.root, train=True, download=cfg.download, transform=plain)
    test_set = _torchvision_mnist(cfg.root, train=False, download=cfg.download, transform=plain)
    # The generator only seeds worker processes. Without one, every pass over a loader (val and test too) would
    # draw from the global RNG, which also drives dropout, and the two loaders would train differently.
    common = dict(num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                  generator=torch.Generator().manual_seed(seed))
    return Splits(
        train=DataLoader(Subset(train_set, train_idx.tolist()), batch_size=cfg.batch_size,
                         sampler=Reshuffle(len(train_idx), seed), **common),
        val=DataLoader(Subset(val_set, val_idx.tolist()), batch_size=cfg.eval_batch_size, **common),
        test=DataLoader(test_set, batch_size=cfg.eval_batch_size, **common),
        num_train=len(train_idx), num_val=len(val_idx), num_test=len(test_set),
    )


def default_root() -> str:
    """Where MNIST is looked for when data.root is not given: $MNIST_ROOT, else ./data."""
    return os.environ.get("MNIST_ROOT") or "data"


def digest(arrays: MnistArrays) -> str:
    """A content hash of the images and labels, 16 hex digits: tells which MNIST files a run was given."""
    import hashlib

    h = hashlib.sha256()
    for tensor in (arrays.train_images, arrays.train_labels, arrays.test_images, arrays.test_labels):
        h.update(repr((tuple(tensor.shape), str(tensor.dtype))).encode())
        h.update(tensor.contiguous().numpy().data)
    return h.hexdigest()[:16]
