"""detr_edu.patches and the chapter 01 pictures: patches against a loop, attention maps by definition."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from detr_edu.patches import image_to_patches, patch_attention_map  # noqa: E402
from detr_edu.viz.attention import plot_attention_cost, plot_masks, plot_patch_attention  # noqa: E402


def _image(h=20, w=28, seed=0):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


def test_patches_equal_a_loop_channel_major():
    img = _image()
    patches, (gh, gw) = image_to_patches(img, 4)
    assert (gh, gw) == (5, 7)
    for r in range(gh):
        for c in range(gw):
            expected = img[:, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].reshape(-1)  # red first, then green, blue
            torch.testing.assert_close(patches[r * gw + c], expected)


def test_attention_map_is_softmax_of_standardised_similarity():
    img = _image()
    patches, _ = image_to_patches(img, 4)
    f = (patches - patches.mean(0)) / patches.std(0)
    for head, sl in ((None, slice(None)), (1, slice(16, 32))):
        g = f[:, sl]
        expected = (g[9] @ g.T / g.shape[1] ** 0.5 / 2.0).softmax(-1).reshape(5, 7)
        got = patch_attention_map(img, patch_size=4, query_rc=(1, 2), head=head, temperature=2.0)
        torch.testing.assert_close(got, expected)


def test_padding_gets_zero_weight_only_when_masked():
    img = _image() * 0.2  # dark image: padding (black) looks similar
    masked = patch_attention_map(img, patch_size=4, query_rc=(0, 0), pad_cols=3)
    unmasked = patch_attention_map(img, patch_size=4, query_rc=(0, 0), pad_cols=3, mask_padding=False)
    assert masked.shape == (5, 10)
    assert masked[:, 7:].sum() == 0
    assert unmasked[:, 7:].sum() > 0
    torch.testing.assert_close(masked.sum(), torch.tensor(1.0))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        image_to_patches(torch.rand(4, 8, 8), 2)
    with pytest.raises(ValueError, match="does not fit"):
        image_to_patches(torch.rand(3, 8, 8), 16)
    with pytest.raises(ValueError, match="outside"):
        patch_attention_map(_image(), patch_size=4, query_rc=(5, 0))
    with pytest.raises(ValueError, match="temperature"):
        patch_attention_map(_image(), patch_size=4, query_rc=(0, 0), temperature=0)
    with pytest.raises(ValueError, match="head must be"):
        plot_patch_attention(_image(), patch_size=4, query_row=0, query_col=0, head="X")


def _png(fig):
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def test_widget_view_changes_with_every_control():
    img = _image(32, 32)
    base = dict(
        patch_size=4, query_row=1, query_col=1, head="all", temperature=1.0, pad_cols=2, mask_padding=True
    )
    reference = _png(plot_patch_attention(img, **base))
    for key, value in (
        ("query_row", 3),
        ("query_col", 5),
        ("head", "G"),
        ("temperature", 0.3),
        ("pad_cols", 4),
    ):
        assert _png(plot_patch_attention(img, **{**base, key: value})) != reference, key
    assert _png(plot_patch_attention(img, **{**base, "mask_padding": False})) != reference


def test_other_figures_draw():
    kpm = torch.tensor([[False, False, True], [False, True, True]])
    fig = plot_masks(torch.zeros(2, 3, dtype=torch.bool), kpm)
    assert len(fig.axes) == 4
    plt.close(fig)
    fig = plot_attention_cost([1, 2, 4], [1.0, 2.0, 8.0], [4, 16, 64])
    assert len(fig.axes) == 2
    plt.close(fig)
