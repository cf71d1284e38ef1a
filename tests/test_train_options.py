"""The accuracy options of the trainer, in-process on tiny data: label smoothing, an EMA of the weights, and
test-time augmentation by shifts. Each is off by default and leaves the plain path as it was."""

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn as nn

from mnist_sweep import data, train
from mnist_sweep.config import compose_spec
from mnist_sweep.data import DataConfig, shift
from mnist_sweep.errors import ConfigError
from mnist_sweep.model import ModelConfig, build_model
from mnist_sweep.train import Prepared, RunSpec, TrainerConfig, evaluate, fit, prepare, train_epoch

SMALL_BN = ModelConfig(conv1_channels=8, conv2_channels=16, fc_width=32, batch_norm=True)


def spec_for(root, **trainer):
    return RunSpec(
        model=SMALL_BN,
        data=DataConfig(root=str(root), download=False, val_size=200, batch_size=64),
        trainer=TrainerConfig(**({"epochs": 1, "device": "cpu"} | trainer)),
        make_optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),
    )


@pytest.fixture(autouse=True)
def fresh_cache():
    data.clear_cache()


def test_label_smoothing_changes_the_training_loss_but_not_the_validation_loss(mnist_root, monkeypatch):
    plain, smoothed = prepare(spec_for(mnist_root)), prepare(spec_for(mnist_root, label_smoothing=0.2))
    # the same seed built the same weights: the validation loss is plain cross-entropy under both
    assert evaluate(plain, plain.splits.val)[0] == evaluate(smoothed, smoothed.splits.val)[0]
    plain_loss = train_epoch(plain)["train/loss"]
    smoothed = prepare(smoothed.spec)  # seeds the dropout generator as plain's prepare did
    calls, cross_entropy = [], torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy",
                        lambda *a, **kw: calls.append(kw.get("label_smoothing", 0.0)) or cross_entropy(*a, **kw))
    smoothed_loss = train_epoch(smoothed)["train/loss"]
    assert set(calls) == {0.2} and len(calls) == len(smoothed.splits.train)
    calls.clear()
    evaluate(smoothed, smoothed.splits.val)
    assert set(calls) == {0.0}
    assert smoothed_loss != pytest.approx(plain_loss, rel=1e-3)


def test_ema_leaves_the_raw_training_alone_and_is_what_evaluate_uses(mnist_root):
    """channels_last and BatchNorm on: the averaged copy keeps the memory format, and its running statistics are
    averaged too (use_buffers)."""
    off = prepare(spec_for(mnist_root, channels_last=True))
    train_epoch(off)  # before the next prepare, which seeds the dropout generator again
    on = prepare(spec_for(mnist_root, channels_last=True, ema_decay=0.9))
    train_epoch(on)
    assert off.eval_model is off.model and on.eval_model is not on.model
    raw, averaged = on.model.state_dict(), on.eval_model.state_dict()
    for name, value in off.model.state_dict().items():
        assert torch.equal(value, raw[name]), name  # the EMA reads the weights, never changes them
    assert raw.keys() == averaged.keys()  # what run.py logs loads into build_model's net
    assert not torch.equal(raw["conv1.weight"], averaged["conv1.weight"])
    assert not torch.equal(raw["bn1.running_mean"], averaged["bn1.running_mean"])
    assert on.eval_model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    with_ema = evaluate(on, on.splits.val)[0]
    assert with_ema != evaluate(dataclasses.replace(on, ema=None), on.splits.val)[0]  # the raw model scores apart
    copy = build_model(SMALL_BN).to(memory_format=torch.channels_last)
    copy.load_state_dict(averaged)
    assert with_ema == evaluate(dataclasses.replace(on, model=copy, ema=None), on.splits.val)[0]


def test_ema_with_a_tiny_decay_is_the_raw_model(mnist_root):
    p = prepare(spec_for(mnist_root, ema_decay=1e-9))
    train_epoch(p)
    averaged = p.eval_model.state_dict()
    for name, value in p.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[name], value, msg=name)
    ema, raw = evaluate(p, p.splits.val)[0], evaluate(dataclasses.replace(p, ema=None), p.splits.val)[0]
    assert ema["acc"] == raw["acc"] and ema["loss"] == pytest.approx(raw["loss"], rel=1e-5)


def test_ema_of_a_compiled_model_averages_the_uncompiled_weights(mnist_root):
    """With trainer.compile the EMA is a copy of the module before compiling (never compiled itself); the compiled
    model's parameters are that module's, so the update reads them. No forward pass: no compilation happens."""
    p = prepare(spec_for(mnist_root, compile=True, ema_decay=0.5))
    assert not isinstance(p.eval_model, type(p.model))
    p.ema.update_parameters(p.model)  # the first update copies
    with torch.no_grad():
        for param in p.model.parameters():
            param.add_(1.0)
    before = p.eval_model.conv1.weight.clone()
    p.ema.update_parameters(p.model)
    torch.testing.assert_close(p.eval_model.conv1.weight, before + 0.5)


def test_shift_moves_by_whole_pixels_and_fills_with_the_background():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert shift(x, 1, 0, -1.0)[0, 0].tolist() == [[-1] * 4, [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert shift(x, 0, -2, -1.0)[0, 0, 0].tolist() == [2, 3, -1, -1]
    assert torch.equal(shift(shift(x, 0, 0, 0.0), 0, 0, 0.0), x)


BACKGROUND = -0.1307 / 0.3081  # a black pixel, normalized with DataConfig's defaults


def hand_built(model: nn.Module, tta_shifts: int, channels_last: bool = False) -> Prepared:
    spec = RunSpec(model=SMALL_BN, data=DataConfig(root="x"),
                   trainer=TrainerConfig(device="cpu", tta_shifts=tta_shifts, channels_last=channels_last),
                   make_optimizer=torch.optim.SGD)
    return Prepared(spec, torch.device("cpu"), None, model, None, None, 0)


class CentreOrInk(nn.Module):
    """Class 0's logit: ink on the centre pixel; class 1's: half the ink anywhere; the others never win."""

    def forward(self, x):
        ink = x - BACKGROUND
        others = torch.full((len(x), 8), -1e4)
        return torch.cat([ink[:, 0, 14, 14, None], 0.5 * ink.sum((1, 2, 3))[:, None], others], 1)


def one_dot(label: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.full((1, 1, 28, 28), BACKGROUND)
    x[0, 0, 14, 14] = BACKGROUND + 1.0
    return x, torch.tensor([label])


@pytest.mark.parametrize("channels_last", [False, True])
def test_tta_averages_the_probabilities_of_the_image_and_its_four_shifts(channels_last):
    """Unshifted the dot is on the centre (logits 1, 0.5: class 0); shifted it is not (0, 0.5: class 1). The mean
    of the five views' probabilities picks class 1, and the loss is -log of that mean at the label."""
    plain, _, _ = evaluate(hand_built(CentreOrInk(), 0, channels_last), [one_dot(1)])
    tta, pred, _ = evaluate(hand_built(CentreOrInk(), 2, channels_last), [one_dot(1)])
    sig = 1 / (1 + math.exp(-0.5))
    assert plain["acc"] == 0.0 and plain["loss"] == pytest.approx(-math.log(1 - sig), rel=1e-5)
    assert tta["acc"] == 1.0 and pred.tolist() == [1]
    assert tta["loss"] == pytest.approx(-math.log((1 - sig + 4 * sig) / 5), rel=1e-5)


class InkTotal(nn.Module):
    """Shift-invariant while no ink leaves the image: the class is the total ink, in steps of 4."""

    def forward(self, x):
        total = (x - BACKGROUND).sum((1, 2, 3))[:, None]
        return -(total - 4 * torch.arange(10.0)[None] - 2) ** 2 / 10


def test_tta_of_a_shift_invariant_model_changes_nothing():
    g = torch.Generator().manual_seed(0)
    x = torch.full((50, 1, 28, 28), BACKGROUND)
    ink = torch.rand(50, 1, 20, 20, generator=g) * torch.rand(50, 1, 1, 1, generator=g) * 0.2
    x[:, :, 4:24, 4:24] += ink  # only inside the 4-pixel border
    y = torch.randint(0, 10, (50,), generator=g)
    plain, plain_pred, _ = evaluate(hand_built(InkTotal(), 0), [(x, y)])
    tta, tta_pred, _ = evaluate(hand_built(InkTotal(), 4), [(x, y)])
    assert len(set(plain_pred.tolist())) >= 5  # not one class for all
    assert torch.equal(plain_pred, tta_pred) and tta["acc"] == plain["acc"]
    assert tta["loss"] == pytest.approx(plain["loss"], rel=1e-4)


def test_no_tta_is_the_plain_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tta_shifts=0 must not take the averaging path")

    monkeypatch.setattr(train, "tta_log_probs", refuse)
    assert evaluate(hand_built(InkTotal(), 0), [one_dot(0)])[0]["acc"] in (0.0, 1.0)


def test_all_three_options_train_together(mnist_root):
    p = prepare(spec_for(mnist_root, label_smoothing=0.1, ema_decay=0.9, tta_shifts=1, epochs=2))
    history = fit(p)
    assert all(math.isfinite(v) for m in history for v in m.values())
    assert history[-1]["val/acc"] > 0.5  # chance is 0.1
    test, pred, label = evaluate(p, p.splits.test)
    assert 0.5 < test["acc"] <= 1.0 and len(pred) == len(label) == 300


def test_the_options_are_off_by_default_in_the_yaml_and_the_dataclass():
    trainer = compose_spec([]).trainer
    for key in ("label_smoothing", "ema_decay", "tta_shifts"):
        assert getattr(trainer, key) == getattr(TrainerConfig(), key) == 0, key
    on = compose_spec(["trainer.label_smoothing=0.1", "trainer.ema_decay=0.999", "trainer.tta_shifts=2"]).trainer
    assert (on.label_smoothing, on.ema_decay, on.tta_shifts) == (0.1, 0.999, 2)


BAD_VALUES = [
    ("trainer.label_smoothing=1.0", r"^trainer\.label_smoothing=1\.0 must be in \[0, 1\) \(0 = off\)$"),
    ("trainer.label_smoothing=-0.1", r"^trainer\.label_smoothing=-0\.1 must be in \[0, 1\)"),
    ("trainer.ema_decay=1", r"^trainer\.ema_decay=1 must be 0 \(off\) or in \(0, 1\), e\.g\. 0\.999$"),
    ("trainer.ema_decay=-0.5", r"^trainer\.ema_decay=-0\.5 must be 0 \(off\) or in \(0, 1\)"),
    ("trainer.tta_shifts=5", r"^trainer\.tta_shifts=5 must be in 0\.\.4 \(pixels; 0 = off\)$"),
    ("trainer.tta_shifts=-1", r"^trainer\.tta_shifts=-1 must be in 0\.\.4"),
    ("trainer.tta_shifts=1.5", r"^trainer\.tta_shifts=1\.5 must be an integer$"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_option_values_fail_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_spec([override])
