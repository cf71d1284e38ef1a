import numpy as np
import pytest
import torch

from mnist_sweep import data
from mnist_sweep.data import DataConfig, TensorBatches, build_splits, load_mnist, normalize, split_indices
from mnist_sweep.errors import ConfigError, DataError

from conftest import make_synthetic_mnist, write_idx


@pytest.fixture(autouse=True)
def fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


def test_batches_cover_every_index_once_per_epoch():
    n = 103
    batches = TensorBatches(torch.arange(n).float(), torch.arange(n), batch_size=10, shuffle=True, seed=5)
    assert len(batches) == 11
    epochs = []
    for _ in range(3):
        seen = torch.cat([y for _, y in batches])
        assert sorted(seen.tolist()) == list(range(n))
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_batches_are_seed_deterministic():
    def order(seed):
        b = TensorBatches(torch.zeros(50), torch.arange(50), batch_size=7, shuffle=True, seed=seed)
        return [torch.cat([y for _, y in b]) for _ in range(2)]
    a, b, c = order(1), order(1), order(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_unshuffled_batches_keep_order():
    b = TensorBatches(torch.zeros(25), torch.arange(25), batch_size=10, shuffle=False)
    assert torch.cat([y for _, y in b]).tolist() == list(range(25))


def test_split_is_disjoint_seeded_and_complete():
    train, val = split_indices(100, 20, seed=0)
    assert len(val) == 20 and len(train) == 80
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert torch.equal(split_indices(100, 20, seed=0)[1], val)
    assert not torch.equal(split_indices(100, 20, seed=1)[1], val)


def test_split_that_leaves_no_training_data_is_refused():
    with pytest.raises(ConfigError, match=r"data\.val_size=100 leaves no training data"):
        split_indices(100, 100, seed=0)


def test_normalize_equals_totensor_and_normalize():
    from PIL import Image
    from torchvision import transforms

    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    ours = normalize(images, 0.1307, 0.3081, torch.device("cpu"))
    classic = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    theirs = torch.stack([classic(Image.fromarray(im.numpy(), mode="L")) for im in images])
    torch.testing.assert_close(ours, theirs)


def test_memory_and_classic_loaders_serve_the_same_split(mnist_root):
    cfg = DataConfig(root=str(mnist_root), download=False, val_size=100, batch_size=50)
    mem = build_splits(cfg, torch.device("cpu"), seed=0)
    classic = build_splits(DataConfig(**{**cfg.__dict__, "loader": "classic"}), torch.device("cpu"), seed=0)
    assert (mem.num_train, mem.num_val, mem.num_test) == (1100, 100, 300)
    for a, b in ((mem.val, classic.val), (mem.test, classic.test)):
        xa, ya = map(torch.cat, zip(*a))
        xb, yb = map(torch.cat, zip(*b))
        torch.testing.assert_close(xa, xb)
        assert torch.equal(ya, yb)


@pytest.mark.parametrize("loader", ["memory", "classic"])
def test_train_on_val_trains_on_every_training_image_and_still_validates(mnist_root, loader):
    cfg = DataConfig(root=str(mnist_root), download=False, val_size=100, batch_size=50, loader=loader)
    held_out = build_splits(cfg, torch.device("cpu"), seed=0)
    refit = build_splits(DataConfig(**{**cfg.__dict__, "train_on_val": True}), torch.device("cpu"), seed=0)
    assert (refit.num_train, refit.num_val, refit.num_test) == (1200, 100, 300)
    assert sum(len(y) for _, y in refit.train) == 1200
    xv, _ = map(torch.cat, zip(*refit.val))
    torch.testing.assert_close(xv, torch.cat([x for x, _ in held_out.val]))  # the same held-out images
    # and the split cached for the first config is not served to the second, nor back
    assert build_splits(cfg, torch.device("cpu"), seed=0).num_train == 1100


def test_dataset_is_loaded_once_per_process(mnist_root, monkeypatch):
    first = load_mnist(str(mnist_root), False)
    monkeypatch.setattr(data, "_torchvision_mnist", lambda *a, **k: pytest.fail("loaded twice"))
    assert load_mnist(str(mnist_root), False) is first


def test_a_second_prepare_of_the_same_data_reads_no_file_and_other_data_settings_get_their_own_split(
        mnist_root, monkeypatch):
    """A sweep's worker runs trial after trial in one process: the files are read by its first trial only, and a
    trial with other data settings gets its own split, not the one cached for the trial before."""
    from mnist_sweep.model import ModelConfig
    from mnist_sweep.train import RunSpec, TrainerConfig, prepare

    reads = []
    read = data._torchvision_mnist
    monkeypatch.setattr(data, "_torchvision_mnist", lambda *a, **k: reads.append(k.get("train", a[1:2])) or read(*a, **k))

    def spec(cfg: DataConfig, seed: int) -> RunSpec:
        return RunSpec(ModelConfig(conv1_channels=4, conv2_channels=4, fc_width=8), cfg,
                       TrainerConfig(device="cpu", seed=seed), lambda params: torch.optim.SGD(params, lr=0.1))

    cfg = DataConfig(root=str(mnist_root), download=False, val_size=100, batch_size=50)
    first = prepare(spec(cfg, seed=1)).splits
    assert len(reads) == 2  # the training and the test files, once
    second = prepare(spec(DataConfig(**{**cfg.__dict__, "batch_size": 20}), seed=2)).splits  # the next trial
    assert len(reads) == 2  # no file read again
    assert second.val.images is first.val.images and second.train.batch_size == 20  # its own batches, same split
    other = prepare(spec(DataConfig(**{**cfg.__dict__, "val_size": 200, "mean": 0.5}), seed=1)).splits
    assert len(reads) == 2 and (other.num_train, other.num_val) == (1000, 200)
    torch.testing.assert_close(other.test.images, normalize(load_mnist(str(mnist_root), False).test_images, 0.5,
                                                            cfg.std, torch.device("cpu")))
    again = prepare(spec(cfg, seed=1)).splits  # and back: not the other settings' split
    assert (again.num_train, again.num_val) == (1100, 100) and len(reads) == 2
    torch.testing.assert_close(again.val.images, first.val.images)


def test_augmentation_keeps_shape_and_moves_pixels():
    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    out = data.augment(x, max_shift=3, max_rotation=15, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    assert abs(out.sum() - x.sum()) / x.sum() < 0.2  # moved, not erased


def test_zoom_scales_the_digit_and_without_it_the_random_stream_is_unchanged():
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0  # an 8x8 square: its inked area is 64 pixels
    zoomed = data.augment(x, 0, 0.0, torch.Generator().manual_seed(0), max_zoom=0.3)
    areas = (zoomed > 0.5).flatten(1).sum(1).float()
    assert areas.min() < 55 and areas.max() > 75  # some shrunk, some grew: scales in [0.7, 1.3]
    assert ((areas > 0.49 * 64) & (areas < 1.69 * 64 + 16)).all()
    plain = data.augment(x, 2, 10.0, torch.Generator().manual_seed(0))
    again = data.augment(x, 2, 10.0, torch.Generator().manual_seed(0), max_zoom=0.0)
    assert torch.equal(plain, again)


def test_elastic_blur_is_torchvisions_gaussian_blur():
    from torchvision.transforms.v2.functional import gaussian_blur

    noise = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for sigma in (4.0, 6.0):
        blur = data.gaussian_blur_matrix(28, sigma, torch.device("cpu"))
        taps = int(8 * sigma + 1) | 1  # odd, as torchvision's ElasticTransform makes it
        theirs = gaussian_blur(noise, [taps, taps], [sigma, sigma])[:, 0]
        torch.testing.assert_close(blur @ noise[:, 0] @ blur.T, theirs, atol=1e-5, rtol=0)


def test_elastic_distortion_bends_each_digit_its_own_way_and_off_draws_nothing():
    field = data.elastic_displacement(256, 28, 34.0, 4.0, torch.Generator().manual_seed(0)) * 28 / 2  # in pixels
    assert field.shape == (256, 28, 28, 2)
    assert 1.2 < field.std() < 2.2  # Simard's alpha 34, sigma 4: a displacement of about 1.7 px rms
    smooth = (field[:, 1:] - field[:, :-1]).std()  # neighbours move together: a smooth field, not pixel noise
    assert smooth < 0.25 * field.std()
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 6:22, 12:16] = 1.0  # the same bar twice
    bent = data.augment(x, 0, 0.0, torch.Generator().manual_seed(1), elastic_alpha=34.0)
    assert not torch.allclose(bent[0], x[0]) and not torch.allclose(bent[0], bent[1])
    assert abs(bent.sum() - x.sum()) / x.sum() < 0.2  # bent, not erased
    plain = data.augment(x, 2, 10.0, torch.Generator().manual_seed(0), max_zoom=0.1)
    again = data.augment(x, 2, 10.0, torch.Generator().manual_seed(0), max_zoom=0.1, elastic_alpha=0.0)
    assert torch.equal(plain, again)


def test_the_classic_loader_distorts_too(mnist_root):
    cfg = DataConfig(root=str(mnist_root), download=False, val_size=100, batch_size=50, loader="classic")
    plain = build_splits(cfg, torch.device("cpu"), seed=0)
    bent = build_splits(DataConfig(**{**cfg.__dict__, "elastic_alpha": 34.0}), torch.device("cpu"), seed=0)
    (xp, yp), (xb, yb) = next(iter(plain.train)), next(iter(bent.train))
    assert torch.equal(yp, yb) and xb.shape == xp.shape and not torch.allclose(xb, xp)


@pytest.mark.parametrize("key, value, message", [
    ("elastic_alpha", -1.0,
     r"^data\.elastic_alpha=-1\.0 must be >= 0: the distortion's strength in pixels \(0 = off\)$"),
    ("elastic_sigma", 0.0, r"^data\.elastic_sigma=0\.0 must be in \(0, 7\): the smoothing in pixels"),
    ("elastic_sigma", 7.0, r"^data\.elastic_sigma=7\.0 must be in \(0, 7\)"),
])
def test_bad_elastic_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        data.DataConfig("data", **{key: value})


def test_bad_zoom_names_the_key():
    with pytest.raises(ConfigError, match=r"data.max_zoom=1.5 must be in \[0, 1\)"):
        data.DataConfig("data", max_zoom=1.5)


def test_missing_data_offline_says_where_and_how_to_fix(tmp_path):
    with pytest.raises(DataError) as err:
        load_mnist(str(tmp_path / "empty"), download=False)
    msg = str(err.value)
    assert str(tmp_path / "empty" / "MNIST" / "raw") in msg
    assert "MNIST_ROOT" in msg and "data.root" in msg and "train-images-idx3-ubyte" in msg


def test_failed_download_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def offline(self):  # what torchvision raises when every mirror is unreachable
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://mirror/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(MNIST, "download", offline)
    with pytest.raises(DataError, match="download failed: Error downloading .* Name or service not known"):
        load_mnist(str(tmp_path / "empty"), download=True)


def test_truncated_file_is_a_clear_error(tmp_path):
    root = make_synthetic_mnist(tmp_path / "data", n_train=50, n_test=20)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_mnist(str(root), download=False)


def test_images_and_labels_of_different_lengths_are_refused(tmp_path):
    root = make_synthetic_mnist(tmp_path / "data", n_train=50, n_test=20)
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(49, dtype=np.uint8))
    with pytest.raises(DataError, match="50 images but 49 labels"):
        load_mnist(str(root), download=False)


def test_a_file_with_a_wrong_magic_number_is_a_clear_error(tmp_path):
    root = make_synthetic_mnist(tmp_path / "data", n_train=50, n_test=20)
    path = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x56\x78" + path.read_bytes()[4:])  # not an IDX file: random bytes, say
    with pytest.raises(DataError) as err:
        load_mnist(str(root), download=False)
    assert str(err.value).startswith(f"MNIST file {path} has magic number 0x12345678, expected 0x00000803 (an IDX "
                                     "file of unsigned bytes with 3 dimensions): it is not an MNIST images file.")


def test_a_gzipped_file_is_told_to_be_gunzipped(tmp_path):
    import gzip

    root = make_synthetic_mnist(tmp_path / "data", n_train=50, n_test=20)
    path = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(gzip.compress(path.read_bytes()))  # the .gz from the mirror, renamed but not unpacked
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte has magic number 0x1f8b.*expected 0x00000801 "
                                        r"\(an IDX file of unsigned bytes with 1 dimension\).* gunzip it"):
        load_mnist(str(root), download=False)


def test_a_label_outside_0_to_9_is_named_with_its_file(tmp_path):
    """A stray 200 in a labels file stopped training midway with "IndexError: Target 200 is out of bounds"."""
    root = make_synthetic_mnist(tmp_path / "data", n_train=50, n_test=20)
    labels = np.arange(50) % 10
    labels[[17, 30]] = 200
    write_idx(root / "MNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    with pytest.raises(DataError) as err:
        load_mnist(str(root), download=False)
    assert str(err.value) == (f"MNIST labels file {root / 'MNIST' / 'raw' / 'train-labels-idx1-ubyte'} holds label "
                              "200 at position 17 (2 label(s) out of range); allowed: 0..9. Replace it with the "
                              "official file.")


def test_a_mirror_that_never_answers_times_out(tmp_path, monkeypatch):
    """A server that accepts the connection and then says nothing: the download ends in DOWNLOAD_TIMEOUT_S."""
    import re
    import socket
    import threading

    from torchvision.datasets import MNIST

    server = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.extend(server.accept() for _ in range(2)), daemon=True).start()
    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{server.getsockname()[1]}/"])
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 0.5)
    outcome = []

    def download():
        try:
            load_mnist(str(tmp_path / "empty"), download=True)
        except Exception as e:
            outcome.append(e)

    worker = threading.Thread(target=download, daemon=True)  # a regression hangs it, not the test session
    worker.start()
    worker.join(timeout=10)
    server.close()
    assert not worker.is_alive(), "the download still hangs after 10 s"
    assert isinstance(outcome[0], DataError)
    assert re.search(r"MNIST not found: .* \(download failed: .*timed out.*data\.root", str(outcome[0]))
    assert held  # the mirror was reached and kept silent: it was the timeout that ended the download
    assert socket.getdefaulttimeout() is None  # the process-wide timeout is restored


def test_a_missing_labels_file_is_named(tmp_path):
    root = make_synthetic_mnist(tmp_path / "data", n_train=50, n_test=20)
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        load_mnist(str(root), download=False)
