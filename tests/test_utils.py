"""detr_edu.utils.show_source: the lines a chapter prints are the package's own lines, and only a few.

Reference: the source file itself, read line by line at the line numbers ``inspect`` reports.
"""

import inspect
import textwrap
from pathlib import Path

import pytest

from detr_edu.attention import SelfAttention, scaled_dot_product_attention
from detr_edu.box_ops import box_cxcywh_to_xyxy
from detr_edu.matcher import HungarianMatcher
from detr_edu.utils import show_source


def _file_lines(obj) -> list[str]:
    """The object's lines read from its file, at the line range ``inspect`` reports."""
    obj = inspect.unwrap(obj)
    lines, first = inspect.getsourcelines(obj)
    return Path(inspect.getsourcefile(obj)).read_text().splitlines()[first - 1 : first - 1 + len(lines)]


def test_header_names_the_file_and_the_qualified_name() -> None:
    shown = show_source(scaled_dot_product_attention, start="weights = scores", stop="return")
    header = shown.splitlines()[0]
    assert header == "# detr_edu/attention.py: scaled_dot_product_attention"
    assert show_source(SelfAttention.forward, start="qkv =", stop="unbind").splitlines()[0] == (
        "# detr_edu/attention.py: SelfAttention.forward"
    )


def test_whole_function_is_the_file_text_dedented() -> None:
    body = show_source(box_cxcywh_to_xyxy).splitlines()[1:]
    assert body == _file_lines(box_cxcywh_to_xyxy)  # a top-level function: nothing to dedent
    method = show_source(SelfAttention.forward, max_lines=100).splitlines()[1:]
    assert method == textwrap.dedent("\n".join(_file_lines(SelfAttention.forward))).splitlines()
    assert method[0].startswith("def forward(")


def test_start_and_stop_slice_inclusive_and_dedent() -> None:
    shown = show_source(SelfAttention.forward, start="qkv = self.qkv", stop="out = self.proj_drop")
    body = shown.splitlines()[1:]
    file_lines = _file_lines(SelfAttention.forward)
    i = next(n for n, line in enumerate(file_lines) if "qkv = self.qkv" in line)
    j = next(n for n, line in enumerate(file_lines) if "out = self.proj_drop" in line)
    assert body == textwrap.dedent("\n".join(file_lines[i : j + 1])).splitlines()  # the same lines, dedented
    assert body[4].startswith("    scores = scores.masked_fill(mask")  # nested: keeps its own indent
    assert body[0].startswith("qkv = self.qkv(x)") and body[-1].startswith("out = self.proj_drop(")


def test_stop_is_searched_from_the_start_line_on() -> None:
    # "weights" first appears in the signature's docstring; stop must find the line after start
    shown = show_source(scaled_dot_product_attention, start="scores = (q @", stop="weights")
    assert shown.splitlines()[1:] == [
        "scores = (q @ k.transpose(-2, -1)) * scale  # (..., Nq, Nk)",
        "if attn_mask is not None:",
        "    if attn_mask.dtype == torch.bool:",
        "        if attn_mask.all(-1).any():",
        '            raise ValueError("attn_mask blocks every key for some query: its softmax would be NaN")',
        '        scores = scores.masked_fill(attn_mask, float("-inf"))',
        "    else:",
        "        scores = scores + attn_mask",
        "weights = scores.softmax(dim=-1)  # (..., Nq, Nk)",
    ]
    one_line = show_source(scaled_dot_product_attention, start="weights = scores", stop="softmax")
    assert one_line.splitlines()[1:] == ["weights = scores.softmax(dim=-1)  # (..., Nq, Nk)"]


def test_decorated_method_shows_its_own_code() -> None:
    shown = show_source(HungarianMatcher.cost_terms, max_lines=200)
    assert shown.splitlines()[0] == "# detr_edu/matcher.py: HungarianMatcher.cost_terms"
    assert "def cost_terms(" in shown


def test_missing_text_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError, match=r"start text 'no such line' is not in the source of scaled_dot_product"
    ):
        show_source(scaled_dot_product_attention, start="no such line")
    with pytest.raises(
        ValueError, match=r"stop text 'nowhere' is not in the source of SelfAttention.forward"
    ):
        show_source(SelfAttention.forward, start="qkv =", stop="nowhere")
    with pytest.raises(ValueError, match="stop text 'def forward'"):  # stop before start is not found
        show_source(SelfAttention.forward, start="qkv =", stop="def forward")


def test_long_excerpt_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"excerpt of HungarianMatcher.cost_terms is \d+ lines, more than max_lines=30"
    ):
        show_source(HungarianMatcher.cost_terms)
    assert (
        len(show_source(SelfAttention.forward, start="qkv =", stop="unbind", max_lines=2).splitlines()) == 3
    )
    with pytest.raises(ValueError, match="more than max_lines=1"):
        show_source(SelfAttention.forward, start="qkv =", stop="unbind", max_lines=1)
