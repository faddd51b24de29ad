"""TFDS builders for mdm_jax's local corpora (built offline, array_record format, no TensorFlow).

Importing this package registers the builders with TFDS, so that
``tfds.data_source("shakespeare_plays", data_dir=...)`` finds them.  It imports
``tensorflow_datasets``, so import it only where TFDS is wanted.
"""

from mdm_jax.data.tfds_builders.shakespeare_plays import build_shakespeare_plays
from mdm_jax.data.tfds_builders.shakespeare_plays import ShakespearePlays

__all__ = ["ShakespearePlays", "build_shakespeare_plays"]
