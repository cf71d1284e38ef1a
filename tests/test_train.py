"""The training loop in-process on tiny synthetic data: metrics, objectives, divergence, bf16."""

import dataclasses
import functools
import math

import pytest
import torch

from mnist_sweep import data
from mnist_sweep.data import DataConfig
from mnist_sweep.errors import ConfigError, DivergedError
from mnist_sweep.model import ModelConfig
from mnist_sweep.train import (
    RunSpec, TrainerConfig, batch_sizes, confusion_matrix, evaluate, fit, objective_values, prepare, resolve_device,
    warm_up)

SMALL = ModelConfig(conv1_channels=8, conv2_channels=16, fc_width=32)


def spec_for(root, lr=1.0, epochs=2, **trainer):
    return RunSpec(
        model=SMALL,
        data=DataConfig(root=str(root), download=False, val_size=200, batch_size=32),
        trainer=TrainerConfig(epochs=epochs, device="cpu", **trainer),
        make_optimizer=functools.partial(torch.optim.Adadelta, lr=lr),
    )


@pytest.fixture(autouse=True)
def fresh_cache():
    data.clear_cache()


def test_fit_reports_every_metric_each_epoch_and_learns(mnist_root):
    p = prepare(spec_for(mnist_root))
    seen = []
    history = fit(p, on_epoch_end=lambda epoch, m: seen.append((epoch, m)))
    assert [e for e, _ in seen] == [1, 2]
    for m in history:
        assert set(m) == {"train/loss", "val/loss", "val/acc", "lr", "epoch_seconds", "train/images_per_s",
                          "val_seconds"}
        assert all(math.isfinite(v) for v in m.values())
    assert history[-1]["val/acc"] > 0.8  # chance is 0.1
    test, pred, label = evaluate(p, p.splits.test)
    assert test["acc"] > 0.8 and len(pred) == len(label) == 300


def test_a_callback_returning_true_stops_training_after_that_epoch(mnist_root):
    seen = []
    history = fit(prepare(spec_for(mnist_root, epochs=3)), lambda epoch, m: seen.append(epoch) or epoch == 2)
    assert seen == [1, 2] and len(history) == 2
    # only True stops: a callback that returns some other truthy value by accident trains every epoch
    assert len(fit(prepare(spec_for(mnist_root, epochs=2)), lambda epoch, m: [m])) == 2


def test_same_seed_same_result(mnist_root):
    a = fit(prepare(spec_for(mnist_root, epochs=1)))
    b = fit(prepare(spec_for(mnist_root, epochs=1)))
    assert a[0]["train/loss"] == pytest.approx(b[0]["train/loss"], rel=1e-5)


def test_memory_and_classic_loaders_give_the_same_loss_trajectory(mnist_root):
    """The fast path changes how batches are made, not what is learned: same seed, same order, same losses (fp32)."""
    def losses(loader):
        spec = spec_for(mnist_root, epochs=3, seed=7)
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, loader=loader))
        return [m[key] for m in fit(prepare(spec)) for key in ("train/loss", "val/loss")]

    memory, classic = losses("memory"), losses("classic")
    assert memory == pytest.approx(classic, rel=1e-4)
    assert memory[4] < memory[0] / 2  # train/loss of epoch 3 vs 1: it learned: not three identical untrained losses


def test_bf16_trains_to_the_same_accuracy_band(mnist_root):
    fp32 = fit(prepare(spec_for(mnist_root)))[-1]["val/acc"]
    bf16 = fit(prepare(spec_for(mnist_root, precision="bf16")))[-1]["val/acc"]
    assert bf16 > 0.8 and abs(bf16 - fp32) < 0.1


def test_huge_learning_rate_diverges_with_a_clear_error(mnist_root):
    p = prepare(spec_for(mnist_root, lr=1e12))
    with pytest.raises(DivergedError, match=r"NaN/inf .*lr=1e\+12"):
        fit(p)


def test_objective_values():
    history = [{"val/acc": 0.5, "epoch_seconds": 2.0}, {"val/acc": 0.7, "epoch_seconds": 4.0}]
    assert objective_values(history, 123, ["val/acc", "epoch_seconds", "model/params"]) == [0.7, 3.0, 123.0]


def test_confusion_matrix_counts_true_by_predicted():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), num_classes=3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, r"trainer\.epochs=0"), ({"device": "tpu"}, r"trainer\.device='tpu'"),
    ({"precision": "fp16"}, r"trainer\.precision='fp16'"), ({"threads": -1}, r"trainer\.threads=-1"),
    ({"compile_mode": "fastest"}, r"trainer\.compile_mode='fastest' is not a torch\.compile mode; allowed: default, "
                                  r"reduce-overhead, max-autotune, max-autotune-no-cudagraphs$")])
def test_bad_trainer_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainerConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")


def test_optimized_metric_must_exist(mnist_root):
    with pytest.raises(ConfigError, match="'val/f1' is not a metric"):
        RunSpec(model=SMALL, data=DataConfig(root="x"), trainer=TrainerConfig(),
                make_optimizer=torch.optim.SGD, optimized_metric=("val/f1",))


def test_bad_learning_rate_fails_before_training(mnist_root):
    with pytest.raises(ConfigError, match="optimizer: Invalid learning rate"):
        prepare(spec_for(mnist_root, lr=-1.0))


def test_warm_up_leaves_the_run_as_it_was(mnist_root):
    """warm_up trains on random batches, then restores weights, BatchNorm statistics, AdamW's moments and the
    dropout generator: the run trains to the very same weights as one that never warmed up."""
    spec = dataclasses.replace(spec_for(mnist_root, epochs=1), model=dataclasses.replace(SMALL, batch_norm=True),
                               make_optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    plain = prepare(spec)
    fit(plain)
    warmed = prepare(spec)
    assert warm_up(warmed, steps=2) > 0
    fit(warmed)
    for (name, a), b in zip(plain.model.state_dict().items(), warmed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("n, batch, sizes", [(55000, 1024, {1024, 728}), (55000, 1000, {1000}), (200, 1000, {200}),
                                             (10, 3, {3, 1})])
def test_batch_sizes_are_the_full_batch_and_the_remainder(n, batch, sizes):
    assert batch_sizes(n, batch) == sizes


def test_a_schedule_over_too_few_steps_is_a_config_error(mnist_root):
    """OneCycleLR divides by zero over a handful of steps (big batches on little data): one line says why."""
    spec = dataclasses.replace(spec_for(mnist_root, epochs=4), make_scheduler=lambda opt, steps: (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, epochs=4, steps_per_epoch=steps, pct_start=0.25,
                                            cycle_momentum=False)))
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, batch_size=4096))
    with pytest.raises(ConfigError, match=r"scheduler: 1 batch\(es\) per epoch x trainer.epochs=4 are too few steps "
                                          r".*data.batch_size=4096\); train more epochs or use a smaller"):
        prepare(spec)
