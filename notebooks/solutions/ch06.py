"""Chapter 06 (losses): reference answers to the exercises."""

import math

# 1. One positive entry, alpha (1 - p)^gamma log 2 = 0.25 x 0.25 x log 2; eleven negative entries,
#    (1 - alpha) p^gamma log 2 = 0.75 x 0.25 x log 2 each; divided by one box.
answer_1 = (0.25 * 0.25 + 11 * 0.75 * 0.25) * math.log(2)

# 2. IoU 0; union 2 x 0.04 = 0.08; enclosing box 0.5 x 0.2 = 0.1: 0 - (0.1 - 0.08) / 0.1.
answer_2 = -0.2

# 3. 3 terms x (1 last layer + 5 earlier layers + 1 encoder).
answer_3 = 3 * (1 + 5 + 1)

# 4. The batch divides the summed L1 by its 4 boxes: (3 x 0.3 + 1 x 0.1) / 4, not the mean 0.2 of the images.
answer_4 = (3 * 0.3 + 1 * 0.1) / 4
