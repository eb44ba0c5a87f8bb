"""Tests for lm.data.clean: normalization, length filters, exact/near dedup and the saved index."""

from __future__ import annotations

import collections
import re

import ml_collections
import numpy as np
import pytest

from lm.data import clean, dedup
from lm.data.clean import Cleaner, CleanConfig, DedupIndex
from lm.core.errors import DataError

WORDS = ("river stone lantern quiet market harbor silver orchard meadow candle winter window "
         "garden thunder copper feather morning valley bridge ladder").split()


def sentence(seed: int, num_words: int = 32) -> str:
  """A deterministic ~200-character sentence of common words."""
  rng = np.random.default_rng(seed)
  return " ".join(rng.choice(WORDS, size=num_words)) + "."


def true_jaccard(first: str, second: str, size: int = CleanConfig.shingle_size) -> float:
  """Jaccard similarity of the character shingle sets, computed independently of the module."""
  def shingles(text: str) -> set[str]:
    text = re.sub(r"\s+", " ", text.lower())
    return {text[i:i + size] for i in range(len(text) - size + 1)} or {text}
  a, b = shingles(first), shingles(second)
  return len(a & b) / len(a | b)


def replace_words(text: str, positions: list[int], replacement: str = "zephyr") -> str:
  words = text.split(" ")
  for position in positions:
    words[position] = replacement
  return " ".join(words)


# ----------------------------------------------------------------------------- normalize


def test_nfc_composes_but_keeps_compatibility_forms():
  assert clean.normalize("e\u0301") == "\u00e9"
  assert clean.normalize("\ufb01ne") == "\ufb01ne"  # the "fi" ligature survives NFC
  assert clean.normalize("\ufb01ne", "NFKC") == "fine"
  assert clean.normalize("x\u00b2", "NFKC") == "x2"
  assert clean.normalize("e\u0301", "NFKC") == "\u00e9"


def test_none_keeps_unicode_form_but_still_cleans_whitespace():
  assert clean.normalize("  e\u0301\ufb01  \r\n", "none") == "e\u0301\ufb01"
  assert clean.normalize("a \t b\r\n\r\n\r\nc", "none") == "a b\n\nc"


def test_control_and_format_characters_are_removed_except_newline_and_tab():
  assert clean.normalize("a\x00b\u200bc\x7fd\ufeffe\x1bf") == "abcdef"
  assert clean.normalize("a\tb\nc") == "a b\nc"  # tab survives removal, then collapses to a space


def test_line_endings_whitespace_and_blank_lines():
  assert clean.normalize("one\r\ntwo\rthree") == "one\ntwo\nthree"
  assert clean.normalize("a   b\t\tc \t d") == "a b c d"
  assert clean.normalize("a  \nb\t\n") == "a\nb"
  assert clean.normalize("a\n\n\n\n\nb") == "a\n\nb"
  assert clean.normalize("a\n \t \n  \nb") == "a\n\nb"  # whitespace-only lines are blank lines
  assert clean.normalize("a\n\nb") == "a\n\nb"  # one blank line (a paragraph break) is kept
  assert clean.normalize("\n\n  text  \n\n") == "text"


def test_normalize_rejects_unknown_form_and_non_strings():
  with pytest.raises(DataError, match="NFKC"):
    clean.normalize("text", "NFD")
  with pytest.raises(DataError, match="decode"):
    clean.normalize(b"text")


# ----------------------------------------------------------------------------- length filters


def test_length_filters_and_empty_documents_are_counted():
  cleaner = Cleaner(CleanConfig(min_chars=5, max_chars=10))
  kept, dropped = cleaner.clean(["", "  \r\n\t ", "\u200b", "abc", "abcde", "x" * 10, "y" * 11])
  assert kept == ["abcde", "x" * 10]
  assert dropped == collections.Counter(empty=3, too_short=1, too_long=1)
  assert set(dropped) <= set(clean.REASONS)
  assert len(cleaner.index) == 2


def test_length_is_measured_after_normalization():
  cleaner = Cleaner(CleanConfig(min_chars=3, max_chars=3, near_dup_threshold=0))
  kept, dropped = cleaner.clean(["  a   b  ", "a\r\nb", "e\u0301e\u0301e\u0301"])
  assert kept == ["a b", "a\nb", "\u00e9\u00e9\u00e9"]
  assert not dropped


def test_max_chars_zero_means_no_limit():
  kept, dropped = Cleaner(CleanConfig()).clean([sentence(0, num_words=2000)])
  assert len(kept) == 1 and not dropped


# ----------------------------------------------------------------------------- exact duplicates


def test_exact_duplicates_after_normalization_within_one_call():
  cleaner = Cleaner(CleanConfig(near_dup_threshold=0))
  kept, dropped = cleaner.clean(["Hello there.", "Hello there.   ", "Hello  there.\r\n", "Hello there!"])
  assert kept == ["Hello there.", "Hello there!"]
  assert dropped == collections.Counter(exact_duplicate=2)


def test_exact_duplicates_across_calls_and_case_matters():
  cleaner = Cleaner(CleanConfig(near_dup_threshold=0))
  cleaner.clean(["first document", "second document"])
  kept, dropped = cleaner.clean(["second document ", "Second document", "third document"])
  assert kept == ["Second document", "third document"]
  assert dropped == collections.Counter(exact_duplicate=1)
  assert len(cleaner.index) == 4


def test_exact_dedup_off_keeps_repeats():
  kept, dropped = Cleaner(CleanConfig(exact_dedup=False, near_dup_threshold=0)).clean(["a", "a"])
  assert kept == ["a", "a"] and not dropped


def test_exact_copy_counts_as_near_duplicate_when_only_near_dedup_is_on():
  kept, dropped = Cleaner(CleanConfig(exact_dedup=False)).clean([sentence(1), sentence(1)])
  assert len(kept) == 1 and dropped == collections.Counter(near_duplicate=1)


@pytest.mark.parametrize("batch_size", [1, 2048])
def test_add_false_checks_within_the_call_but_leaves_the_index_alone(monkeypatch, batch_size):
  monkeypatch.setattr(clean, "_BATCH_DOCUMENTS", batch_size)
  cleaner = Cleaner(CleanConfig())
  cleaner.clean(["already seen"])
  kept, dropped = cleaner.clean(["already seen", "new", "new"], add=False)
  assert kept == ["new"]
  assert dropped == collections.Counter(exact_duplicate=2)
  assert len(cleaner.index) == 1 and cleaner.index.find("new") is None
  assert cleaner.clean(["new"])[0] == ["new"]


def test_a_failing_call_leaves_the_index_as_it_was(monkeypatch):
  # One document per batch, so the first two are added before the third fails.
  monkeypatch.setattr(clean, "_BATCH_DOCUMENTS", 1)
  cleaner = Cleaner(CleanConfig())
  cleaner.clean([sentence(2)])
  before = cleaner.index.to_arrays()
  with pytest.raises(DataError, match="Document 2 is a bytes"):
    cleaner.clean([sentence(3), sentence(4), b"raw bytes"])
  after = cleaner.index.to_arrays()
  assert before.keys() == after.keys()
  for key in before:
    np.testing.assert_array_equal(before[key], after[key])
  assert cleaner.index.find(sentence(3)) is None
  assert cleaner.clean([sentence(3)])[0] == [sentence(3)]  # its buckets were removed too


def test_clean_rejects_a_single_string():
  with pytest.raises(DataError, match="list"):
    Cleaner(CleanConfig()).clean("one document")


# ----------------------------------------------------------------------------- near duplicates


def test_one_changed_word_is_a_near_duplicate_and_a_distinct_text_is_kept():
  config = CleanConfig(near_dup_threshold=0.8)
  original = sentence(10)
  edited = replace_words(original, [len(original.split()) // 2])
  distinct = sentence(11)
  assert 180 <= len(original) <= 260 and abs(len(distinct) - len(original)) < 40
  index = DedupIndex(config)
  assert index.similarity(index.signature(original), index.signature(edited)) >= 0.8
  assert index.similarity(index.signature(original), index.signature(distinct)) < 0.5
  cleaner = Cleaner(config, index)
  kept, dropped = cleaner.clean([original, edited, distinct])
  assert kept == [original, distinct]
  assert dropped == collections.Counter(near_duplicate=1)
  assert index.find(replace_words(original, [3])) == "near_duplicate"


def test_threshold_separates_pairs_by_true_jaccard():
  # More permutations make the estimate tight (std ~0.03), so pairs 0.05-0.1 from the
  # threshold land on the expected side; rows per band stay 4.
  config = CleanConfig(near_dup_threshold=0.8, num_perm=256, bands=64)
  base = sentence(20, num_words=60)
  by_jaccard = {}
  for changed in range(1, 12):
    variant = replace_words(base, list(range(3, 3 + 5 * changed, 5)))
    by_jaccard[true_jaccard(base, variant)] = variant
  below = next(text for jaccard, text in sorted(by_jaccard.items(), reverse=True) if jaccard < 0.74)
  above = next(text for jaccard, text in sorted(by_jaccard.items()) if jaccard > 0.87)
  assert 0.65 < true_jaccard(base, below) < 0.74 and true_jaccard(base, above) > 0.87
  index = DedupIndex(config)
  index.add(base)
  assert index.find(below) is None
  assert index.find(above) == "near_duplicate"
  kept, dropped = Cleaner(config, index).clean([below, above], add=False)
  assert kept == [below] and dropped == collections.Counter(near_duplicate=1)


def test_estimate_tracks_true_jaccard():
  index = DedupIndex(CleanConfig(num_perm=256, bands=64))
  base = sentence(30, num_words=50)
  for changed in (1, 4, 8, 16):
    variant = replace_words(base, list(range(0, 3 * changed, 3)))
    estimate = index.similarity(index.signature(base), index.signature(variant))
    assert abs(estimate - true_jaccard(base, variant)) < 0.12


def test_near_dedup_ignores_case_and_whitespace_but_exact_does_not():
  config = CleanConfig()
  index = DedupIndex(config)
  index.add(sentence(40))
  assert index.find(sentence(40).upper()) == "near_duplicate"
  assert index.find(sentence(40).replace(" ", "\n")) == "near_duplicate"


def test_short_texts_have_one_shingle():
  index = DedupIndex(CleanConfig())
  index.add("abc")
  assert index.find("ABC") == "near_duplicate"
  assert index.find("abd") is None
  assert index.find("abcd") is None  # padded short shingles differ from each other


def test_threshold_zero_disables_near_dedup():
  config = CleanConfig(near_dup_threshold=0)
  kept, _ = Cleaner(config).clean([sentence(50), replace_words(sentence(50), [5])])
  assert len(kept) == 2
  assert Cleaner(config).index.to_arrays()["signatures"].shape == (0, config.num_perm)


# ----------------------------------------------------------------------------- determinism


def test_signatures_are_deterministic_and_depend_on_the_seed():
  text = sentence(60)
  first = DedupIndex(CleanConfig(seed=3)).signature(text)
  second = DedupIndex(CleanConfig(seed=3)).signature(text)
  other_seed = DedupIndex(CleanConfig(seed=4)).signature(text)
  assert first.dtype == np.uint32 and first.shape == (64,)
  np.testing.assert_array_equal(first, second)
  assert not np.array_equal(first, other_seed)


def test_signature_values_are_pinned():
  # Saved indexes hold signatures: any change to shingle hashing or the permutations
  # silently stops old documents from matching, so it must show up here.
  signature = DedupIndex(CleanConfig()).signature("the quick brown fox")
  assert signature[:6].tolist() == [153126362, 27860194, 13493729, 79852256, 294077776, 152928466]
  assert clean.exact_hash("the quick brown fox") == int.from_bytes(
      __import__("hashlib").blake2b(b"the quick brown fox", digest_size=8).digest(), "little")


def test_batched_signatures_equal_one_at_a_time(monkeypatch):
  config = CleanConfig()
  index = DedupIndex(config)
  texts = [sentence(seed, num_words=seed % 7 + 1) for seed in range(20)] + ["", "a", "abcd", "x" * 40]
  alone = np.stack([index.signature(text) for text in texts])
  # Tiny blocks split texts across block edges; the running minimum must still agree.
  monkeypatch.setattr(dedup, "_SHINGLE_BLOCK", 7)
  np.testing.assert_array_equal(dedup._signatures(texts, config, index._a, index._b), alone)


# ----------------------------------------------------------------------------- index persistence


def filled_index(config: CleanConfig | None = None) -> DedupIndex:
  index = DedupIndex(config or CleanConfig())
  Cleaner(index.config, index).clean([sentence(seed) for seed in range(70, 80)] + ["short"])
  return index


def assert_same_arrays(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> None:
  assert first.keys() == second.keys()
  for key in first:
    assert first[key].dtype == second[key].dtype, key
    np.testing.assert_array_equal(first[key], second[key])


def test_arrays_round_trip_and_rebuild_buckets():
  index = filled_index()
  arrays = index.to_arrays()
  assert arrays["exact"].dtype == np.uint64 and arrays["exact"].shape == (11,)
  assert arrays["signatures"].dtype == np.uint32 and arrays["signatures"].shape == (11, 64)
  restored = DedupIndex.from_arrays(arrays)
  assert restored.config == index.config and len(restored) == len(index) == 11
  assert_same_arrays(restored.to_arrays(), arrays)
  assert restored.find(sentence(71)) == "exact_duplicate"
  assert restored.find(replace_words(sentence(72), [4])) == "near_duplicate"
  assert restored.find(sentence(99)) is None


def test_save_and_load(tmp_path):
  config = CleanConfig(min_chars=2, seed=7, num_perm=32, bands=8)
  index = filled_index(config)
  path = tmp_path / "dedup.npz"
  index.save(path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["dedup.npz"]  # no temporary left behind
  loaded = DedupIndex.load(path)
  assert loaded.config == config
  assert loaded.find(sentence(75)) == "exact_duplicate"
  assert loaded.find(replace_words(sentence(76), [10])) == "near_duplicate"
  assert_same_arrays(loaded.to_arrays(), index.to_arrays())
  # A resumed loop keeps deduplicating against what it trained on before the save.
  kept, dropped = Cleaner(config, loaded).clean([sentence(77), "brand new text"])
  assert kept == ["brand new text"] and dropped == collections.Counter(exact_duplicate=1)


def test_save_without_npz_suffix_writes_exactly_that_path(tmp_path):
  path = tmp_path / "index.bin"
  filled_index().save(path)
  assert path.is_file() and len(DedupIndex.load(path)) == 11


def test_load_missing_or_corrupt_file_raises_with_a_fix(tmp_path):
  with pytest.raises(DataError, match="does not exist.*Fix"):
    DedupIndex.load(tmp_path / "missing.npz")
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"this is not a zip archive")
  with pytest.raises(DataError, match="corrupt.*Fix"):
    DedupIndex.load(garbage)
  good = tmp_path / "good.npz"
  filled_index().save(good)
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
  with pytest.raises(DataError, match="Fix"):
    DedupIndex.load(truncated)
  wrong = tmp_path / "wrong.npz"
  np.savez(wrong, exact=np.zeros(3, np.uint64))
  with pytest.raises(DataError, match="malformed.*missing keys"):
    DedupIndex.load(wrong)


@pytest.mark.parametrize("key, value, message", [
    ("exact", np.zeros(11, np.uint32), "uint64"),
    ("signatures", np.zeros((11, 63), np.uint32), "uint32"),
    ("signatures", np.zeros((10, 64), np.uint32), "10 signatures for 11"),
    ("num_documents", np.array([11]), "scalar"),
    ("config", np.frombuffer(b"{not json", np.uint8), "JSON"),
    ("config", np.frombuffer(b'{"format_version": 99}', np.uint8), "format version"),
])
def test_malformed_arrays_raise(key, value, message):
  arrays = filled_index().to_arrays()
  arrays[key] = value
  with pytest.raises(DataError, match=message):
    DedupIndex.from_arrays(arrays)


def test_from_arrays_rejects_repeated_hashes_and_unknown_keys():
  arrays = filled_index().to_arrays()
  with pytest.raises(DataError, match="unknown keys \\['extra'\\]"):
    DedupIndex.from_arrays({**arrays, "extra": np.zeros(1)})
  arrays["exact"] = np.concatenate([arrays["exact"][:5], arrays["exact"][:1]])
  with pytest.raises(DataError, match="repeat"):
    DedupIndex.from_arrays(arrays)


def test_config_may_be_a_bytes_scalar():
  arrays = filled_index().to_arrays()
  arrays["config"] = np.bytes_(arrays["config"].tobytes())
  assert len(DedupIndex.from_arrays(arrays)) == 11


def test_cleaner_refuses_an_index_built_with_other_settings():
  index = DedupIndex(CleanConfig(seed=1))
  with pytest.raises(DataError, match="seed: index 1 vs 0.*Fix"):
    Cleaner(CleanConfig(), index)
  # Length filters may change between chunks.
  assert Cleaner(CleanConfig(seed=1, min_chars=50), index).index is index


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    ({"normalization": "NFD"}, "normalization"),
    ({"min_chars": -1}, "min_chars.*negative"),
    ({"max_chars": -5}, "max_chars.*negative"),
    ({"min_chars": 10, "max_chars": 5}, "below"),
    ({"near_dup_threshold": 1.5}, "\\[0, 1\\]"),
    ({"near_dup_threshold": -0.1}, "\\[0, 1\\]"),
    ({"num_perm": 64, "bands": 10}, "divisible"),
    ({"shingle_size": 0}, "at least 1"),
    ({"num_perm": 0}, "at least 1"),
    ({"min_chars": 2.5}, "integer"),
    ({"exact_dedup": "yes"}, "True or False"),
    ({"seed": -1}, "seed.*negative"),
])
def test_invalid_config_values_raise(overrides, message):
  with pytest.raises(DataError, match=message):
    CleanConfig(**overrides)
  with pytest.raises(DataError, match="Fix"):
    CleanConfig.from_mapping(overrides)


def test_validate_passes_for_defaults_and_bad_values_fail_on_construction():
  CleanConfig().validate()
  with pytest.raises(DataError):
    CleanConfig(max_chars=3, min_chars=4)


def test_from_mapping_accepts_dicts_and_configdicts_and_names_unknown_keys():
  config = CleanConfig.from_mapping({"min_chars": 20, "near_dup_threshold": 1})
  assert config.min_chars == 20 and config.near_dup_threshold == 1.0
  assert isinstance(config.near_dup_threshold, float)
  from_configdict = CleanConfig.from_mapping(ml_collections.ConfigDict({"normalization": "NFKC"}))
  assert from_configdict == CleanConfig(normalization="NFKC")
  assert CleanConfig.from_mapping(None) == CleanConfig()
  with pytest.raises(DataError, match="\\['min_char', 'shingles'\\].*Fix"):
    CleanConfig.from_mapping({"min_char": 3, "shingles": 4})


def test_an_ordinary_run_can_clean_its_training_split(tiny_config, tmp_path):
  from lm import experiment as experiment_lib  # pylint: disable=g-import-not-at-top

  class Split(list):
    name = "reviews.txt"

  documents = Split(["A fine film.", "A fine film.  ", "", "Something else entirely, quite long."])
  kept = experiment_lib.cleaned_documents(tiny_config(), documents)
  assert list(kept) == ["A fine film.", "Something else entirely, quite long."] and kept.name == "reviews.txt"
  with pytest.raises(DataError, match="dropped every document"):
    experiment_lib.cleaned_documents(tiny_config(**{"clean.min_chars": 1000}), documents)
