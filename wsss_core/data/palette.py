"""Class names and the PASCAL VOC colour palette."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

IGNORE = 255


@lru_cache(maxsize=1)
def voc_palette() -> np.ndarray:
    """The standard 256-entry VOC colour map, (256, 3) uint8 (bit-interleaved label index)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    pal.setflags(write=False)
    return pal
