"""On the real MNIST (checksum-verified files under $MNIST_ROOT or ../shared/data); skipped where it is absent."""

import hashlib

import pytest

from conftest import REAL_MNIST, mlflow_runs, run_cli

OFFICIAL_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
RAW = REAL_MNIST / "MNIST" / "raw"
pytestmark = [
    pytest.mark.real_data, pytest.mark.slow,
    pytest.mark.skipif(not all((RAW / f).is_file() for f in OFFICIAL_MD5),
                       reason=f"real MNIST not found under {RAW} (set MNIST_ROOT to a folder with MNIST/raw/)"),
]


def test_real_files_are_the_official_ones():
    for name, md5 in OFFICIAL_MD5.items():
        assert hashlib.md5((RAW / name).read_bytes()).hexdigest() == md5, name


def test_one_epoch_of_the_speedrun_recipe_reaches_98_percent(tmp_path):
    """The whole path on the real files: torchvision's reader, the split, training, the test set, the record. The
    speedrun recipe (conf/experiment/speedrun.yaml) cut to one epoch: about 27 s alone on 2 cores, where one epoch
    of the default config takes about 100 s (the README's tables measure that one)."""
    result = run_cli(["experiment=speedrun", "trainer.epochs=1", "data.download=false", f"data.root={REAL_MNIST}",
                      f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'run'}"],
                     cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    _, (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/acc"] >= 0.98
