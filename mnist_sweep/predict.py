"""`python -m mnist_sweep.predict IMAGE...`: classify photos or drawings of digits with a logged model.

The model is the latest version of the registered model (`--model`, what a sweep registers), else the best trial
of the latest study in `--storage`, or any run with `--run-id`. Images of any size and either polarity are turned
into MNIST's format the way MNIST itself was made: grayscale, white digit on black, the digit's bounding box
scaled into 20x20 keeping its aspect, then centred by its centre of mass in a 28x28 field.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import artifacts, registry, shell, tracking
from .errors import UserError, one_line
from .data import background
from .model import IMAGE_SIZE
from .train import class_probs

DIGIT_BOX = 20  # MNIST scales each digit's bounding box into 20x20 before centring it in 28x28
INK = 0.2  # after contrast stretching, fainter pixels count as background (paper texture, sensor noise)
# Reading: a digit needs far fewer pixels than a photo has. Images are shrunk to WORK_SIDE a side on load, and
# those larger than MAX_PIXELS as decoded are refused before decoding (a 12000x12000 PNG took 13 s and 2.4 GB).
WORK_SIDE = 1024  # pixels: the longer side an image is shrunk to before finding the digit
MAX_PIXELS = 40_000_000  # decoded pixels (a JPEG is decoded at down to 1/8 scale): about 160 MB as RGBA


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """A grayscale image (H, W), uint8 or floats in [0, 1], of one digit in either polarity -> float32 (28, 28)
    in [0, 1]: a bright digit on black, scaled into 20x20 keeping aspect, centre of mass in the middle."""
    from PIL import Image

    g = gray.astype(np.float32) / (255.0 if gray.dtype == np.uint8 else 1.0)
    border = np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])
    if np.median(border) > 0.5:  # a dark digit on bright paper
        g, border = 1.0 - g, 1.0 - border
    background = float(np.median(border))
    if g.max() - background < 0.1:
        raise UserError("no digit found: the image has no stroke that stands out from its background")
    g = np.clip((g - background) / (g.max() - background), 0.0, 1.0)
    g[g < INK] = 0.0
    rows, cols = np.nonzero(g)
    crop = g[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = crop.shape
    scale = DIGIT_BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    digit = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS), dtype=np.float32).clip(0, 1)
    ys, xs = np.indices(digit.shape)
    mass = digit.sum()
    cy, cx = (ys * digit).sum() / mass, (xs * digit).sum() / mass
    center = (IMAGE_SIZE - 1) / 2
    top = int(np.clip(round(center - cy), 0, IMAGE_SIZE - digit.shape[0]))
    left = int(np.clip(round(center - cx), 0, IMAGE_SIZE - digit.shape[1]))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    out[top:top + digit.shape[0], left:left + digit.shape[1]] = digit
    return out


def read_gray(path: Path) -> np.ndarray:
    """An image file as uint8 grayscale (H, W), shrunk to at most WORK_SIDE a side; transparency is laid over
    white, photos are turned upright. Refused when it would decode to more than MAX_PIXELS."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS, below, is the limit
            img = Image.open(path)
        with img:
            width, height = img.size
            img.draft("L", (WORK_SIDE, WORK_SIDE))  # JPEG only: decode at 1/2 .. 1/8 scale, still >= WORK_SIDE
            if img.width * img.height > MAX_PIXELS:
                raise UserError(_too_large(path, f"{width}x{height} pixels"))
            img.thumbnail((WORK_SIDE, WORK_SIDE), Image.Resampling.BOX)
            img = ImageOps.exif_transpose(img)
            if "A" in img.getbands() or "transparency" in img.info:
                img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
            return np.asarray(img.convert("L"))
    except Image.DecompressionBombError:  # so large that Pillow refuses to open it at all
        raise UserError(_too_large(path, f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels")) from None
    except UnidentifiedImageError:
        raise UserError(f"{path}: not an image (expected PNG or JPEG)") from None
    except OSError as e:
        raise UserError(f"{path}: the image could not be read ({e})") from None


def _too_large(path: Path, size: str) -> str:
    return (f"{path}: the image is too large to read ({size}); allowed: at most {MAX_PIXELS:,} pixels, "
            "e.g. 8000x5000 (a JPEG may be larger: it is decoded at down to 1/8 scale). Scale it down first")


def load_digit(path: Path) -> np.ndarray:
    gray = read_gray(path)
    try:
        return to_mnist(gray)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def classify(model: torch.nn.Module, digits: Sequence[np.ndarray], mean: float, std: float,
             tta_shifts: int = 0) -> torch.Tensor:
    """Class probabilities (N, 10) of 28x28 digits in [0, 1], normalized and (with tta_shifts) shifted as the model
    was validated."""
    x = (torch.from_numpy(np.stack(digits)).unsqueeze(1) - mean) / std
    return class_probs(model, x, tta_shifts, background(mean, std))


@dataclass(frozen=True)
class LoadedModel:
    net: torch.nn.Module
    mean: float  # the input normalization the net was trained with
    std: float
    tta_shifts: int  # test-time shifts in pixels the run was validated with (0: none), applied here the same way
    source: str  # what was loaded, as shown to the user: models:/<name>/<version>, or the run it came from


def load_model(client, run_id: str | None, model_name: str | None, storage: str) -> LoadedModel:
    """The model --run-id names (its run's weights), else the registered model's latest version (the logged MLflow
    model that models:/<name>/<version> names), else the weights of the latest study's best trial."""
    if run_id:
        return _run_model(client, run_id, f"run {run_id}")
    version = registry.latest_model_version(client, model_name) if model_name else None
    if version is not None:
        return LoadedModel(*registry.load_registered_model(client, model_name, version.version),
                           source=f"models:/{model_name}/{version.version}")
    from .records import open_existing_study
    from .report import best_trial
    from hydra_plugins.hydra_optuna_pruning_sweeper import RUN_ID_ATTR

    try:
        study = open_existing_study(storage, None)
    except UserError as e:
        raise UserError(f"no registered model {model_name!r} in the MLflow registry and no study to take the best "
                        f"trial from ({e}); pass --run-id") from None
    best = best_trial(study)
    if best is None or not best.user_attrs.get(RUN_ID_ATTR):
        raise UserError(f"study {study.study_name!r} has no completed trial with an MLflow run; pass --run-id")
    return _run_model(client, best.user_attrs[RUN_ID_ATTR],
                      f"best trial #{best.number} of study {study.study_name}")


def _run_model(client, run_id: str, source: str) -> LoadedModel:
    from mlflow.exceptions import MlflowException

    try:
        return LoadedModel(artifacts.load_model(client, run_id), *tracking.input_settings(client, run_id), source)
    except (MlflowException, OSError, KeyError) as e:
        raise UserError(f"MLflow run {run_id!r} has no loadable model ({one_line(e)})") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mnist_sweep.predict", description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", type=Path, help="PNG or JPEG files, one digit each")
    parser.add_argument("--run-id", default=None, help="MLflow run whose model to use")
    parser.add_argument("--model", default="mnist_sweep_best", help="registered model name (mlflow.registered_model)")
    parser.add_argument("--tracking-uri", default=shell.DEFAULT_TRACKING_URI, help="MLflow tracking URI")
    parser.add_argument("--storage", default=shell.DEFAULT_STORAGE,
                        help="Optuna storage, for the best trial when no model is registered")
    return parser.parse_args(argv)


@shell.command(stopped="nothing was predicted")
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tracking.quiet_artifact_progress()
    from rich.console import Console
    from rich.table import Table

    digits = [load_digit(p) for p in args.images]
    loaded = load_model(tracking.existing_client(args.tracking_uri), args.run_id, args.model, args.storage)
    probs = classify(loaded.net, digits, loaded.mean, loaded.std, loaded.tta_shifts)
    table = Table(title=f"model: {loaded.source}", title_justify="left")
    for name in ["image", "digit", *map(str, range(10))]:
        table.add_column(name, justify="left" if name == "image" else "right")
    for path, p in zip(args.images, probs):
        table.add_row(str(path), f"[bold]{p.argmax().item()}[/bold]", *[f"{v:.3f}" for v in p.tolist()])
    (Console() if sys.stdout.isatty() else Console(width=200)).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
