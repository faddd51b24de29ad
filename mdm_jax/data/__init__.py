"""Datasets: offline corpora, tokenizers, ArrayRecord shards, images, and the Grain pipelines.

==========================  ==================================================================
``base.py``                 the ``Data`` interface, the ``DATASETS`` registry, ``build_data``
``batching.py``             the per-process batching every dataset shares
``text.py``                 ``shakespeare``, ``text_files``: a corpus tokenised and packed in memory
``array_record``            ``array_record``: reading the packed shards (the format's owner)
``array_record_prepare``    ``--mode=prepare``: writing those shards once, offline
``images.py``               ``fashion_mnist``, ``image_folder``, ``tfds_images``: pixels as tokens
``corpora.py``              the embedded Shakespeare plays and local text files
``tokenizers.py``           char, byte, local BPE and GPT-2 tokenizers
``token_order``             numbering the vocabulary by context (``data.token_order``)
==========================  ==================================================================

A new dataset is one file with a builder registered by ``@DATASETS.register(name)``.
Modules of this package import their siblings by module path (``import
mdm_jax.data.corpora as corpora``), never through this package's namespace, which
imports them: ``tests/test_layers.py`` counts ``from mdm_jax.data import X`` as an
import of this ``__init__``.
"""

from mdm_jax.data.base import COMPAT_KEYS, DATASETS, STREAM_KEYS, Data, build_data
from mdm_jax.data.batching import process_eval_batches, process_train_batches
# The built-in datasets register themselves on import.
from mdm_jax.data.text import TextData, make_text_data, split_and_pack, tokenize_corpus
from mdm_jax.data.array_record import ArrayRecordData, load_array_record_data
from mdm_jax.data.array_record_prepare import prepare
from mdm_jax.data.images import ImageData, make_image_data
from mdm_jax.data.corpora import CORPORA, load_corpus, shakespeare_text, text_files
from mdm_jax.data.tokenizers import (TOKENIZERS, BPETokenizer, ByteTokenizer, CharTokenizer,
                                     GPT2Tokenizer, Tokenizer, build_tokenizer, load_tokenizer)

__all__ = [
    "COMPAT_KEYS", "STREAM_KEYS", "DATASETS", "Data", "build_data", "ArrayRecordData", "ImageData", "TextData",
    "BPETokenizer", "ByteTokenizer", "CharTokenizer", "CORPORA", "GPT2Tokenizer", "Tokenizer",
    "TOKENIZERS", "build_tokenizer", "load_array_record_data", "load_corpus", "load_tokenizer",
    "make_image_data", "make_text_data", "prepare", "process_eval_batches",
    "process_train_batches", "shakespeare_text", "split_and_pack", "text_files",
    "tokenize_corpus",
]
