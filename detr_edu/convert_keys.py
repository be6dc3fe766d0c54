"""The engine of :mod:`detr_edu.convert`: key renaming rules shared by every source, and a strict loader.

* :func:`load_state_into` loads a renamed state dict into a course model, refusing unknown keys,
  missing tensors, mis-shaped tensors and copies of one shared tensor that disagree, all in one
  :class:`ConversionError` message;
* the rules every source shares: the ResNet body (torchvision/timm names), the neck
  (``input_proj.{l}.{0|1}``), the prediction heads and the official transformer layers
  (:func:`official_layer_rename`, used for Deformable-DETR and DINO alike).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ConversionError",
    "load_state_into",
    "official_layer_rename",
    "resnet_depth",
    "count_indices",
    "resnet_rename",
    "neck_rename",
    "head_rename",
    "check_classes",
    "listed",
]

_MAX_LISTED = 8


class ConversionError(ValueError):
    """A checkpoint that does not fit the course's model; the message names every offending key."""


def listed(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" (and {len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def check_classes(found: int, expected: int | None, source: str) -> None:
    if expected is not None and found != expected:
        raise ConversionError(
            f"{source}: its class head has {found} classes but {expected} were asked for. A published "
            "class head cannot be loaded into another number of classes; convert it as it is, then "
            "fine-tune on your classes: python -m detr_edu.train --finetune-from OUT.pth ... "
            "(the class heads are re-initialised, everything else is loaded; chapter 08)"
        )


def load_state_into(
    model: nn.Module,
    state: Mapping[str, Tensor],
    rename: Callable[[str], str | None],
    *,
    source: str,
    names: Mapping[str, str] | None = None,
) -> None:
    """Load ``state`` into ``model`` through ``rename``, refusing anything that does not fit.

    Args:
        model: the course model (its tensors are overwritten in place).
        state: source key -> tensor.
        rename: source key -> course key, or None for a key the course does not know.
        source: what to call the checkpoint in messages (its path).
        names: the checkpoint's own name of a key of ``state``, for messages (when ``state`` was
            renamed beforehand).

    Raises:
        ConversionError: unknown source keys, course tensors no key fills, mis-shaped tensors, and
            copies of one shared course tensor that disagree -- all listed in one message.
    """
    target = model.state_dict(keep_vars=True)
    # names of one shared tensor (a head used by every layer is one module registered L times)
    owner: dict[int, str] = {}
    groups: dict[str, list[str]] = {}
    for name, tensor in target.items():
        first = owner.setdefault(id(tensor), name)
        groups.setdefault(first, []).append(name)
    canonical = {name: owner[id(tensor)] for name, tensor in target.items()}

    names = names or {}
    unknown, misshaped, disagree = [], [], []
    given: dict[str, tuple[str, Tensor]] = {}
    shaped_wrong: set[str] = set()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # BatchNorm bookkeeping; FrozenBatchNorm2d has none
        new = rename(key)
        shown = names.get(key, key)
        if new is None or new not in canonical:
            unknown.append(shown if new is None else f"{shown} (-> {new})")
            continue
        if tuple(value.shape) != tuple(target[new].shape):
            misshaped.append(
                f"{shown} {tuple(value.shape)} (the model's {new} is {tuple(target[new].shape)})"
            )
            shaped_wrong.add(canonical[new])
            continue
        head = canonical[new]
        if head in given:
            other_key, other = given[head]
            if not torch.equal(other.to(value.dtype), value):
                disagree.append(f"{other_key} and {shown} (one shared tensor {head} in the model)")
            continue
        given[head] = (shown, value)
    missing = [name for name in groups if name not in given and name not in shaped_wrong]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): {listed(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) of the model: {listed(missing)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {listed(misshaped)}")
    if disagree:
        problems.append(f"{len(disagree)} copies that should be one shared tensor differ: {listed(disagree)}")
    if problems:
        raise ConversionError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))
    full = {}
    for head, names in groups.items():
        value = given[head][1]
        for name in names:
            full[name] = value.to(dtype=target[name].dtype)
    model.load_state_dict(full, strict=True)


def resnet_rename(rest: str) -> str:
    """A torchvision/timm ResNet key (``conv1.weight``, ``layer2.0.bn1.bias``) -> the course's body key."""
    rest = re.sub(r"^conv1\.", "stem.0.", rest)
    rest = re.sub(r"^bn1\.", "stem.1.", rest)
    return "backbone.body." + re.sub(r"^layer(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", rest)


def neck_rename(level: int, part: str, rest: str, num_stages: int) -> str | None:
    if part == "0":
        if level < num_stages:
            return f"backbone.neck.convs.{level}.{rest}"
        return f"backbone.neck.extra_convs.{level - num_stages}.{rest}"
    return f"backbone.neck.norms.{level}.{rest}" if part == "1" else None


def head_rename(kind: str, index: int, rest: str, num_decoder_layers: int) -> str:
    if index == num_decoder_layers:  # two-stage: the extra pair on the encoder output
        return f"proposer.{kind}.{rest}"
    return f"heads.{kind}.{index}.{rest}"


_OFFICIAL_ENCODER = {"norm1": "norm1", "linear1": "ffn.fc1", "linear2": "ffn.fc2", "norm2": "norm2"}
# the official decoder layer names its norms by attention: norm2 after self-attention, norm1 after
# cross-attention (models/deformable_transformer.py:DeformableTransformerDecoderLayer)
_OFFICIAL_DECODER = {
    "self_attn": "self_attn.attn",
    "norm2": "norm1",
    "cross_attn": "cross_attn",
    "norm1": "norm2",
    "linear1": "ffn.fc1",
    "linear2": "ffn.fc2",
    "norm3": "norm3",
}


def official_layer_rename(key: str) -> str | None:
    """Backbone, neck and transformer-layer keys, common to official Deformable-DETR and DINO."""
    if key == "transformer.level_embed":
        return "encoder.level_embed.weight"
    if m := re.fullmatch(r"backbone\.0\.body\.(.+)", key):
        return resnet_rename(m.group(1))
    if m := re.fullmatch(r"input_proj\.(\d+)\.(\d)\.(.+)", key):
        level, part, rest = int(m.group(1)), m.group(2), m.group(3)
        return neck_rename(level, part, rest, num_stages=3)
    if m := re.fullmatch(r"transformer\.encoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", key):
        i, mod, rest = m.groups()
        if mod == "self_attn":
            return f"encoder.encoder.layers.{i}.self_attn.{rest}"
        return (
            f"encoder.encoder.layers.{i}.{_OFFICIAL_ENCODER[mod]}.{rest}"
            if mod in _OFFICIAL_ENCODER
            else None
        )
    if m := re.fullmatch(r"transformer\.decoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)", key):
        i, mod, rest = m.groups()
        return f"decoder.layers.{i}.{_OFFICIAL_DECODER[mod]}.{rest}" if mod in _OFFICIAL_DECODER else None
    return None


def count_indices(state: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def resnet_depth(state: Mapping[str, Tensor], prefix: str) -> int:
    """18, 34 or 50 from the ResNet blocks a state dict holds under ``prefix``."""
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state
    blocks = [count_indices(state, re.escape(prefix) + rf"layer{i}\.(\d+)\.") for i in range(1, 5)]
    if bottleneck and blocks == [3, 4, 6, 3]:
        return 50
    if not bottleneck and blocks == [2, 2, 2, 2]:
        return 18
    if not bottleneck and blocks == [3, 4, 6, 3]:
        return 34
    raise ConversionError(f"the backbone ({blocks} blocks per stage) is not a ResNet-18/34/50")
