"""Chapter 01 (attention): reference answers to the exercises."""


# 1. Blocked keys get weight exactly 0 after the softmax; the two remaining keys score equally,
#    so they share the weight half and half.
def answer_1(v):
    return (v[0] + v[1]) / 2


# 2. The fused qkv linear (256 -> 768, weights and biases) and the output projection (256 -> 256).
answer_2 = 256 * 768 + 768 + 256 * 256 + 256

# 3. One flag per key of each image: (B, Nk), with Nk = 25 x 38 = 950 pixels of the feature map.
#    The note's (bs, num_query) is wrong: queries are never masked by key_padding_mask.
answer_3 = (2, 25 * 38)

# 4. Doubling the side gives 4x the tokens, and the matrix is tokens x tokens: 4 x 4 = 16.
answer_4 = 16
