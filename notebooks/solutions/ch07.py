"""Chapter 07 (contrastive denoising): reference answers to the exercises."""

# 1. dn_number = 100 >= 50: groups = 100 // 12 = 8; Nd = 2 x 8 x 12 = 192; allowed =
#    matching -> matching 900^2 + each group's own block 8 x 24^2 + denoising -> matching 192 x 900.
answer_1 = (8, 192, 900 * 900 + 8 * 24 * 24 + 192 * 900)


# 2. Blocked when the key is a denoising slot and the query is in another group (matching rows have
#    group -1, so they differ from every group).
def answer_2(group_of):
    return (group_of[None, :] >= 0) & (group_of[:, None] != group_of[None, :])


# 3. Measured with make_noised_targets (one target per image, dn_number = 1: 2 groups) and the IoU of
#    each positive and its negative partner with the truth: nearly always, not always. Crossed
#    negatives reach the decoder as lines (IoU about 0); a positive whose corners all move inwards is
#    a sliver, while a negative whose corners all move outwards can contain the target.
answer_3 = 0.99

# 4. Counts [6, 2, 4, 6, 5, 5, 1, 3]: every image gets 2 x groups x 6 slots and fills 2 x groups x G,
#    so the padded share is 1 - mean(G) / max(G) = 1 - 4 / 6, whatever the number of groups.
answer_4 = 0.333
