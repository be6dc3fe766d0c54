"""The widgets that are operated with the mouse on the picture itself, in a real JupyterLab + Chromium.

``test_chapters.py`` drives every ``interact`` widget through its controls; the widgets here are
package classes (chapter 02's sampling microscope, chapter 04's encoder-pixel and decoder-query views)
that listen to mouse down / move / up on their picture (``ipyevents``). Each test runs its chapter,
then uses every control as a learner would -- a press, a drag and a release on the canvas, a click on a
pixel, keyboard on sliders, a new dropdown option, a checkbox, the toggle buttons, the reset button --
and asserts after each that the picture changed *and* that the numbers printed under it changed the
way that action should change them.

Run: ``.venv/bin/python -m pytest -m browser tests/browser`` (needs /usr/bin/chromium, playwright).
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import pytest
from test_chapters import ERRORS_JS, KERNEL_IDLE_JS, _open_and_run_all, _wait

pytestmark = pytest.mark.browser

PICTURE_JS = r"""(box) => {
  const imgs = Array.from(box.querySelectorAll('img'));
  const out = box.querySelector('.widget-output');
  return {src: imgs.map(i => i.getAttribute('src') || '').join('|'), text: out ? out.innerText : '',
          sizes: imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.clientWidth, i.clientHeight])};
}"""
# Every picture decoded and not blank: drawn onto a canvas, its pixels are not all the same.
LOADED_JS = r"""(b) => Array.from(b.querySelectorAll('img')).every(i => {
  if (!i.complete || i.naturalWidth === 0) return false;
  const c = document.createElement('canvas');
  c.width = i.naturalWidth; c.height = i.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(i, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  const seen = new Set();
  for (let k = 0; k < d.length; k += 4 * 97) seen.add((d[k] << 16) | (d[k + 1] << 8) | d[k + 2]);
  return seen.size > 20;
})"""
TIMEOUT_S = 60
# The first picture's bytes, base64, fetched back from its blob URL.
BLOB_JS = r"""async (b) => {
  const bytes = new Uint8Array(await (await fetch(b.querySelector('img').src)).arrayBuffer());
  let s = '';
  for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
  return btoa(s);
}"""
FAILURES = Path(__file__).resolve().parents[2] / "test-output" / "browser" / "failures"


def _state(page, box) -> dict:
    return page.evaluate(PICTURE_JS, box)


def _keep_failure(page, box, what: str) -> str:
    """Save the widget's screenshot and the PNG the browser holds (as the kernel sent it); say where."""
    stem = FAILURES / re.sub(r"[^a-z0-9]+", "_", what)
    stem.parent.mkdir(parents=True, exist_ok=True)
    box.screenshot(path=f"{stem}.png")
    png = page.evaluate(BLOB_JS, box)
    Path(f"{stem}.sent.png").write_bytes(base64.b64decode(png))
    sizes = _state(page, box)["sizes"]
    return f"images (complete, natural w, h, client w, h): {sizes}; saved {stem}.png and {stem}.sent.png"


def _changed(page, box, before: dict, what: str, *, text_must_change: bool = True) -> dict:
    """Wait until the picture (and the printed text) differ from ``before``; the new state."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        now = _state(page, box)
        if (
            now["src"]
            and now["src"] != before["src"]
            and (now["text"] != before["text"] or not text_must_change)
        ):
            _wait(page, KERNEL_IDLE_JS, TIMEOUT_S, what="the kernel to be idle again")
            time.sleep(1.0)  # the last redraw of a burst of events
            try:
                _wait(page, LOADED_JS, TIMEOUT_S, arg=box, what=f"{what}: the new picture to load")
            except AssertionError as error:
                raise AssertionError(f"{error}; {_keep_failure(page, box, what)}") from error
            return _state(page, box)
        time.sleep(0.25)
    raise AssertionError(f"{what}: the picture or the printed numbers did not change within {TIMEOUT_S} s")


def _shot(page, box, path: str) -> None:
    """A screenshot of the widget, with the pointer moved off it first."""
    page.mouse.move(1, 1)
    time.sleep(0.5)
    box.screenshot(path=path)


def _number(text: str, pattern: str) -> tuple[float, ...]:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the printed numbers:\n{text}"
    return tuple(float(v) for v in match.groups())


def _at(page, image, fx: float, fy: float) -> tuple[float, float]:
    """Screen position of the fraction (fx, fy) of the image (0, 0 top-left)."""
    box = image.bounding_box()
    return box["x"] + fx * box["width"], box["y"] + fy * box["height"]


def _slider_key(page, box, description: str, key: str = "ArrowRight") -> None:
    slider = box.query_selector(f".widget-slider:has(.widget-label:text-is('{description}'))")
    assert slider is not None, f"no slider {description!r}"
    handle = slider.query_selector(".noUi-handle")
    handle.focus()
    page.keyboard.press(key)


def _select_next(box, description: str) -> str:
    select = box.query_selector(f".widget-dropdown:has(.widget-label:text-is('{description}')) select")
    assert select is not None, f"no dropdown {description!r}"
    options = select.eval_on_selector_all("option", "os => os.map(o => o.value)")
    current = select.eval_on_selector("option:checked", "o => o.value")
    new = options[(options.index(current) + 1) % len(options)]
    select.select_option(value=new)
    return new


def _widget(page, css: str, shots: Path, name: str):
    box = page.query_selector(f".jp-OutputArea-output {css}")
    assert box is not None, f"no {css} widget in the page"
    box.scroll_into_view_if_needed()
    _wait(
        page,
        r"(b) => !!b.querySelector('img') && !!b.querySelector('img').getAttribute('src')",
        TIMEOUT_S,
        arg=box,
        what=f"the first picture of {name}",
    )
    _shot(page, box, str(shots / f"{name}_0_initial.png"))
    return box


def _run(page, lab, notebook: str, output_dir: Path) -> Path:
    shots = output_dir / f"direct_{Path(notebook).stem}"
    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("*.png"):
        old.unlink()
    _open_and_run_all(page, lab, notebook)
    errors = page.evaluate(ERRORS_JS)
    assert not errors, f"{notebook}: error output after Run All:\n" + "\n---\n".join(errors)
    return shots


def test_sampling_microscope_drag_sliders_and_query_mode(page, lab, output_dir: Path) -> None:
    shots = _run(page, lab, "02_deformable_sampling.ipynb", output_dir)
    box = _widget(page, ".detr-edu-microscope", shots, "microscope")
    image = box.query_selector("img.detr-edu-canvas")
    state = _state(page, box)

    # press in the level-1 panel (top row, second of four), drag right, release: the nearest point follows
    x0, y0 = _at(page, image, 1.5 / 4, 0.3)
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k in range(1, 6):
        page.mouse.move(x0 + k * 4, y0, steps=2)
    page.mouse.up()
    state = _changed(page, box, state, "drag on level 1")
    assert _number(state["text"], r"level (\d)") == (1.0,), state["text"]
    x_first = _number(state["text"], r"location \(x, y\) = \(([-\d.]+), ([-\d.]+)\)")[0]
    _shot(page, box, str(shots / "microscope_1_drag.png"))
    # the same point dragged further right lands further right
    page.mouse.move(x0 + 20, y0)
    page.mouse.down()
    page.mouse.move(x0 + 45, y0, steps=4)
    page.mouse.up()
    state = _changed(page, box, state, "second drag on level 1")
    x_second = _number(state["text"], r"location \(x, y\) = \(([-\d.]+), ([-\d.]+)\)")[0]
    assert x_second > x_first + 0.02, (x_first, x_second)
    _shot(page, box, str(shots / "microscope_2_drag_further.png"))

    # every slider edits or selects, and the printed numbers say so
    for description, pattern in (
        ("dx (px)", r"offset \(([-+\d.]+), [-+\d.]+\)"),
        ("dy (px)", r"offset \([-+\d.]+, ([-+\d.]+)\)"),
        ("weight", r"weight ([\d.]+)\n"),
        ("point", r"point (\d):"),
        ("level", r"level (\d) \("),
        ("head", r"^head (\d),"),
    ):
        before = _number(state["text"], f"(?m){pattern}")
        high = box.query_selector(f".widget-slider:has(.widget-label:text-is('{description}')) .noUi-handle")
        at_max = float(high.get_attribute("aria-valuenow")) >= float(high.get_attribute("aria-valuemax"))
        _slider_key(page, box, description, "ArrowLeft" if at_max else "ArrowRight")
        state = _changed(page, box, state, f"slider {description}")
        assert _number(state["text"], f"(?m){pattern}") != before, (description, state["text"])
        _shot(page, box, str(shots / f"microscope_slider_{re.sub(r'[^a-z]', '', description)}.png"))

    # reset: back to the layer's own prediction
    assert "prediction| = 0.0000" not in state["text"]
    box.query_selector('button:text-is("reset to the layer\'s prediction")').click()
    state = _changed(page, box, state, "reset")
    assert "prediction| = 0.0000" in state["text"]

    # the other mode: a click moves the query, and the layer predicts a new pattern there
    query_before = _number(state["text"], r"query at \(x, y\) = \(([\d.]+), ([\d.]+)\)")
    box.query_selector(".widget-toggle-buttons button:text-is('move the query')").click()
    state = _changed(page, box, state, "mode toggle", text_must_change=False)
    page.mouse.click(*_at(page, image, 0.5 / 4 + 0.06, 0.36))
    state = _changed(page, box, state, "click in query mode")
    query_after = _number(state["text"], r"query at \(x, y\) = \(([\d.]+), ([\d.]+)\)")
    assert query_after[0] > query_before[0] + 0.05, (query_before, query_after)
    _shot(page, box, str(shots / "microscope_3_query_moved.png"))
    errors = page.evaluate(ERRORS_JS)
    assert not errors, "\n".join(errors)


def test_trained_detector_views_click_a_pixel_and_pick_a_query(page, lab, output_dir: Path) -> None:
    shots = _run(page, lab, "04_forward_pass.ipynb", output_dir)

    # encoder view: a click on a pixel of level 0, then every control
    box = _widget(page, ".detr-edu-encoder-view", shots, "encoder")
    image = box.query_selector("img.detr-edu-canvas")
    state = _state(page, box)
    page.mouse.click(*_at(page, image, 0.5 / 4, 0.5))
    state = _changed(page, box, state, "click on a level-0 pixel")
    assert _number(state["text"], r"level (\d) \(") == (0.0,), state["text"]
    _shot(page, box, str(shots / "encoder_1_click.png"))
    page.mouse.click(*_at(page, image, 2.5 / 4, 0.5))  # a pixel of level 2
    state = _changed(page, box, state, "click on a level-2 pixel")
    assert _number(state["text"], r"level (\d) \(") == (2.0,)
    box.query_selector(".widget-checkbox input[type=checkbox]").click()  # compare with the initial ring
    state = _changed(page, box, state, "ring checkbox", text_must_change=False)
    _shot(page, box, str(shots / "encoder_2_ring.png"))
    layers = box.query_selector_all(".widget-toggle-buttons button")
    before = _number(state["text"], r"encoder layer (\d)")
    next(b for b in layers if "mod-active" not in (b.get_attribute("class") or "")).click()
    state = _changed(page, box, state, "encoder layer toggle")
    assert _number(state["text"], r"encoder layer (\d)") != before
    _select_next(box, "head")
    state = _changed(page, box, state, "head dropdown", text_must_change=False)
    shares = _number(state["text"], r"L0 ([\d.]+), L1 ([\d.]+)")
    _select_next(box, "scene")
    state = _changed(page, box, state, "scene dropdown")
    assert _number(state["text"], r"L0 ([\d.]+), L1 ([\d.]+)") != shares
    _shot(page, box, str(shots / "encoder_3_scene.png"))

    # decoder view: a query, the head, the scene
    box = _widget(page, ".detr-edu-decoder-view", shots, "decoder")
    state = _state(page, box)
    assert "matched to target" in state["text"], state["text"]  # a matched query by default
    first = _number(state["text"], r"^query (\d+)")
    new = _select_next(box, "query")  # the next query in the list
    state = _changed(page, box, state, "query dropdown")
    assert _number(state["text"], r"^query (\d+)") != first, (new, state["text"])
    _shot(page, box, str(shots / "decoder_1_query.png"))
    _select_next(box, "head")
    state = _changed(page, box, state, "head dropdown", text_must_change=False)
    _select_next(box, "scene")
    state = _changed(page, box, state, "scene dropdown")
    assert "matched to target 0" in state["text"], state["text"]  # a new scene starts at its first digit
    _shot(page, box, str(shots / "decoder_2_scene.png"))
    errors = page.evaluate(ERRORS_JS)
    assert not errors, "\n".join(errors)
