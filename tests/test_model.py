import pytest
import torch

from mnist_sweep.errors import ConfigError
from mnist_sweep.model import ModelConfig, build_model, count_parameters, pooled_size, training_flops_per_image


def test_default_is_the_classic_net():
    model = build_model(ModelConfig())
    assert count_parameters(model) == 1_199_882
    assert model.fc1.in_features == 9216  # computed, matches the hand-written classic value


def test_classic_training_flops_match_the_known_estimate():
    # ~4.3 TFLOP per training epoch over 60k images (forward + backward)
    assert abs(training_flops_per_image(ModelConfig()) * 60_000 / 1e12 - 4.32) < 0.01


@pytest.mark.parametrize("cfg", [
    ModelConfig(), ModelConfig(conv1_channels=1, conv2_channels=1, fc_width=1), ModelConfig(kernel_size=5),
    ModelConfig(batch_norm=True), ModelConfig(kernel_size=14), ModelConfig(pool_each_conv=True),
    ModelConfig(pool_each_conv=True, kernel_size=9, batch_norm=True)])
def test_any_shape_maps_images_to_ten_logits(cfg):
    model = build_model(cfg).eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_pooled_size():
    assert pooled_size(3) == 12 and pooled_size(5) == 10 and pooled_size(13) == 2 and pooled_size(14) == 1
    # 28 -conv3-> 26 -pool-> 13 -conv3-> 11 -pool-> 5; LeNet's 5x5: 28 -> 24 -> 12 -> 8 -> 4
    assert pooled_size(3, pool_each_conv=True) == 5 and pooled_size(5, pool_each_conv=True) == 4
    assert pooled_size(9, pool_each_conv=True) == 1 and pooled_size(10, pool_each_conv=True) == 0


def test_pooling_after_each_conv_cuts_the_flops_about_fourfold():
    ratio = training_flops_per_image(ModelConfig()) / training_flops_per_image(ModelConfig(pool_each_conv=True))
    assert 3.5 < ratio < 6


@pytest.mark.parametrize("kwargs, key", [
    ({"conv1_channels": 0}, "model.conv1_channels=0"), ({"fc_width": -3}, "model.fc_width=-3"),
    ({"dropout": 1.0}, "model.dropout=1.0"), ({"conv_dropout": -0.1}, "model.conv_dropout=-0.1"),
    ({"kernel_size": 15}, "model.kernel_size=15"),
    ({"kernel_size": 10, "pool_each_conv": True}, r"model.kernel_size=10 must be in \[1, 9\]")])
def test_bad_model_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig(**kwargs)
