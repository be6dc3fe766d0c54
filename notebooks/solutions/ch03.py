"""Chapter 03 (assembling the transformer): reference answers to the exercises."""

import math

# 1. The stride-16 level of a 128-px image has 8 columns; 70 px cover ceil(70 / 16) = 5 of them.
answer_1 = math.ceil(70 / 16) / 8

# 2. Level 1 starts after level 0's 16 x 16 = 256 tokens; row 2, column 3 of an 8-wide level is 2 x 8 + 3.
answer_2 = 256 + 2 * 8 + 3


# 3. The F channels are F / 2 (sin, cos) pairs of one frequency each, and sin^2 + cos^2 = 1.
def answer_3(F):
    return F / 2


# 4. Column 12's centre as a fraction of level 0's valid width, (12 + 0.5) / 13,
#    times level 2's valid width 4.
answer_4 = (12 + 0.5) * 4 / 13

# 5. (B, Nv, L, 2): 2 images x 340 tokens x 4 levels x (x, y).
answer_5 = 2 * (16 * 16 + 8 * 8 + 4 * 4 + 2 * 2) * 4 * 2
