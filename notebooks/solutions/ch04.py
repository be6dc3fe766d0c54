"""Chapter 04 (the forward pass): reference answers to the exercises."""

import math

# 1. One token per pixel of the four levels (strides 8, 16, 32 and the neck's 64) of a 128 x 128 image.
answer_1 = 16**2 + 8**2 + 4**2 + 2**2

# 2. Level-3 proposals have side 0.05 x 2^3 of the image: 0.4 x 128 px.
answer_2 = 0.05 * 2**3 * 128

# 3. A row of the stride-32 level is valid when it holds some of the image: ceil(100 / 32).
answer_3 = math.ceil(100 / 32)

# 4. With look forward twice, layer 2's box is computed from layer 1's undetached box, so its loss
#    also reaches the box head of layer 1 (counted from 0); plain refinement detaches it.
answer_4 = "heads.bbox_embed.1"

# 5. One MLP 128 -> 128 -> 128 -> 4 (weights and biases): 33,540; a copy per layer: 3 x 33,540.
answer_5 = (2 * (128 * 128 + 128) + 128 * 4 + 4, 3 * (2 * (128 * 128 + 128) + 128 * 4 + 4))
