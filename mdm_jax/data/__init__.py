"""Text data for mdm_jax: offline corpora, tokenizers, ArrayRecord shards and Grain pipelines."""

from mdm_jax.data.array_record import ArrayRecordData
from mdm_jax.data.array_record import load_array_record_data
from mdm_jax.data.array_record import prepare
from mdm_jax.data.corpora import CORPORA
from mdm_jax.data.corpora import load_corpus
from mdm_jax.data.corpora import shakespeare_text
from mdm_jax.data.corpora import text_files
from mdm_jax.data.text import corpus_words
from mdm_jax.data.text import corpus_bigrams
from mdm_jax.data.text import known_bigram_rate
from mdm_jax.data.text import known_word_rate
from mdm_jax.data.text import make_text_data
from mdm_jax.data.text import process_eval_batches
from mdm_jax.data.text import process_train_batches
from mdm_jax.data.text import split_and_pack
from mdm_jax.data.text import TextData
from mdm_jax.data.text import tokenize_corpus
from mdm_jax.data.tokenizers import BPETokenizer
from mdm_jax.data.tokenizers import build_tokenizer
from mdm_jax.data.tokenizers import ByteTokenizer
from mdm_jax.data.tokenizers import CharTokenizer
from mdm_jax.data.tokenizers import GPT2Tokenizer
from mdm_jax.data.tokenizers import load_tokenizer
from mdm_jax.data.tokenizers import Tokenizer
from mdm_jax.data.tokenizers import TOKENIZERS

__all__ = [
    "ArrayRecordData", "BPETokenizer", "ByteTokenizer", "CharTokenizer", "CORPORA",
    "GPT2Tokenizer", "TextData", "Tokenizer", "TOKENIZERS", "build_tokenizer", "corpus_words",
    "corpus_bigrams", "known_bigram_rate", "known_word_rate",
    "load_array_record_data", "load_corpus", "load_tokenizer", "make_text_data", "prepare",
    "process_eval_batches", "process_train_batches", "shakespeare_text", "split_and_pack",
    "text_files", "tokenize_corpus",
]
