"""Turn a run's settings into a model, an optimizer and a training loop, and return its metrics.

The loop is the classic one (pytorch/examples mnist): train an epoch, evaluate, step the scheduler. What is new:
a validation split drives model selection, the test set is evaluated once at the end, bf16 autocast and
channels_last are switches, and every epoch's metrics go to a callback instead of being printed here.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .data import DataConfig, Splits, build_splits, shift
from .errors import ConfigError, DivergedError
from .metrics import check_metric_names
from .model import IMAGE_SIZE, NUM_CLASSES, ModelConfig, build_model, count_parameters

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16")
# torch.compile's modes; reduce-overhead replays the compiled forward and backward as CUDA graphs
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SCHEDULER_INTERVALS = ("epoch", "step")
MAX_TTA_SHIFT = 4  # pixels: about the empty border around MNIST's 20x20 digit box; more pushes ink off

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler]


@dataclass(frozen=True)
class TrainerConfig:
    epochs: int = 1  # passes over the training split
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    seed: int = 1  # weights, dropout and batch order
    deterministic: bool = False  # torch.use_deterministic_algorithms; slower on GPU
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False  # NHWC memory format for the convs
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (one per core)
    compile: bool = False  # torch.compile the model (pays off only for long runs)
    compile_mode: str = "default"  # torch.compile's mode, when compile is true (COMPILE_MODES)
    label_smoothing: float = 0.0  # cross-entropy label smoothing of the training loss only; 0 = off
    ema_decay: float = 0.0  # weights evaluated, tested and logged are an EMA with this decay per step; 0 = off
    tta_shifts: int = 0  # validation/test average the image and its 4 shifts by this many pixels; 0 = off

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"trainer.epochs={self.epochs} must be >= 1")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r} is not a precision; allowed: "
                              f"{', '.join(PRECISIONS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"trainer.compile_mode={self.compile_mode!r} is not a torch.compile mode; allowed: "
                              f"{', '.join(COMPILE_MODES)}")
        if self.threads < 0:
            raise ConfigError(f"trainer.threads={self.threads} must be >= 0 (0 = torch's default)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"trainer.label_smoothing={self.label_smoothing} must be in [0, 1) (0 = off)")
        if not (self.ema_decay == 0 or 0 < self.ema_decay < 1):
            raise ConfigError(f"trainer.ema_decay={self.ema_decay} must be 0 (off) or in (0, 1), e.g. 0.999")
        if not 0 <= self.tta_shifts <= MAX_TTA_SHIFT:
            raise ConfigError(f"trainer.tta_shifts={self.tta_shifts} must be in 0..{MAX_TTA_SHIFT} (pixels; 0 = off)")
        name, colon, index = self.device.partition(":")
        if name not in DEVICES or (colon and not (name == "cuda" and index.isdigit())):
            raise ConfigError(f"trainer.device={self.device!r} is not a device; allowed: auto, cpu, cuda, "
                              "cuda:N (N = 0, 1, ...), mps")


@dataclass(frozen=True)
class RunSpec:
    """Everything one training run needs, already validated; no Hydra types."""

    model: ModelConfig
    data: DataConfig
    trainer: TrainerConfig
    make_optimizer: OptimizerFactory
    make_scheduler: SchedulerFactory | None = None  # called with (optimizer, steps_per_epoch)
    scheduler_interval: str = "epoch"  # epoch | step: when the scheduler steps
    optimized_metric: tuple[str, ...] = ("val/acc",)

    def __post_init__(self) -> None:
        check_metric_names(self.optimized_metric)
        if self.scheduler_interval not in SCHEDULER_INTERVALS:
            raise ConfigError(f"scheduler.interval={self.scheduler_interval!r} is not allowed; allowed: "
                              f"{', '.join(SCHEDULER_INTERVALS)}")


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name!r} but CUDA is not available here; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device={name!r} but MPS is not available here; use auto or cpu")
    return device


def check_precision(precision: str, device: torch.device) -> str | None:
    """Fail where bf16 cannot run; return a warning where it runs but slowly (emulated on this CPU)."""
    if precision != "bf16":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support; "
                          "use fp32")
    if device.type == "mps":
        raise ConfigError("trainer.precision=bf16 is not supported on mps here; use fp32")
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return ("trainer.precision=bf16: this CPU has no native bf16 (AVX512-BF16/AMX); autocast runs emulated "
                "and is usually slower than fp32")
    return None


@dataclass
class Prepared:
    """A run, built and checked, ready to train: nothing has been trained or logged yet."""

    spec: RunSpec
    device: torch.device
    splits: Splits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    num_params: int
    warnings: list[str] = field(default_factory=list)
    # trainer.ema_decay: the moving average of the weights, updated after every optimizer step; never compiled
    ema: AveragedModel | None = None

    @property
    def eval_model(self) -> nn.Module:
        """What is validated, tested and logged: the EMA's weights when trainer.ema_decay is set, else the model."""
        return self.ema.module if self.ema is not None else self.model


def prepare(spec: RunSpec) -> Prepared:
    """Everything that can fail on bad input or missing data, done before any training or tracking starts."""
    device = resolve_device(spec.trainer.device)
    warnings = [w for w in [check_precision(spec.trainer.precision, device)] if w]
    if spec.data.train_on_val:
        warnings.append("data.train_on_val=true: the validation images are trained on too, so val/* score images "
                        "the model has seen; test/* still score unseen ones")
    if spec.trainer.threads:
        torch.set_num_threads(spec.trainer.threads)
    if torch.are_deterministic_algorithms_enabled() != spec.trainer.deterministic:  # the call costs seconds
        torch.use_deterministic_algorithms(spec.trainer.deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not spec.trainer.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    splits = build_splits(spec.data, device, seed=spec.trainer.seed)
    torch.manual_seed(spec.trainer.seed)
    model = build_model(spec.model).to(device)
    num_params = count_parameters(model)
    if spec.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        optimizer = spec.make_optimizer(model.parameters())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer: {e}") from None
    scheduler = None
    if spec.make_scheduler is not None:
        steps = len(splits.train)
        try:
            scheduler = spec.make_scheduler(optimizer, steps)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"scheduler: {e}") from None
        except ZeroDivisionError:  # OneCycleLR over fewer steps than its phases need
            raise ConfigError(f"scheduler: {steps} batch(es) per epoch x trainer.epochs={spec.trainer.epochs} are "
                              f"too few steps for this schedule ({splits.num_train} training images, "
                              f"data.batch_size={spec.data.batch_size}); train more epochs or use a smaller "
                              "data.batch_size") from None
    ema = None
    if spec.trainer.ema_decay:
        # A copy of the uncompiled model (channels_last kept). use_buffers: BatchNorm's running statistics are
        # averaged too, so the averaged weights are evaluated with statistics that match them.
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(spec.trainer.ema_decay), use_buffers=True)
    if spec.trainer.compile:
        model = torch.compile(model, mode=spec.trainer.compile_mode)
    return Prepared(spec, device, splits, model, optimizer, scheduler, num_params, warnings, ema)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(x: Tensor, y: Tensor, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


NAN_CHECK_EVERY = 50  # steps between finiteness checks of the running loss (a check syncs the GPU)


def train_epoch(p: Prepared, progress: Callable[[Iterable], Iterable] = iter) -> dict[str, float]:
    """One pass over the training split. Returns train/loss, epoch_seconds, train/images_per_s."""
    model, opt, sched, device, tcfg = p.model, p.optimizer, p.scheduler, p.device, p.spec.trainer
    step_per_batch = sched is not None and p.spec.scheduler_interval == "step"
    model.train()
    loss_sum = torch.zeros((), device=device)
    seen = 0
    _sync(device)
    start = time.perf_counter()
    for step, (x, y) in enumerate(progress(p.splits.train)):
        x, y = _to_device(x, y, device, tcfg.channels_last)
        with autocast(tcfg.precision, device):
            loss = F.cross_entropy(model(x), y, label_smoothing=tcfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if p.ema is not None:
            p.ema.update_parameters(model)  # a compiled model's parameters are its original module's
        if step_per_batch:
            sched.step()
        loss_sum += loss.detach().float() * len(y)
        seen += len(y)
        if step % NAN_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
            raise DivergedError(_diverged_message(p, step))
    _sync(device)
    seconds = time.perf_counter() - start
    mean_loss = (loss_sum / seen).item()
    if not math.isfinite(mean_loss):
        raise DivergedError(_diverged_message(p, len(p.splits.train) - 1))
    return {"train/loss": mean_loss, "epoch_seconds": seconds, "train/images_per_s": seen / seconds}


def warm_up(p: Prepared, steps: int = 3) -> float:
    """Run `steps` training steps on every batch shape an epoch has, and one evaluation batch of each shape, on
    random inputs; then put back the weights, BatchNorm statistics, optimizer state and random generators, so the
    run trains exactly as it would have without it. Returns the seconds it took.

    What it pays for up front: torch.compile's compilation and CUDA graph capture, cuDNN's algorithm search
    (cudnn.benchmark) and the lazy creation of CUDA handles. A benchmark reports these seconds beside the training
    time, never inside it. The batch order and augmentation generators are not touched (random inputs, no batches
    drawn)."""
    model, opt, device, tcfg = p.model, p.optimizer, p.device, p.spec.trainer
    start = time.perf_counter()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    train_sizes = batch_sizes(p.splits.num_train, p.spec.data.batch_size)
    eval_sizes = batch_sizes(p.splits.num_val, p.spec.data.eval_batch_size) | batch_sizes(
        p.splits.num_test, p.spec.data.eval_batch_size)
    model.train()
    for n in sorted(train_sizes, reverse=True):
        for _ in range(steps):
            x, y = _random_batch(n, device, tcfg.channels_last)
            with autocast(tcfg.precision, device):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    p.eval_model.eval()  # eval mode: the EMA's BatchNorm statistics are only read
    with torch.no_grad(), autocast(tcfg.precision, device):
        for n in sorted(eval_sizes, reverse=True):
            for _ in range(steps):
                p.eval_model(_random_batch(n, device, tcfg.channels_last)[0])
    model.train()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.load_state_dict(weights)  # copies in place: a CUDA graph's static weights stay where they are
    opt.load_state_dict(opt_state)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    _sync(device)
    return time.perf_counter() - start


def batch_sizes(n: int, batch_size: int) -> set[int]:
    """The sizes of the batches that slicing n items into batch_size ones gives: the full one and the remainder."""
    return {min(n, batch_size)} | ({n % batch_size} if n > batch_size and n % batch_size else set())


def _random_batch(n: int, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, NUM_CLASSES, (n,), device=device)


def _diverged_message(p: Prepared, step: int) -> str:
    lr = p.optimizer.param_groups[0]["lr"]
    return (f"training diverged: the loss became NaN/inf by step {step} (lr={lr:g}). Lower optimizer.lr, "
            "or pick another optimizer or scheduler")


@torch.no_grad()
def evaluate(p: Prepared, batches: Iterable) -> tuple[dict[str, float], Tensor, Tensor]:
    """Mean loss and accuracy of p.eval_model over `batches`, plus the predictions and labels (CPU) for a confusion
    matrix. With trainer.tta_shifts, each image is scored as the mean of its and its 4 shifts' class probabilities,
    and the loss is the negative log of that mean at the true class."""
    model, tcfg = p.eval_model, p.spec.trainer
    model.eval()
    loss_sum = torch.zeros((), device=p.device)
    preds, labels = [], []
    for x, y in batches:
        x, y = _to_device(x, y, p.device, tcfg.channels_last)
        if tcfg.tta_shifts:
            log_probs = tta_log_probs(model, x, tcfg.tta_shifts, p.spec.data.background, tcfg.precision, p.device)
            loss_sum += F.nll_loss(log_probs, y, reduction="sum")
            preds.append(log_probs.argmax(1))
        else:
            with autocast(tcfg.precision, p.device):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
            preds.append(logits.argmax(1))
        labels.append(y)
    pred, label = torch.cat(preds).cpu(), torch.cat(labels).cpu()
    n = len(label)
    return {"loss": (loss_sum / n).item(), "acc": (pred == label).float().mean().item()}, pred, label


def tta_offsets(pixels: int) -> list[tuple[int, int]]:
    """(down, right) moves of test-time augmentation: none, then up, down, left and right. No flips: a flipped
    digit is another digit or none."""
    return [(0, 0), (-pixels, 0), (pixels, 0), (0, -pixels), (0, pixels)]


def tta_log_probs(model: nn.Module, x: Tensor, pixels: int, background: float, precision: str,
                  device: torch.device) -> Tensor:
    """log of the mean of the class probabilities of x and of x shifted by `pixels` each way (float32, (N, 10)).

    One forward per view at the batch's own size, so the shapes are those warm_up compiled and captured."""
    views = []
    for dy, dx in tta_offsets(pixels):
        with autocast(precision, device):
            logits = model(shift(x, dy, dx, background) if dy or dx else x)
        views.append(F.log_softmax(logits.float(), dim=1))
    return torch.logsumexp(torch.stack(views), dim=0) - math.log(len(views))


def class_probs(model: nn.Module, x: Tensor, tta_shifts: int, background: float, batch: int = 1000) -> Tensor:
    """Class probabilities (N, 10) of normalized images (N, 1, 28, 28) on the CPU in fp32, scored as evaluate
    scores them: with tta_shifts, the mean over the image and its 4 shifts, as the run validated and tested. The
    model comes in eval mode (a registered torch.export model cannot be switched)."""
    cpu = torch.device("cpu")
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            out.append(tta_log_probs(model, chunk, tta_shifts, background, "fp32", cpu).exp() if tta_shifts
                       else model(chunk).softmax(1))
    return torch.cat(out)


EpochCallback = Callable[[int, dict[str, float]], bool | None]  # True: stop after this epoch


def fit(p: Prepared, on_epoch_end: EpochCallback | None = None,
        progress: Callable[[Iterable, int], Iterable] | None = None) -> list[dict[str, float]]:
    """Train for trainer.epochs; after each epoch call on_epoch_end(epoch, metrics). Returns the history.

    Each epoch's metrics: train_epoch's, val/loss, val/acc, lr, and val_seconds (the validation pass): with
    epoch_seconds, the time an epoch spent on the model, which the sweep benchmark sets against wall time.

    A callback that returns True stops training there (a target reached); the history ends at that epoch. Only
    True counts, so a callback that happens to return something else cannot end a run early. The callback may also
    raise (a pruner stopping a trial, Ctrl-C); the history so far was already handed to it.
    """
    history = []
    for epoch in range(1, p.spec.trainer.epochs + 1):
        wrap = (lambda it: progress(it, epoch)) if progress else iter
        metrics = train_epoch(p, wrap)
        start = time.perf_counter()
        val, _, _ = evaluate(p, p.splits.val)  # .item() inside has synced the device
        metrics.update({"val/loss": val["loss"], "val/acc": val["acc"], "lr": p.optimizer.param_groups[0]["lr"],
                        "val_seconds": time.perf_counter() - start})
        if p.scheduler is not None and p.spec.scheduler_interval == "epoch":
            p.scheduler.step()
        history.append(metrics)
        if on_epoch_end and on_epoch_end(epoch, metrics) is True:
            break
    return history


def objective_values(history: list[dict[str, float]], num_params: int, names: Iterable[str]) -> list[float]:
    """The optimized metric(s) of a finished run: last epoch's value; epoch time and throughput averaged."""
    values = []
    for name in names:
        if name == "model/params":
            values.append(float(num_params))
        elif name in ("epoch_seconds", "train/images_per_s"):
            values.append(sum(h[name] for h in history) / len(history))
        else:
            values.append(history[-1][name])
    return values


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int = 10) -> Tensor:
    """counts[true, predicted]"""
    return torch.bincount(label * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)
