import pytest
from transformers import BertTokenizer
from transformers.models.bert import BertTokenizerLegacy

from titok.core.sequences import OffsetsUnavailableError, collate, encode_pair, encode_response


def test_collate_masks_and_positions(smollm2_tokenizer):
    pairs = [encode_pair(smollm2_tokenizer, "q", "a b c"), encode_pair(smollm2_tokenizer, "longer query here", "x")]
    for side in ("left", "right"):
        batch = collate(pairs, smollm2_tokenizer.pad_token_id, side)
        for row, pair in enumerate(pairs):
            real = batch.attention_mask[row].bool()
            assert batch.input_ids[row][real].tolist() == pair.prompt_ids + pair.response_ids
            assert batch.input_ids[row][batch.response_mask[row]].tolist() == pair.response_ids
            assert batch.position_ids[row][real].tolist() == list(range(int(real.sum())))
    with pytest.raises(ValueError, match="padding_side"):
        collate(pairs, 0, "middle")


def test_prompt_too_long_is_rejected(smollm2_tokenizer):
    with pytest.raises(ValueError, match="leaves no room for a response"):
        encode_pair(smollm2_tokenizer, "word " * 50, "answer", max_length=10)
    pair = encode_pair(smollm2_tokenizer, "q", "one two three four five six", max_length=40)
    assert len(pair.prompt_ids) + len(pair.response_ids) <= 40


def _wordpiece_vocab(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "right", "##eous", "##ness", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return str(tmp_path / "vocab.txt")


def test_python_tokenizer_offsets_by_decoding_match_fast_ones(tmp_path):
    """A real pure-Python (slow) WordPiece tokenizer next to the fast one over the same vocabulary."""
    vocab = _wordpiece_vocab(tmp_path)
    slow, fast = BertTokenizerLegacy(vocab, do_lower_case=False), BertTokenizer(vocab, do_lower_case=False)
    assert not slow.is_fast and fast.is_fast
    text = "hello righteousness world."
    slow_ids, slow_offsets = encode_response(slow, text)
    fast_ids, fast_offsets = encode_response(fast, text)
    assert slow_ids == fast_ids
    assert [end for _, end in slow_offsets] == [end for _, end in fast_offsets]


def test_normalizing_python_tokenizer_is_a_clear_error(tmp_path):
    lowercasing = BertTokenizerLegacy(_wordpiece_vocab(tmp_path), do_lower_case=True)
    with pytest.raises(OffsetsUnavailableError, match="normalizes"):
        encode_response(lowercasing, "Hello World")
