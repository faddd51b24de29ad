"""Pictures people look at: PNG output, partial-masking pictures, the decoding-order picture.

* ``pixels``: pixel levels (quantise / dequantise), image grids, a PNG codec;
* ``masking``: which sub-tokens are masked, partly or fully observed, step by step;
* ``order``: where a per-position schedule decodes first, over training.
"""
