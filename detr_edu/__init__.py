"""detr_edu: the companion package of the detr-edu course.

The course builds DETR, Deformable DETR and DINO from blocks; every chapter imports its blocks
from here, so the package is the single source of truth.

Shape glossary used in comments throughout the package:
    B batch, Nq queries, Nk keys, Nv value tokens (sum of H_l * W_l over levels), C channels
    (embed_dim), nh heads, hd head dim (C // nh), L levels, P sampling points per level and head,
    G ground-truth boxes, K classes.

Boxes carry their format in their names: ``boxes_cxcywh``, ``boxes_xyxy``; they are normalised
to [0, 1] unless the name ends in ``_px``.
"""

__version__ = "0.1.0"
