import pytest
import torch

from mnist_sweep.errors import ConfigError
from mnist_sweep.model import (BlockNet, ModelConfig, build_model, count_parameters, pooled_size,
                               training_flops_per_image)


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


DEEP = ModelConfig(blocks=[[32, 32], [64, 64]], batch_norm=True, conv_dropout=0.4, dropout=0.4)  # conf/model/deep


def test_blocks_build_the_deep_net_and_keep_the_image_side_in_each_block():
    model = build_model(DEEP).eval()
    assert isinstance(model, BlockNet) and DEEP.blocks == ((32, 32), (64, 64))  # lists from YAML become tuples
    assert model.fc1.in_features == 64 * 7 * 7  # 28 -pool-> 14 -pool-> 7: padded convs keep the side
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    # convs 288 + 9,216 + 18,432 + 36,864, BatchNorms 2 x (2 x 32 + 2 x 64), FC 3,136 x 128 + BatchNorm + 128 x 10 + 10
    assert count_parameters(model) == 64_800 + 384 + 401_408 + 256 + 1_290


def test_the_deep_nets_flops_count_every_conv_of_every_block():
    convs = 28 * 28 * (1 * 32 + 32 * 32) * 9 + 14 * 14 * (32 * 64 + 64 * 64) * 9
    assert training_flops_per_image(DEEP) == 6 * (convs + 64 * 7 * 7 * 128 + 128 * 10)
    deeper = ModelConfig(blocks=[[32, 32], [64, 64], [128]])  # a third block on 7x7, pooled to 3x3
    assert training_flops_per_image(deeper) == 6 * (convs + 7 * 7 * 64 * 128 * 9 + 128 * 3 * 3 * 128 + 128 * 10)


@pytest.mark.parametrize("blocks", [[[8]], [[8], [8], [8], [8]], [[4, 4, 4]]])
def test_any_number_of_blocks_the_image_survives_maps_to_ten_logits(blocks):
    assert build_model(ModelConfig(blocks=blocks, kernel_size=5)).eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_no_blocks_is_the_classic_net_with_its_layer_names():
    for blocks in (None, []):
        cfg = ModelConfig(blocks=blocks)
        assert cfg.blocks is None and cfg == ModelConfig()
        assert set(build_model(cfg).state_dict()) == {f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2")
                                                     for p in ("weight", "bias")}


ALLOWED = r"allowed: a list of at most 4 blocks .*, e\.g\. model\.blocks=\[\[32, 32\], \[64, 64\]\], or null"


@pytest.mark.parametrize("kwargs, message", [
    ({"blocks": [[32, 0]]}, r"^model\.blocks=\[\[32, 0\]\] is not a valid list of conv blocks; " + ALLOWED),
    ({"blocks": [[8]] * 5}, r"^model\.blocks=\[\[8\], \[8\], \[8\], \[8\], \[8\]\] is not a valid list .*at most 4"),
    ({"blocks": [32, 64]}, r"^model\.blocks=\[32, 64\] is not a valid list of conv blocks; " + ALLOWED),
    ({"blocks": 3}, r"^model\.blocks=3 is not a valid list"),
    ({"blocks": "[[32]]"}, r"^model\.blocks='\[\[32\]\]' is not a valid list"),
    ({"blocks": [[]]}, r"^model\.blocks=\[\[\]\] is not a valid list"),
    ({"blocks": [[True]]}, r"^model\.blocks=\[\[True\]\] is not a valid list"),
    ({"blocks": [[32]], "kernel_size": 4}, r"^model\.kernel_size=4 must be odd and >= 1 with model\.blocks"),
    ({"blocks": [[32]], "pool_each_conv": True}, r"^model\.pool_each_conv=true does not apply to model\.blocks"),
    ({"blocks": [[32]], "fc_width": 0}, r"^model\.fc_width=0 must be >= 1")])
def test_bad_blocks_are_one_config_error_naming_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**kwargs)
