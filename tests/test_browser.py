"""The HTML report in a real browser: Playwright driving headless Chromium.

The reports are made once per session with the real tool (``layerdiff report`` on the bundled
samples). Chromium is the Debian package (``apt-get install chromium``), never a browser that
``playwright install`` downloads. Without it, or without the ``playwright`` package, every test
here is skipped with the reason. ``LAYERDIFF_CHROMIUM`` points at another Chromium binary (or at
a missing path, to check the skip).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
CHROMIUM = os.environ.get("LAYERDIFF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
FD_MODULE = "upsampler"  # where compact_x4_dcr.onnx first diverges (DepthToSpace in DCR order)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the whole module; skips every test when it cannot start."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"chromium not found at {CHROMIUM}: apt-get install chromium")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright not installed: pip install -e '.[test]'")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def reports(browser, tmp_path_factory):
    """name -> HTML path: 'diverged' and 'pass' from the CLI, 'previews' with inline images.

    The two CLI runs go in parallel. The pipeline never attaches previews (only the Python
    API does), so 'previews' is the diverged diagnosis with two heat maps added.
    """
    folder = tmp_path_factory.mktemp("browser-reports")
    exe = [sys.executable, "-c", "import sys; from layerdiff.cli import main; sys.exit(main())"]
    runs = {
        "diverged": ("compact_x4_dcr.onnx", 1),
        "pass": ("compact_x4.onnx", 0),
    }
    procs = {
        name: subprocess.Popen(
            exe + ["report", str(SAMPLES / "compact_x4.pth"), "--onnx", str(SAMPLES / onnx),
                   "-o", str(folder / f"{name}.html"), "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, (onnx, _) in runs.items()
    }

    from layerdiff import render
    from layerdiff.pipeline import diagnose

    d = diagnose(SAMPLES / "compact_x4.pth", SAMPLES / "compact_x4_dcr.onnx",
                 output_dir=folder, check_sizes=())
    rng = np.random.default_rng(0)
    d = dataclasses.replace(d, previews={
        "|diff| upsampler": np.abs(rng.normal(size=(3, 32, 32))) * 0.1,
        "torch upsampler": rng.normal(size=(16, 24)),
    })
    paths = {"previews": render.write_html(d, folder / "previews.html")}

    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == runs[name][1], out
        paths[name] = folder / f"{name}.html"
    return paths


class Loaded:
    """A page opened on a report, with what the page logged and requested."""

    def __init__(self, page, path: Path):
        self.page, self.url = page, path.as_uri()
        self.errors: list[str] = []
        self.requests: list[str] = []
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("request", lambda r: self.requests.append(r.url))
        page.goto(self.url, wait_until="load")

    def visible_ids(self) -> list[str]:
        return self.page.eval_on_selector_all(
            "#layer-table tbody tr", "rs => rs.filter(r => !r.hidden).map(r => r.id)")

    def column(self, col: int) -> list[float | None]:
        """data-v of column ``col`` in the current row order."""
        return self.page.eval_on_selector_all(
            "#layer-table tbody tr",
            "(rs, c) => rs.map(r => { const v = r.cells[c].getAttribute('data-v');"
            " return v === null || v === '' ? null : parseFloat(v); })", col)


@pytest.fixture
def open_report(browser, reports):
    """open_report(name) -> Loaded; each test gets a fresh context (clean URL hash, no state)."""
    contexts = []

    def open_(name: str) -> Loaded:
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        contexts.append(ctx)
        return Loaded(ctx.new_page(), reports[name])

    yield open_
    for ctx in contexts:
        ctx.close()


def header_index(r: Loaded, label: str) -> int:
    labels = r.page.eval_on_selector_all(
        "#layer-table thead th", "ths => ths.map(t => t.textContent.trim())")
    return labels.index(label)


@pytest.mark.parametrize("name", ["diverged", "pass", "previews"])
def test_loads_without_errors_or_network(open_report, name):
    r = open_report(name)
    r.page.wait_for_timeout(200)  # let late errors (timers, images) arrive
    assert r.errors == []
    assert r.page.locator("#layer-table tbody tr").count() == 20
    # self-contained: the file itself and nothing else (inline images are data: URIs)
    assert [u for u in r.requests if u != r.url and not u.startswith("data:")] == []
    assert r.url in r.requests


@pytest.mark.parametrize("name, badge", [("diverged", "DIVERGED"), ("pass", "PASS")])
def test_verdict_banner(open_report, name, badge):
    r = open_report(name)
    banner = r.page.locator("header#verdict")
    assert banner.locator(".badge").inner_text().strip() == badge
    assert r.page.title().startswith(f"layerdiff: {badge}")
    if name == "diverged":
        assert "v-diverged" in banner.get_attribute("class")
        assert FD_MODULE in banner.locator(".summary").inner_text()
    else:
        assert "v-pass" in banner.get_attribute("class")
        assert "agrees with PyTorch" in banner.locator(".summary").inner_text()


def test_sort_by_numeric_column(open_report):
    r = open_report("diverged")
    index_col, err_col = header_index(r, "#"), header_index(r, "max abs")
    assert r.column(index_col) == list(range(20))  # execution order at load
    before = r.column(err_col)

    th = r.page.locator("#layer-table thead th").nth(err_col)
    th.click()
    assert th.get_attribute("aria-sort") == "ascending"
    up = r.column(err_col)
    values = [v for v in up if v is not None]
    assert values == sorted(values) and up[len(values):] == [None] * (len(up) - len(values))
    assert sorted(values) == sorted(v for v in before if v is not None)
    assert r.column(index_col) != list(range(20))  # the rows really moved

    th.click()
    assert th.get_attribute("aria-sort") == "descending"
    down = [v for v in r.column(err_col) if v is not None]
    assert down == sorted(values, reverse=True)
    # the diverging layer has the largest error: first row when sorted descending
    assert r.page.locator("#layer-table tbody tr").first.get_attribute("id") == "layer-19"

    # sorting by '#' twice gives reverse execution order; only one header is marked sorted
    idx_th = r.page.locator("#layer-table thead th").nth(index_col)
    idx_th.click()
    assert r.column(index_col) == list(range(20))
    idx_th.click()
    assert r.column(index_col) == list(range(19, -1, -1))
    assert th.get_attribute("aria-sort") is None


def test_filter_box(open_report):
    r = open_report("diverged")
    count = r.page.locator("#layer-count")
    assert count.inner_text() == "20 rows"
    r.page.fill("#layer-filter", FD_MODULE)
    shown = r.visible_ids()
    assert shown and len(shown) < 20
    for row_id in shown:
        assert FD_MODULE in r.page.locator(f"#{row_id}").inner_text().lower()
    assert count.inner_text() == f"{len(shown)} of 20 rows"
    assert r.page.locator("#layer-19").is_visible()
    assert not r.page.locator("#layer-0").is_visible()

    r.page.fill("#layer-filter", "no-such-layer-xyz")
    assert r.visible_ids() == [] and count.inner_text() == "0 of 20 rows"
    r.page.fill("#layer-filter", "")
    assert len(r.visible_ids()) == 20 and count.inner_text() == "20 rows"


@pytest.mark.parametrize("name, failing", [("diverged", ["layer-19"]), ("pass", [])])
def test_failing_only_checkbox(open_report, name, failing):
    r = open_report(name)
    r.page.check("#layer-fail")
    assert r.visible_ids() == failing
    for row_id in failing:
        assert "s-fail" in r.page.locator(f"#{row_id}").get_attribute("class")
    r.page.uncheck("#layer-fail")
    assert len(r.visible_ids()) == 20


def test_first_divergence_link(open_report):
    from playwright.sync_api import expect

    r = open_report("diverged")
    # hide the target row first: following the link must reveal it again
    r.page.fill("#layer-filter", "conv")
    assert not r.page.locator("#layer-19").is_visible()

    link = r.page.locator("#first-divergence p.jump a")
    assert link.get_attribute("href") == "#layer-19"
    link.click()
    r.page.wait_for_function("location.hash === '#layer-19'")
    row = r.page.locator("#layer-19")
    expect(row).to_be_visible()
    expect(row).to_be_in_viewport()
    assert FD_MODULE in row.locator("td").nth(1).inner_text()
    assert "first" in row.get_attribute("class")
    assert row.evaluate("el => el.matches(':target')")
    # tr:target highlights the row
    assert row.locator("td").first.evaluate("td => getComputedStyle(td).backgroundColor") == \
        "rgb(255, 243, 191)"
    assert r.page.input_value("#layer-filter") == ""
    assert len(r.visible_ids()) == 20
    assert r.errors == []


def _check_chart(r: Loaded) -> None:
    svg = r.page.locator("#chart-svg")
    assert svg.is_visible()
    box = svg.bounding_box()
    assert box and box["width"] > 100 and box["height"] > 50
    trend = svg.locator("path.trend")
    assert trend.count() == 1 and len(trend.get_attribute("d") or "") > 10
    assert trend.bounding_box()["width"] > 0
    dots = svg.locator("g.dots path")
    assert dots.count() >= 1
    assert all(len(d or "") > 0 for d in dots.evaluate_all("ps => ps.map(p => p.getAttribute('d'))"))


def _check_images(r: Loaded) -> int:
    imgs = r.page.locator("img")
    for img in imgs.all():
        img.scroll_into_view_if_needed()
        ok = img.evaluate("i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0")
        assert ok, img.get_attribute("alt")
        assert img.get_attribute("src").startswith("data:image/png;base64,")
    return imgs.count()


@pytest.mark.parametrize("name", ["diverged", "pass"])
def test_chart_and_images_render(open_report, name):
    r = open_report(name)
    _check_images(r)  # CLI reports carry no previews today; any that appear must decode
    _check_chart(r)
    if name == "diverged":
        assert r.page.locator("#chart-svg line.fd-line").count() == 1


def test_preview_images_render(open_report):
    r = open_report("previews")
    _check_images(r)
    assert r.page.locator(".previews img").count() == 2
    # each with its labelled colour scale: 0 … max for |diff|, min … max otherwise
    bars = r.page.locator(".previews .cbar")
    assert bars.count() == 2
    assert bars.nth(0).locator("span").all_inner_texts()[0] == "0"
    assert bars.nth(0).locator("i").bounding_box()["width"] > 100
    assert r.errors == []


def _visibility(locator) -> str:
    return locator.evaluate("e => getComputedStyle(e).visibility")


@pytest.mark.parametrize("name", ["diverged", "pass"])
def test_pictures_render_and_flip_in_place(open_report, name):
    r = open_report(name)
    section = r.page.locator("#pictures")
    section.scroll_into_view_if_needed()
    assert section.is_visible()
    assert "photo (bundled)" in section.locator(".pic h3").first.inner_text()
    assert "PSNR" in section.inner_text() and "SSIM" in section.inner_text()
    images = section.locator("img")
    assert images.count() == 9  # input, PyTorch, ONNX, |diff|; flip pair; crop pair; crop |diff|
    for img in images.all():
        img.scroll_into_view_if_needed()
        assert img.evaluate("i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0"), \
            img.get_attribute("alt")
    assert "×" in section.locator("figcaption").nth(3).inner_text()  # the amplification

    flip = section.locator(".flip").first
    crop = flip.locator(".flip-stack").nth(1)
    torch_img, onnx_img = crop.locator("img.flip-torch"), crop.locator("img.flip-onnx")
    box = crop.bounding_box()
    shown = lambda: r.page.evaluate(  # noqa: E731
        "([x, y]) => document.elementFromPoint(x, y).className",
        [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
    button = flip.locator(".flip-btn")
    assert (_visibility(torch_img), _visibility(onnx_img)) == ("visible", "hidden")
    assert shown() == "flip-torch" and button.get_attribute("aria-pressed") == "false"
    button.click()
    assert (_visibility(torch_img), _visibility(onnx_img)) == ("hidden", "visible")
    assert shown() == "flip-onnx" and button.get_attribute("aria-pressed") == "true"
    assert flip.locator(".flip-label").inner_text() == "ONNX"
    # the keyboard flips it too
    button.focus()
    r.page.keyboard.press("Enter")
    assert shown() == "flip-torch"
    r.page.keyboard.press("Space")
    assert shown() == "flip-onnx"
    # offline: the pictures are inline, nothing was fetched
    assert [u for u in r.requests if u != r.url and not u.startswith("data:")] == []
    assert r.errors == []
