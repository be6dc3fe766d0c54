"""Chapter 02 (multi-scale deformable attention): reference answers to the exercises."""

import torch

# 1. Pixel centres sit at ((j + 0.5) / W, (i + 0.5) / H): x along the 9 columns, y along the 6 rows.
answer_1 = (2.5 / 9, 4.5 / 6)

# 2. 2-d reference: offsets are level pixels, 0.25 x 18 = 4.5.
#    4-d reference: offset x w x 0.5 / P = 0.25, so offset = 0.25 x 4 / (0.2 x 0.5) = 10.
answer_2 = (4.5, 10.0)

# 3. Offsets: 256 inputs -> nh L P 2 = 256 outputs, plus biases; weights: 256 -> nh L P = 128, plus biases.
answer_3 = 256 * 256 + 256 + 256 * 128 + 128

# 4. Head 1 points at 45 degrees: (cos, sin) pushed onto the square max(|x|, |y|) = 1 is (1, 1);
#    point k = 3 sits at 3 times that.
answer_4 = (3.0, 3.0)

# 5. Tokens are row-major (token = row x 6 + column): mark columns 4 and 5 of every row of image 1.
answer_5 = torch.zeros(2, 4, 6, dtype=torch.bool)
answer_5[1, :, 4:] = True
answer_5 = answer_5.flatten(1)  # (B, Nv)
