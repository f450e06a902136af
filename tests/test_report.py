"""`dpfl-bench report`: one self-contained HTML file (tables, figure, runs, configurations), and it opens
in a real headless browser without errors."""

import re
import shutil
import subprocess

import pytest
from support import assert_user_error, invoke, write_run


@pytest.fixture
def report(tmp_path):
    folder = tmp_path / "results"
    for seed in (0, 1):
        write_run(folder, method="dp-lora", seed=seed, accuracies=[0.5, 0.6 + seed / 100], eps=1.0)
        write_run(folder, method="la-lora", seed=seed, accuracies=[0.55, 0.62 + seed / 100], eps=1.0)
        write_run(folder, method="la-lora", seed=seed, accuracies=[0.7, 0.8], dp_level="authors", dp_sigma=0.2)
    path = tmp_path / "out" / "report.html"
    result = invoke("report", folder, "-o", path)
    assert result.exit_code == 0, result.output
    return path, folder


def test_the_report_holds_the_tables_the_figure_the_runs_and_their_configurations(report):
    path, folder = report
    page = path.read_text()
    assert page.count("<table") == 2 and "<svg" in page  # the comparison, the runs; the figure inline
    assert "0.6050 ± 0.0071 (2)" in page and "la-lora gain" in page
    assert "<span class='no-guarantee'>(no guarantee)</span>" in page
    for run in folder.glob("*.parquet"):
        assert f"<summary>{run.stem}</summary>" in page
    # Self-contained: nothing to fetch (an SVG's xmlns names a namespace; it is not loaded).
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)


def test_a_report_that_is_not_html_is_one_line(tmp_path):
    write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.5], eps=1.0)
    assert_user_error(invoke("report", tmp_path, "-o", tmp_path / "report.pdf"), "the report is HTML")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (make install adds it where apt-get works)")
def test_the_report_opens_in_a_headless_browser_without_errors(report):
    path, _ = report
    browser = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert browser.returncode == 0, browser.stderr
    assert "<table" in browser.stdout and "<svg" in browser.stdout and "la-lora gain" in browser.stdout
    console = [line for line in browser.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
