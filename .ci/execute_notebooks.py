"""Re-execute chapters in place, saving their outputs (the course ships executed notebooks).

Why not plain ``jupyter nbconvert --execute``: nbclient mirrors ipywidgets' Output widgets by sending
comm messages back to the kernel while a cell runs, and with ``ipywidgets.interact`` that exchange
sometimes never finishes (the run hangs at the widget cell; with ``store_widget_state=False`` it
raises a KeyError instead). Here comm messages are ignored: the widget's first picture is then
recorded as an ordinary cell output, which is also what a reader without a kernel wants to see.
Widgets themselves are exercised in a real JupyterLab by the browser tests (``tests/browser``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


class _NoCommClient(NotebookClient):
    def handle_comm_msg(self, outs, msg, cell_index):  # noqa: D401 - see module docstring
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per cell")
    args = parser.parse_args()
    for path in args.notebooks:
        start = time.perf_counter()
        nb = nbformat.read(path, as_version=4)
        _NoCommClient(
            nb,
            timeout=args.timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        ).execute()
        nbformat.write(nb, path)
        print(f"{path}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
