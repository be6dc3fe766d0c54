"""Chapter 08 (training): reference answers to the exercises.

``answer_2`` and ``answer_3`` need the chapter's state: here they are functions of it,
``answer_2(runs)`` (label -> records of the committed logs) and ``answer_3(shipped)`` (the shipped
model); in the chapter you write the values they return.
"""

import math

from detr_edu.export import SHIPPED_WEIGHTS
from detr_edu.logs import series

# 1. The sampler pads 118,287 to a multiple of 8 processes: ceil(118287 / 8) = 14,786 images each,
#    in batches of 2 with the last partial batch kept: 7,393 steps per epoch, 12 x that in 12 epochs.
answer_1 = (math.ceil(math.ceil(118287 / 8) / 2), 12 * math.ceil(math.ceil(118287 / 8) / 2))


# 2. The first evaluation whose AP50 reaches 20, its training time in minutes; None if never.
def answer_2(runs):
    def first_time(records):
        for seconds, value in zip(*series(records, "AP50", kind="eval"), strict=True):
            if value >= 20:
                return round(seconds / 60, 1)
        return None

    return {label: first_time(records) for label, records in runs.items()}


# 3. Every floating tensor of the state dict (parameters and BatchNorm buffers), 4 bytes in float32;
#    the file holds them in float16 (2 bytes) plus a few integer buffers and the pickled config.
def answer_3(shipped):
    elements = sum(v.numel() for v in shipped.state_dict().values() if v.is_floating_point())
    return (4 * elements, 2 * elements / SHIPPED_WEIGHTS.stat().st_size)
