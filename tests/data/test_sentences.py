"""Sentence examples (data.format=sentences): layout, specials, cropping, padding to whole batches."""

from __future__ import annotations

import numpy as np
import pytest

from lm.data import sentences as sentences_lib
from lm.data.sources import DataError
from lm.data.tokenizers import ByteTokenizer


def test_an_example_is_bos_sentence_eos_padded():
  tokenizer = ByteTokenizer()
  split = sentences_lib.Sentences(["ab", "xyz"], tokenizer, seq_len=6)
  vocab = split.vocab
  assert (vocab.pad, vocab.bos, vocab.eos, vocab.mask, vocab.size) == (257, 258, 259, 260, 261)
  example = split[1]
  x, y, z = (ord(c) for c in "xyz")
  np.testing.assert_array_equal(example["inputs"], [vocab.bos, x, y, z, vocab.pad, vocab.pad])
  np.testing.assert_array_equal(example["targets"], [x, y, z, vocab.eos, vocab.pad, vocab.pad])
  np.testing.assert_array_equal(example["mask"], [1, 1, 1, 1, 0, 0])
  assert int(example["index"]) == 1 and split.num_targets == 2 + 1 + 3 + 1


def test_long_sentences_are_cropped_and_empty_ones_skipped():
  split = sentences_lib.Sentences(["abcdefgh", "", "ok"], ByteTokenizer(), seq_len=4)
  assert len(split) == 2 and split.cropped == 1 and split.empty == 1
  np.testing.assert_array_equal(split.tokens(0), [ord(c) for c in "abc"])  # seq_len - 1 tokens
  assert split[0]["mask"].sum() == 4  # 3 tokens + EOS fill the row


def test_padded_to_batches_adds_empty_rows_only():
  split = sentences_lib.Sentences(["a", "b", "c"], ByteTokenizer(), seq_len=4)
  padded = sentences_lib.PaddedToBatches(split, batch_size=2)
  assert len(padded) == 4
  assert padded[2]["mask"].sum() == 2 and padded[3]["mask"].sum() == 0


def test_decoding_stops_at_eos_and_drops_specials():
  tokenizer = ByteTokenizer()
  vocab = sentences_lib.SentenceVocab.for_tokenizer(tokenizer)
  ids = [ord("h"), vocab.mask, ord("i"), vocab.eos, ord("x")]
  assert vocab.decode(tokenizer, ids) == "hi"
  assert vocab.decode(tokenizer, [ord("a"), vocab.pad, ord("b")]) == "a"


def test_examples_for_texts_and_bad_input():
  examples = sentences_lib.examples_for_texts(ByteTokenizer(), 5, ["hello world", "hi"])
  assert examples["inputs"].shape == (2, 5) and examples["mask"][1].sum() == 3
  with pytest.raises(DataError, match="encodes to no tokens"):
    sentences_lib.examples_for_texts(ByteTokenizer(), 5, [""])
  with pytest.raises(DataError, match="no sentences"):
    sentences_lib.Sentences(["", ""], ByteTokenizer(), seq_len=8)
  with pytest.raises(DataError, match="seq_len"):
    sentences_lib.Sentences(["a"], ByteTokenizer(), seq_len=1)
