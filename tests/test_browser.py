"""A real browser on `mlflow server`: the experiment page lists the study's parent run with its nested trials and
the dataset each trained on.

Needs Debian's chromium (.ci/run installs it) and the playwright package; skipped where either is missing."""

from pathlib import Path

import pytest

from conftest import mlflow_server as start_mlflow_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")]


@pytest.fixture
def mlflow_server(recorded_study):
    with start_mlflow_server(f"sqlite:///{recorded_study / 'mlflow.db'}", cwd=recorded_study) as server:
        yield server.url


def test_experiment_page_lists_the_parent_run_and_its_nested_trials(mlflow_server, recorded_study):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{recorded_study / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mnist_sweep")
    runs = client.search_runs([exp.experiment_id])
    children = [r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{mlflow_server}/#/experiments/{exp.experiment_id}/runs", timeout=120_000)
            page.get_by_text("tiny", exact=True).first.wait_for(timeout=120_000)  # the parent run's name
            text = page.inner_text("body")
            if not all(name in text for name in children):  # nested runs start collapsed: the parent's
                # name cell holds its expander button before the run link
                cell = page.get_by_role("link", name="tiny", exact=True).first.locator(
                    "xpath=ancestor::div[@role='gridcell'][1]")
                cell.locator("button").first.click()
                page.get_by_text(children[0], exact=True).first.wait_for(timeout=60_000)
                text = page.inner_text("body")
        finally:
            browser.close()
    assert all(name in text for name in children), text[:3000]
    # the Dataset column names what the trials trained on (artifacts.log_dataset), not "-"
    [digest] = {r.inputs.dataset_inputs[0].dataset.digest for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert f"mnist ({digest})" in text, text[:3000]
