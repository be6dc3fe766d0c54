"""Every chapter as a learner meets it: opened in JupyterLab in a real Chromium, Run All, no errors,
and every widget redraws its picture when any of its controls changes.

nbval proves that the cells run, but it has no widget manager and no browser, so it cannot tell
whether a slider redraws anything. These tests can. Chapters and widgets are discovered, not listed:
every ``notebooks/NN_*.ipynb``, and after Run All every ``.widget-interact`` container in the page
(what ``ipywidgets.interact`` draws). Each control is changed the way a learner would: keyboard on a
slider's handle, a new option in a dropdown, a click on a checkbox or toggle. After each change the
``<img>`` in the widget's output must differ from before (a slider or dropdown may take up to
``MAX_STEPS`` steps: some controls are quantised, e.g. denoising groups = dn_number // boxes).
Screenshots of each widget before and after each change go to ``test-output/browser/<chapter>/``;
``<chapter>.json`` there lists what was tested.

Run: ``.venv/bin/python -m pytest -m browser tests/browser`` (needs /usr/bin/chromium, playwright).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

RUN_ALL_TIMEOUT_S = 900  # one chapter's Run All on 2 busy cores
REDRAW_TIMEOUT_S = 60  # one widget redraw
MAX_STEPS = 5  # slider/dropdown steps tried before a control counts as not redrawing
STEP_WAIT_S = 4  # wait this long for a redraw before stepping again

# True once the kernel exists and is idle. The status bar reads "Python 3 (ipykernel) | Idle"; the
# toolbar's circle says idle before a kernel even exists, so it is not used.
KERNEL_IDLE_JS = r"""() => {
  const bar = document.querySelector('#jp-main-statusbar');
  return !!bar && /\(ipykernel\)\s*\|\s*Idle/.test(bar.innerText);
}"""

# Run All has finished when no cell waits or runs ("[*]:") and the kernel is idle again.
RUN_FINISHED_JS = r"""() => {
  const bar = document.querySelector('#jp-main-statusbar');
  if (!bar || !/\(ipykernel\)\s*\|\s*Idle/.test(bar.innerText)) return false;
  const prompts = Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt'));
  return prompts.length > 0 && prompts.every(p => !p.innerText.includes('*'));
}"""

# Error outputs anywhere in the notebook (tracebacks; stderr such as warnings).
ERRORS_JS = r"""() => Array.from(document.querySelectorAll(
    '.jp-Notebook [data-mime-type="application/vnd.jupyter.error"],' +
    '.jp-Notebook [data-mime-type="application/vnd.jupyter.stderr"]'))
  .map(e => e.innerText.slice(0, 2000))"""

# A short fingerprint of the pictures in a widget's output area (their src), and how many there are.
PICTURE_JS = r"""(box) => {
  const out = box.querySelector('.widget-output') || box;
  const srcs = Array.from(out.querySelectorAll('img')).map(i => i.getAttribute('src') || '');
  let h = 2166136261;
  const s = srcs.join('|');
  for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 16777619) >>> 0; }
  return {count: srcs.length, hash: h.toString(16) + ':' + s.length};
}"""


def _wait(page, js: str, timeout_s: float, arg=None, what: str = "") -> None:
    try:
        page.wait_for_function(js, arg=arg, timeout=timeout_s * 1000, polling=250)
    except Exception as error:  # playwright TimeoutError: say what we waited for
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from error


def _redrawn(page, box, before: dict, timeout_s: float) -> bool:
    """Wait for the widget's picture to differ from ``before`` (then for an idle kernel)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = page.evaluate(PICTURE_JS, box)
        if now["count"] > 0 and now["hash"] != before["hash"]:
            _wait(page, KERNEL_IDLE_JS, REDRAW_TIMEOUT_S, what="the kernel to be idle again")
            return True
        time.sleep(0.25)
    return False


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:40] or "control"


def _open_and_run_all(page, lab, notebook: str) -> float:
    """Open a chapter in a fresh workspace, wait for a real idle kernel, Run All; seconds taken."""
    workspace = _slug(notebook)
    page.goto(f"{lab.url}/lab/workspaces/{workspace}/tree/notebooks/{notebook}?reset&token={lab.token}")
    _wait(page, KERNEL_IDLE_JS, 180, what="the status bar to read '(ipykernel) | Idle'")
    start = time.monotonic()
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    # The first prompt turns to [*] (or straight to a number) once the run has started.
    _wait(
        page,
        r"""() => { const p = document.querySelector('.jp-Notebook .jp-CodeCell .jp-InputPrompt');
                    return !!p && /\[(\*|\d+)\]/.test(p.innerText); }""",
        60,
        what="Run All to start",
    )
    _wait(page, RUN_FINISHED_JS, RUN_ALL_TIMEOUT_S, what="Run All to finish")
    return time.monotonic() - start


def _controls(box) -> list[tuple[str, str, object]]:
    """(kind, label, element) for each control of an interact container, in order."""
    kinds = ("slider", "dropdown", "checkbox", "toggle-buttons", "toggle-button", "radio-box", "text")
    found = []
    for control in box.query_selector_all(", ".join(f".widget-{k}" for k in kinds)):
        if control.evaluate("e => !!e.parentElement.closest('.widget-toggle-buttons, .widget-radio-box')"):
            continue  # a button inside a ToggleButtons group is changed through the group
        classes = (control.get_attribute("class") or "").split()
        kind = next(k for k in kinds if f"widget-{k}" in classes)
        # a Checkbox has an empty (zero-width space) .widget-label and its description elsewhere
        texts = [
            e.inner_text().strip("\u200b \n")
            for e in control.query_selector_all(".widget-label, .widget-label-basic")
        ]
        label = next((t for t in texts if t), "") or control.inner_text().strip("\u200b \n")
        found.append((kind, label, control))
    return found


def _change(page, kind: str, control) -> str:
    """Change one control as a learner would; returns what was done."""
    if kind == "slider":
        handle = control.query_selector(".noUi-handle")
        now, high = handle.get_attribute("aria-valuenow"), handle.get_attribute("aria-valuemax")
        key = (
            "ArrowLeft"
            if now is not None and high is not None and float(now) >= float(high)
            else "ArrowRight"
        )
        readout = control.query_selector(".widget-readout")
        before = readout.inner_text() if readout else ""
        handle.focus()
        page.keyboard.press(key)
        after = readout.inner_text() if readout else ""
        return f"{key} on handle: {before} -> {after}"
    if kind == "dropdown":
        select = control.query_selector("select")
        options = select.eval_on_selector_all("option", "os => os.map(o => o.value)")
        current = select.eval_on_selector("option:checked", "o => o.value")
        new = options[(options.index(current) + 1) % len(options)]
        select.select_option(value=new)
        return f"select {current!r} -> {new!r}"
    if kind == "checkbox":
        box = control.query_selector("input[type=checkbox]")
        before = box.is_checked()
        box.click()
        return f"click: {before} -> {box.is_checked()}"
    if kind == "toggle-button":
        control.click()
        return "click"
    if kind in ("toggle-buttons", "radio-box"):
        choices = control.query_selector_all("button, input[type=radio]")
        pressed = [
            i
            for i, c in enumerate(choices)
            if "mod-active" in (c.get_attribute("class") or "") or c.is_checked() is True
        ]
        target = choices[((pressed[0] if pressed else -1) + 1) % len(choices)]
        target.click()
        return "click next choice"
    raise AssertionError(f"no way to change a {kind} control yet: extend _change()")


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_and_widgets_redraw(chapter: Path, page, lab, output_dir: Path) -> None:
    shots = output_dir / chapter.stem
    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("*.png"):
        old.unlink()
    report: dict = {"chapter": chapter.name, "widgets": []}

    report["run_all_s"] = round(_open_and_run_all(page, lab, chapter.name), 1)
    page.screenshot(path=str(shots / "notebook.png"))
    errors = page.evaluate(ERRORS_JS)
    assert not errors, f"{chapter.name}: error output after Run All:\n" + "\n---\n".join(errors)
    prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt").all_inner_texts()
    not_run = [i for i, p in enumerate(prompts) if not re.search(r"\[\d+\]", p)]
    assert not not_run, f"{chapter.name}: code cells {not_run} did not run (prompts {prompts})"

    failures = []
    boxes = page.query_selector_all(".jp-OutputArea-output .widget-interact")
    for w, box in enumerate(boxes):
        box.scroll_into_view_if_needed()
        _wait(
            page,
            r"(box) => { const f = " + PICTURE_JS + r"; return f(box).count > 0; }",
            REDRAW_TIMEOUT_S,
            arg=box,
            what=f"widget {w}'s first picture",
        )
        box.screenshot(path=str(shots / f"widget{w}_0_initial.png"))
        widget = {"index": w, "controls": []}
        controls = _controls(box)
        if not controls:
            failures.append(f"{chapter.name} widget {w}: no control found to change")
        for c, (kind, label, control) in enumerate(controls, start=1):
            before = page.evaluate(PICTURE_JS, box)
            start = time.monotonic()
            control.scroll_into_view_if_needed()
            # A control may be quantised (e.g. denoising groups = dn_number // boxes): a slider or
            # dropdown is stepped again, up to MAX_STEPS, while the redrawn picture stays the same.
            steps = MAX_STEPS if kind in ("slider", "dropdown") else 1
            changed, actions = False, []
            for step in range(1, steps + 1):
                actions.append(_change(page, kind, control))
                last = step == steps
                changed = _redrawn(page, box, before, REDRAW_TIMEOUT_S if last else STEP_WAIT_S)
                if changed:
                    break
            entry = {"control": label, "kind": kind, "action": "; ".join(actions), "steps": len(actions)}
            entry["redrawn"] = changed
            if not changed:
                failures.append(
                    f"{chapter.name} widget {w}: control {label!r} ({'; '.join(actions)}) did not change "
                    f"the picture within {REDRAW_TIMEOUT_S} s"
                )
            entry["seconds"] = round(time.monotonic() - start, 2)
            box.screenshot(path=str(shots / f"widget{w}_{c}_{_slug(label)}_after.png"))
            widget["controls"].append(entry)
        report["widgets"].append(widget)

    errors = page.evaluate(ERRORS_JS)
    (shots / f"{chapter.stem}.json").write_text(json.dumps(report, indent=1))
    assert not errors, f"{chapter.name}: error output after using the widgets:\n" + "\n---\n".join(errors)
    assert not failures, "\n".join(failures)
