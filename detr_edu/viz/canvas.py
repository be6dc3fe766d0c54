"""A matplotlib figure you can click and drag on, in JupyterLab: the figure is rendered to a PNG shown
in an ``ipywidgets.Image``, and ``ipyevents`` sends the mouse events on that image back to Python.

The one piece of logic here is the geometry: a PNG rendered at a known dpi *without* a tight bounding
box keeps matplotlib's display coordinates, so a pixel of the PNG maps back to the data coordinates
of the axes under it (:meth:`FigureGeometry.locate`). Everything that decides what a click *does*
lives in the views that use this canvas, as plain methods tested without a browser.

One lock, :data:`WIDGET_LOCK`, serialises everything a view does: in JupyterLab with ipykernel 7 the
callbacks of one view ran on two different threads during a drag, and matplotlib is not
thread-safe. Without the lock, two redraws overlapped in time and the PNG shipped to the browser
came out with only the titles drawn (seen in the browser tests: 4.7 KB instead of 80 KB).
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass

import ipywidgets as widgets
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["AxesHit", "FigureGeometry", "render_figure", "ClickableFigure", "WIDGET_LOCK", "serialised"]

WIDGET_LOCK = threading.RLock()  # re-entrant: a mouse handler redraws, and the redraw renders


def serialised(callback: Callable) -> Callable:
    """``callback`` run while holding :data:`WIDGET_LOCK` (for a view's observers and buttons)."""

    @functools.wraps(callback)
    def run(*args, **kwargs):
        with WIDGET_LOCK:
            return callback(*args, **kwargs)

    return run


@dataclass(frozen=True)
class AxesHit:
    """Where a PNG pixel falls: which axes (its ``gid``, or its index in the figure) and the data (x, y)."""

    name: str
    x: float
    y: float


@dataclass(frozen=True)
class FigureGeometry:
    """What is needed to map PNG pixels back to data coordinates.

    Attributes:
        width, height: PNG size in pixels.
        axes: (name, display bbox (x0, y0, x1, y1) in pixels from the bottom-left, inverse data
            transform) per axes, in drawing order.
    """

    width: int
    height: int
    axes: tuple[tuple[str, tuple[float, float, float, float], object], ...]

    def locate(self, px: float, py: float) -> AxesHit | None:
        """The axes under PNG pixel (px, py) (origin top-left, as the browser counts) and the data
        coordinates there; None outside every axes. Later axes win (they are drawn on top)."""
        x_disp, y_disp = px, self.height - py  # matplotlib's display origin is bottom-left
        for name, (x0, y0, x1, y1), inverse in reversed(self.axes):
            if x0 <= x_disp <= x1 and y0 <= y_disp <= y1:
                x, y = inverse.transform((x_disp, y_disp))
                return AxesHit(name=name, x=float(x), y=float(y))
        return None


def render_figure(fig: Figure, *, dpi: int = 80) -> tuple[bytes, FigureGeometry]:
    """Render ``fig`` to PNG bytes at ``dpi`` and return them with the figure's click geometry.

    Axes are named by their ``gid`` (``ax.set_gid("level 0")``) or, without one, by their index.
    """
    if dpi < 10:
        raise ValueError(f"dpi must be >= 10, got {dpi}")
    fig.set_dpi(dpi)
    fig.canvas.draw()  # fixes every transform at this dpi
    width, height = (int(round(v)) for v in fig.canvas.get_width_height())
    axes = []
    for i, ax in enumerate(fig.axes):
        box = ax.bbox
        axes.append((ax.get_gid() or str(i), (box.x0, box.y0, box.x1, box.y1), ax.transData.inverted()))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue(), FigureGeometry(width=width, height=height, axes=tuple(axes))


class ClickableFigure:
    """An ``ipywidgets.Image`` showing a figure, with mouse down / move / up reported as data coordinates.

    ``on_mouse(kind, hit)`` is called with ``kind`` in {"down", "move", "up"} and the
    :class:`AxesHit` under the pointer (None outside the axes); moves are reported only while a
    button is held (a drag), at most every ``move_wait_ms``.

    Args:
        on_mouse: the callback.
        dpi: rendering resolution.
        move_wait_ms: throttle of mouse-move events.
    """

    def __init__(
        self, on_mouse: Callable[[str, AxesHit | None], None], *, dpi: int = 80, move_wait_ms: int = 120
    ) -> None:
        from ipyevents import Event  # imported here: only the widgets need it, not the plotting functions

        self.on_mouse = on_mouse
        self.dpi = dpi
        self.geometry: FigureGeometry | None = None
        self.image = widgets.Image(format="png", layout=widgets.Layout(width="auto"))
        self.image.add_class("detr-edu-canvas")
        self.dragging = False
        # Two listeners: clicks unthrottled (a throttle could drop the mouse-up), moves throttled.
        # prevent_default_action stops the browser from starting its own image drag.
        self._buttons = Event(
            source=self.image, watched_events=["mousedown", "mouseup"], prevent_default_action=True
        )
        self._moves = Event(
            source=self.image,
            watched_events=["mousemove"],
            throttle_or_debounce="throttle",
            wait=move_wait_ms,
            prevent_default_action=True,
        )
        self._buttons.on_dom_event(self._handle)
        self._moves.on_dom_event(self._handle)

    def show(self, fig: Figure) -> None:
        """Render ``fig`` into the image (and close it: the widget keeps only the PNG)."""
        with WIDGET_LOCK:
            png, self.geometry = render_figure(fig, dpi=self.dpi)
            plt.close(fig)
            self.image.value = png

    def hit(self, event: dict) -> AxesHit | None:
        """The axes and data coordinates of a browser event (ipyevents' ``dataX``, ``dataY``: PNG pixels)."""
        if self.geometry is None or "dataX" not in event:
            return None
        return self.geometry.locate(float(event["dataX"]), float(event["dataY"]))

    def _handle(self, event: dict) -> None:
        with WIDGET_LOCK:
            self._dispatch(event)

    def _dispatch(self, event: dict) -> None:
        kind = {"mousedown": "down", "mousemove": "move", "mouseup": "up"}.get(event.get("type", ""))
        if kind is None:
            return
        if kind == "down":
            self.dragging = True
        elif kind == "move" and not (self.dragging and event.get("buttons", 1)):
            return  # a hover, not a drag
        elif kind == "up":
            self.dragging = False
        self.on_mouse(kind, self.hit(event))
