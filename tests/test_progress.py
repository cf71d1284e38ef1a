"""What a run shows while it trains, with and without a terminal."""

import logging

from mnist_sweep import run as entry


def test_without_a_terminal_progress_is_a_plain_line_per_interval(monkeypatch, caplog):
    monkeypatch.setattr(entry, "PROGRESS_EVERY_S", 0)  # every batch, so a test sees lines at once
    batches = [(i, i) for i in range(4)]
    with caplog.at_level(logging.INFO, logger="mnist_sweep"):
        assert list(entry.progress_bar(False, 3, 64)(batches, 2)) == batches  # every batch still comes through
    lines = [r.getMessage() for r in caplog.records]
    assert [ln.split("  ")[:2] for ln in lines] == [["epoch 2/3", "25%"], ["epoch 2/3", "50%"], ["epoch 2/3", "75%"]]
    assert all(ln.endswith("img/s") for ln in lines)


def test_on_a_terminal_progress_is_a_bar_counting_images():
    bar = entry.progress_bar(True, 3, 64)([(0, 0)] * 5, 1)
    assert bar.total == 5 and bar.unit == "img" and bar.desc == "epoch 1/3"
    bar.close()


def test_the_first_step_is_noted_only_when_asked(tmp_path):
    from mnist_sweep import startup

    plain = entry.progress_bar(False, 1, 64)
    assert startup.marking_first_step(plain, env={}) is plain  # an ordinary run writes nothing
    marker = tmp_path / "first_step"
    marked = startup.marking_first_step(plain, env={startup.FIRST_STEP_ENV: str(marker)})
    batches = marked([(0, 0), (1, 1), (2, 2)], 1)
    assert next(batches) == (0, 0) and not marker.exists()  # the first batch is handed out, not yet trained
    assert next(batches) == (1, 1) and len(marker.read_text().split()) == 1
    assert list(marked([(0, 0), (1, 1)], 2)) == [(0, 0), (1, 1)] and len(marker.read_text().split()) == 1
