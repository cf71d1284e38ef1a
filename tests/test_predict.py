"""predict's preprocessing (unit), and the predict CLI on the recorded study's registered model (end to end)."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, synthetic_digits
from mnist_sweep.errors import UserError
from mnist_sweep.predict import MAX_PIXELS, WORK_SIDE, read_gray, to_mnist


def stroke_image(height=90, width=140, top=10, left=70, h=60, w=20) -> np.ndarray:
    """A bright upright bar (a '1') on black, off-centre in a larger canvas."""
    img = np.zeros((height, width), dtype=np.uint8)
    img[top:top + h, left:left + w] = 230
    return img


def center_of_mass(img: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(img.shape)
    return (ys * img).sum() / img.sum(), (xs * img).sum() / img.sum()


def test_digit_box_is_scaled_into_20_pixels_keeping_aspect_and_centred_by_mass():
    out = to_mnist(stroke_image())
    assert out.shape == (28, 28) and out.dtype == np.float32
    rows, cols = np.nonzero(out > 0.5)
    assert rows.max() - rows.min() + 1 in (19, 20, 21)  # the long side fills the 20x20 box
    assert 5 <= cols.max() - cols.min() + 1 <= 8  # 60:20 stays 3:1
    cy, cx = center_of_mass(out)
    assert abs(cy - 13.5) < 1 and abs(cx - 13.5) < 1
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_dark_ink_on_bright_paper_gives_the_same_digit():
    bright = stroke_image()
    paper = 255 - bright
    np.testing.assert_allclose(to_mnist(paper), to_mnist(bright), atol=1e-6)


def test_a_grey_noisy_background_is_removed():
    rng = np.random.default_rng(0)
    photo = (rng.integers(90, 120, size=(90, 140)) + stroke_image() // 2 * 1).clip(0, 255).astype(np.uint8)
    out = to_mnist(photo)
    assert (out[:, :3] == 0).all() and (out[:3] == 0).all()  # the margins are black, as in MNIST
    np.testing.assert_allclose(center_of_mass(out), (13.5, 13.5), atol=1)


def test_a_blank_image_is_a_clear_error():
    with pytest.raises(UserError, match="no digit found"):
        to_mnist(np.full((30, 30), 200, dtype=np.uint8))


def test_unreadable_files_are_clear_errors(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(UserError, match="not an image"):
        read_gray(tmp_path / "notes.png")
    with pytest.raises(UserError, match="no such file"):
        read_gray(tmp_path / "missing.png")


def test_transparent_png_is_read_over_white(tmp_path):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)  # transparent black everywhere ...
    rgba[5:35, 18:22] = (0, 0, 0, 255)  # ... and an opaque black stroke
    Image.fromarray(rgba).save(tmp_path / "ink.png")
    gray = read_gray(tmp_path / "ink.png")
    assert gray[0, 0] == 255 and gray[20, 20] == 0


def black_png(path, width: int, height: int) -> None:
    """A valid 8-bit grayscale PNG of black pixels, compressed a row at a time: a few MB on disk and in memory
    whatever its size (PIL would build the whole image first)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(1)
    row = bytes(width + 1)  # filter type 0, then the row's black pixels
    pixels = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bits, grayscale, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height, size", [
    (7000, 7000, "7000x7000 pixels"),  # over MAX_PIXELS: it took seconds and gigabytes to decode
    (13400, 13400, "more than 178,956,970 pixels"),  # Pillow's own limit: DecompressionBombError
], ids=["over-MAX_PIXELS", "over-Pillow-limit"])
def test_an_image_too_large_to_read_is_refused_before_decoding(tmp_path, width, height, size):
    black_png(tmp_path / "huge.png", width, height)
    with pytest.raises(UserError) as err:
        read_gray(tmp_path / "huge.png")
    assert str(err.value) == (f"{tmp_path / 'huge.png'}: the image is too large to read ({size}); allowed: at most "
                              f"{MAX_PIXELS:,} pixels, e.g. 8000x5000 (a JPEG may be larger: it is decoded at down "
                              "to 1/8 scale). Scale it down first")


def test_a_large_photo_is_shrunk_on_load_and_turned_upright(tmp_path):
    """A 6000x4000 JPEG, as a phone takes it (EXIF orientation 6: rotate to portrait), of a bright bar."""
    gray = np.zeros((4000, 6000), dtype=np.uint8)
    gray[1000:3000, 2900:3300] = 230  # tall in the stored landscape image: wide once upright
    photo = Image.fromarray(gray)
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(tmp_path / "photo.jpg", exif=exif, quality=90)
    out = read_gray(tmp_path / "photo.jpg")
    assert out.shape == (WORK_SIDE, round(WORK_SIDE * 4000 / 6000))  # portrait, longer side WORK_SIDE
    rows, cols = np.nonzero(out > 128)
    assert cols.max() - cols.min() > 3 * (rows.max() - rows.min())  # the bar lies across once upright


@pytest.mark.slow
def test_predict_cli_classifies_images_with_the_registered_model(recorded_study, tmp_path):
    from mnist_sweep import artifacts, registry, tracking
    from mnist_sweep.predict import classify

    images, _ = synthetic_digits(3, seed=5)
    paths = []
    for i, img in enumerate(images):
        Image.fromarray(img).resize((56, 84)).save(tmp_path / f"d{i}.png")
        paths.append(tmp_path / f"d{i}.png")
    uri = f"sqlite:///{recorded_study / 'mlflow.db'}"
    result = run_cli([*map(str, paths), "--tracking-uri", uri], cwd=recorded_study, module="mnist_sweep.predict")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "models:/mnist_sweep_best/1" in result.stdout
    assert "Downloading artifacts" not in result.stderr  # MLflow's progress bars are off in our commands
    # the digits printed are those of the registered run's net on the same preprocessing
    client = tracking.make_client(uri)
    run_id = registry.latest_model_version(client, "mnist_sweep_best").run_id
    probs = classify(artifacts.load_model(client, run_id), [to_mnist(read_gray(p)) for p in paths],
                     *tracking.input_settings(client, run_id))
    for path, p in zip(paths, probs):
        line = next(line for line in result.stdout.splitlines() if path.name in line)
        cells = [c.strip() for c in line.split("│") if c.strip()]
        assert int(cells[1]) == p.argmax().item()
        assert sum(float(c) for c in cells[2:12]) == pytest.approx(1.0, abs=0.02)

    bad = run_cli([str(tmp_path / "nope.jpg"), "--tracking-uri", uri], cwd=recorded_study,
                  module="mnist_sweep.predict")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.jpg'}: no such file"


@pytest.mark.slow
def test_predict_loads_the_registered_mlflow_model_that_it_names(recorded_study):
    import torch

    from mnist_sweep import artifacts, predict, registry, tracking
    from mnist_sweep.model import Net

    client = tracking.make_client(f"sqlite:///{recorded_study / 'mlflow.db'}")
    loaded = predict.load_model(client, None, "mnist_sweep_best", "sqlite:///unused")
    assert loaded.source == "models:/mnist_sweep_best/1"
    assert not isinstance(loaded.net, Net)  # the logged pt2 graph, not the run's weights rebuilt with our code
    assert (loaded.mean, loaded.std) == (0.1307, 0.3081)  # from the model's metadata
    net = artifacts.load_model(client, registry.latest_model_version(client, "mnist_sweep_best").run_id)
    batch = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(batch), net(batch))


@pytest.mark.slow
def test_a_registered_version_that_cannot_be_loaded_is_a_clear_error(recorded_study):
    from mnist_sweep import registry, tracking

    client = tracking.make_client(f"sqlite:///{recorded_study / 'mlflow.db'}")
    with pytest.raises(UserError, match=r"^models:/mnist_sweep_best/99 \(tracking URI sqlite:///.*\) could not be "
                                        r"loaded: .+; register it again \(run the sweep\) or pass --run-id$"):
        registry.load_registered_model(client, "mnist_sweep_best", "99")


def test_predict_on_a_missing_mlflow_store_is_one_line_and_creates_none(tmp_path, monkeypatch, capsys):
    from mnist_sweep import predict

    Image.fromarray(stroke_image()).save(tmp_path / "one.png")
    monkeypatch.chdir(tmp_path)
    assert predict.main(["one.png"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --tracking-uri sqlite:///mlflow.db: no MLflow store there ({tmp_path / 'mlflow.db'} does not exist); "
        "run this where the sweep ran, or pass --tracking-uri with the sweep's mlflow.tracking_uri"]
    assert not (tmp_path / "mlflow.db").exists()
