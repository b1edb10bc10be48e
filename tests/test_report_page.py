"""The HTML report: built from a bench's files alone, with its PNGs written and embedded, one table
row per strategy, rendered by a real browser (headless Chromium); and live monitoring: the
tensorboard event files of a tiny run hold the per-task loss and the held-out scores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from continual_lora.cli import main
from continual_lora.config import ConfigError, load_run_config


@pytest.fixture
def tiny_bench(tiny_bench_config, tmp_path, capsys) -> Path:
    """naive and replay (and joint, added by the bench) on the two tiny tasks, through the CLI."""
    assert main(["bench", str(tiny_bench_config("pagebench"))]) == 0
    bench_dir = tmp_path / "runs" / "pagebench"
    assert f"report: {bench_dir / 'report.html'}" in capsys.readouterr().out
    return bench_dir


class _PageParser(HTMLParser):
    """The parts of the page the tests check: images, and the rows of the strategies table."""

    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.table_rows = 0
        self._in_strategies = False
        self._in_body = False
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value.startswith(("http:", "https:", "//")):
                self.external.append(value)
        if tag == "table" and attrs.get("id") == "strategies":
            self._in_strategies = True
        elif tag == "tbody" and self._in_strategies:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.table_rows += 1

    def handle_endtag(self, tag):
        if tag == "table" and self._in_strategies:
            self._in_strategies = self._in_body = False


def test_bench_report_is_one_self_contained_page(tiny_bench):
    page = (tiny_bench / "report.html").read_text()
    parsed = _PageParser()
    parsed.feed(page)
    assert parsed.table_rows == 3  # naive, replay, joint
    assert parsed.external == []  # nothing to fetch: the page opens offline
    # Every figure is embedded as a PNG and also written beside the page.
    assert parsed.images and all(i["src"].startswith("data:image/png;base64,")
                                 for i in parsed.images)
    for img in parsed.images:
        assert (tiny_bench / img["data-file"]).is_file(), img["data-file"]
    files = {i["data-file"] for i in parsed.images}
    assert "figures/strategies.png" in files
    for run in ("naive-r2", "replay-r2", "joint-r2"):
        for figure in ("accuracy_matrix", "task_curves", "training_loss", "class_forgetting"):
            assert f"runs/{run}/figures/{figure}.png" in files
    # the metric definitions under the table, and the lineage of each adapter
    assert "Forgetting = (1/(T-1))" in page
    assert page.count("Lineage of the adapters") == 3
    sha = json.loads((tiny_bench / "runs/naive-r2/tasks/02-b/adapter/lineage.json")
                     .read_text())["adapter"]["sha256"][:12]
    assert sha in page


def test_accuracy_values_in_the_page_are_the_runs(tiny_bench):
    """The table's ACC cells are the numbers in each run's metrics.json, in bench order."""
    page = (tiny_bench / "report.html").read_text()
    body = page[page.index('<table id="strategies">'):]
    body = body[:body.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", body)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row) for row in rows]
    for row, run in zip(cells, ("naive-r2", "replay-r2", "joint-r2"), strict=True):
        m = json.loads((tiny_bench / "runs" / run / "metrics.json").read_text())
        assert row[0] == m["label"] and row[2] == f"{m['acc']:.3f}"


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def _headless(tmp_path) -> list[str]:
    """The headless Chromium command line (skip without one, fail in CI)."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("CONTINUAL_LORA_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH, and CI requires it (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]


def _dom(common: list[str], url: str) -> str:
    return subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                          timeout=120, check=True).stdout


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tiny_bench, tmp_path):
    """A real browser opens the page: every image loaded (the page's script counts them on
    <body>), the table has one row per strategy, and the screenshot is not blank."""
    common = _headless(tmp_path)
    url = (tiny_bench / "report.html").resolve().as_uri()
    dom = _dom(common, url)
    total = re.search(r'data-images-total="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert total and loaded, "the page's load script did not run"
    n_images = (tiny_bench / "report.html").read_text().count("<img ")
    assert int(total.group(1)) == n_images > 0
    assert int(loaded.group(1)) == n_images  # every image decoded
    assert 'class="broken"' not in dom
    rendered = _PageParser()
    rendered.feed(dom)
    assert rendered.table_rows == 3

    shot = tmp_path / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,2000", url],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape[:2] == (2000, 1280)
    not_background = np.abs(pixels - pixels[5, 5]).sum(axis=2) > 30
    assert not_background.mean() > 0.05  # text, tables and figures drawn, not a blank page
    assert pixels.std() > 20
    # colour from the figures (the heatmap, the curves), not just black text on white
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 60).mean() > 0.01


@pytest.mark.slow
def test_a_figure_that_cannot_load_is_marked_on_the_page(tmp_path):
    """The page's load script tells a broken figure from a good one (so the browser test's
    `loaded == total` is a real check): a PNG moved away is counted and named on the page."""
    from continual_lora.report.html import image, page

    good = tmp_path / "figures" / "good.png"
    good.parent.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 30, 30)).save(good)
    body = [image(good, tmp_path, "a good figure"),
            '<img src="figures/missing.png" alt="gone" data-file="figures/missing.png">']
    path = tmp_path / "report.html"
    path.write_text(page("t", "s", body))
    dom = _dom(_headless(tmp_path), path.resolve().as_uri())
    assert 'data-images-total="2"' in dom and 'data-images-loaded="1"' in dom
    assert re.search(r'<p class="broken">figure did not load: figures/missing.png</p>', dom)


def test_markdown_tables_become_html_tables():
    from continual_lora.report.html import markdown_tables

    out = markdown_tables("| a | b |\n|---|---|\n| 1 | <x> |\n\nsome text")
    assert "<th>a</th><th>b</th>" in out and "&lt;x&gt;" in out and "<p>some text</p>" in out
    assert out.count("<tr>") == 2


def test_report_of_a_folder_that_is_not_a_run_says_what_to_give(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "not a run, bench or update folder" in err and str(tmp_path / "empty") in err


def test_tensorboard_holds_per_task_loss_and_scores(tiny_run_config, tmp_path):
    """Read the event files back with tensorboard's own reader: a loss scalar per task at the
    steps log.jsonl logged, the per-source losses, and every task's held-out score per stage."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    from continual_lora.runner import run

    data = tiny_run_config("replay", train={"lr": 1e-2, "batch_size": 8, "max_steps": 4,
                                            "eval_batch_size": 16, "log_every": 1})
    data["strategy"]["options"] = {"buffer_size": 4}
    cfg = load_run_config(None, data=data)
    result = run(cfg, echo=lambda _: None)
    events = EventMultiplexer().AddRunsFromDirectory(str(result.run_dir / "tensorboard"))
    events.Reload()
    scalars = {}
    for run_name, tags in events.Runs().items():
        for tag in tags.get("scalars", []):
            scalars[tag] = [(e.step, e.value) for e in events.Scalars(run_name, tag)]
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").open()]
    for task in ("a", "b"):
        logged = [(e["global_step"], e["loss"]) for e in log
                  if e["event"] == "step" and e["task"] == task]
        assert len(logged) == 4
        got = scalars[f"loss/{task}"]
        assert [s for s, _ in got] == [s for s, _ in logged]
        assert np.allclose([v for _, v in got], [v for _, v in logged], rtol=1e-6)
    # task b's batches mix replayed a examples with b's: one loss per source
    assert "source_loss/b/a" in scalars and "source_loss/b/b" in scalars
    # held-out scores at stage 0 (step 0), after a (step 4) and after b (step 8)
    assert [s for s, _ in scalars["eval/a"]] == [0, 3, 7]
    assert np.allclose([v for _, v in scalars["eval/b"]], np.array(result.R)[:, 1])


def test_a_tracker_that_is_not_installed_is_refused_before_anything_is_written(
        tiny_run_config, tmp_path, monkeypatch):
    import importlib.util

    from continual_lora.runner import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_run_config(None, data=tiny_run_config(train={
        "lr": 1e-2, "batch_size": 8, "max_steps": 4, "trackers": ["tensorboard", "wandb"]}))
    with pytest.raises(ConfigError, match=r"train.trackers: wandb .* pip install wandb"):
        run(cfg, echo=lambda _: None)
    assert not (tmp_path / "runs").exists()


def test_trackers_can_be_turned_off(tiny_run_config, tmp_path):
    from continual_lora.runner import run

    cfg = load_run_config(None, data=tiny_run_config(train={
        "lr": 1e-2, "batch_size": 8, "max_steps": 2, "trackers": []}))
    result = run(cfg, echo=lambda _: None)
    assert not (result.run_dir / "tensorboard").exists()
    assert (result.run_dir / "log.jsonl").stat().st_size > 0
