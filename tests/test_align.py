import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from titok.core.span_transfer import AlignmentError, align_to_tokenizer, align_values, alignment_groups, token_boundaries
from titok.core.sequences import encode_response
from tests.conftest import real_tokenizer

unicode_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60
) | st.sampled_from(["righteousness", " naïve café 😀👍🏽 東京\n\n\tend ", "a  b   c", "x" * 40])

SETTINGS = settings(max_examples=150, deadline=None)
SMOLLM2, GEMMA3 = "smollm2-135m", "gemma3-270m"


def test_righteousness_split_copies_the_smollm2_value_to_gemma_pieces(smollm2_tokenizer, gemma3_tokenizer):
    text = "righteousness"
    src_ids, src_offsets = encode_response(smollm2_tokenizer, text)
    tgt_ids, tgt_offsets = encode_response(gemma3_tokenizer, text)
    assert smollm2_tokenizer.convert_ids_to_tokens(src_ids) == ["right", "eous", "ness"]
    assert gemma3_tokenizer.convert_ids_to_tokens(tgt_ids) == ["righteous", "ness"]
    values = align_values(src_offsets, [1.0, 4.0, 7.0], tgt_offsets, len(text))
    # "righteous" = "right"(5 chars, 1.0) + "eous"(4 chars, 4.0): char-weighted mean; "ness" copies.
    np.testing.assert_allclose(values, [(5 * 1.0 + 4 * 4.0) / 9, 7.0])
    # and the other way round: one source token over two target tokens copies to each
    back = align_values(tgt_offsets, [2.0, 3.0], src_offsets, len(text))
    np.testing.assert_allclose(back, [2.0, 2.0, 3.0])


def test_hand_built_many_to_many():
    # text "abcdef": source "ab|cde|f", target "abc|def"
    groups = alignment_groups([(0, 2), (2, 5), (5, 6)], [(0, 3), (3, 6)], 6)
    assert groups == [([0, 1, 2], [0, 1])]
    values = align_values([(0, 2), (2, 5), (5, 6)], [1.0, 2.0, 3.0], [(0, 3), (3, 6)], 6)
    np.testing.assert_allclose(values, [(2 * 1 + 3 * 2 + 1 * 3) / 6] * 2)


def test_leading_space_markers_and_gaps():
    # "a b": one tokenizer puts the space in " b" (1,3), the other leaves it out (2,3)
    np.testing.assert_allclose(align_values([(0, 1), (1, 3)], [1.0, 5.0], [(0, 1), (2, 3)], 3), [1.0, 5.0])


def test_bos_on_one_side_only(smollm2_tokenizer, gemma3_tokenizer):
    text = "True and False"
    src_ids, src_offsets = encode_response(smollm2_tokenizer, text)
    enc = gemma3_tokenizer(text, return_offsets_mapping=True)  # may add <bos> with an empty span
    tgt_offsets = [(0, 0)] + [tuple(o) for o in enc["offset_mapping"] if o != (0, 0)]
    values = align_values(src_offsets, np.arange(len(src_ids), dtype=float), tgt_offsets, len(text))
    assert len(values) == len(tgt_offsets) and not np.isnan(values).any()
    # a BOS on the source side carries no weight
    with_bos = align_values([(0, 0)] + src_offsets, [100.0, *range(len(src_ids))], src_offsets, len(text))
    np.testing.assert_allclose(with_bos, np.arange(len(src_ids)))


def test_byte_fallback_pieces_share_their_character():
    # an emoji split into 4 byte tokens with the same span, next to a word
    bounds = token_boundaries([(0, 2), (2, 3), (2, 3), (2, 3), (2, 3)], 3)
    np.testing.assert_allclose(bounds, [0, 2, 2.25, 2.5, 2.75, 3])
    np.testing.assert_allclose(align_values([(0, 2)] + [(2, 3)] * 4, [0, 1, 2, 3, 4], [(0, 3)], 3), [(0 + 2.5) / 3])


def test_bad_offsets_raise():
    with pytest.raises(AlignmentError, match="do not fit a text of 3"):
        token_boundaries([(0, 5)], 3)
    with pytest.raises(AlignmentError, match="no character spans"):
        token_boundaries([(0, 0), (0, 0)], 4)
    with pytest.raises(AlignmentError, match="no tokens"):
        token_boundaries([], 4)
    with pytest.raises(AlignmentError, match="2 source values for 1 source tokens"):
        align_values([(0, 1)], [1.0, 2.0], [(0, 1)], 1)


def test_text_a_tokenizer_drops_entirely_is_a_clear_error(smollm2_tokenizer, gemma3_tokenizer):
    text = "\x06"  # SmolLM2's byte-level BPE has no token for this control character; Gemma has <0x06>
    src_ids, src_offsets = encode_response(smollm2_tokenizer, text)
    assert src_ids == []
    with pytest.raises(AlignmentError, match="drops all of them"):
        align_to_tokenizer(text, src_offsets, [], gemma3_tokenizer)


def _check_alignment(src_tok, tgt_tok, text, seed):
    src_ids, src_offsets = encode_response(src_tok, text)
    assume(src_ids and encode_response(tgt_tok, text)[0])  # texts a tokenizer drops whole are tested below
    values = np.random.default_rng(seed).normal(size=len(src_ids))
    tgt_ids, tgt_offsets, tgt_values = align_to_tokenizer(text, src_offsets, values, tgt_tok)
    # every target token gets a value
    assert len(tgt_values) == len(tgt_ids) and np.isfinite(tgt_values).all()
    # every character is covered exactly once on both sides, and groups partition both token lists
    src_bounds, tgt_bounds = token_boundaries(src_offsets, len(text)), token_boundaries(tgt_offsets, len(text))
    assert src_bounds[0] == tgt_bounds[0] == 0 and src_bounds[-1] == tgt_bounds[-1] == len(text)
    groups = alignment_groups(src_offsets, tgt_offsets, len(text))
    assert sorted(i for g in groups for i in g[0]) == list(range(len(src_ids)))
    assert sorted(j for g in groups for j in g[1]) == list(range(len(tgt_ids)))
    # the character-weighted mean is preserved
    np.testing.assert_allclose(tgt_values @ np.diff(tgt_bounds), values @ np.diff(src_bounds), rtol=1e-9, atol=1e-9)
    # masks stay in [0, 1]
    mask = (values > 0).astype(float)
    aligned_mask = align_values(src_offsets, mask, tgt_offsets, len(text))
    assert ((aligned_mask >= 0) & (aligned_mask <= 1 + 1e-12)).all()


@SETTINGS
@given(text=unicode_text, seed=st.integers(0, 1000))
def test_smollm2_to_gemma3_properties(text, seed):
    _check_alignment(real_tokenizer(SMOLLM2), real_tokenizer(GEMMA3), text, seed)


@SETTINGS
@given(text=unicode_text, seed=st.integers(0, 1000))
def test_gemma3_to_smollm2_properties(text, seed):
    _check_alignment(real_tokenizer(GEMMA3), real_tokenizer(SMOLLM2), text, seed)


@SETTINGS
@given(text=unicode_text, seed=st.integers(0, 1000), which=st.sampled_from([SMOLLM2, GEMMA3]))
def test_identical_tokenizers_give_the_identity_map(text, seed, which):
    tokenizer = real_tokenizer(which)
    ids, offsets = encode_response(tokenizer, text)
    assume(ids)
    values = np.random.default_rng(seed).normal(size=len(ids))
    assert all(len(s) == 1 and len(t) == 1 for s, t in alignment_groups(offsets, offsets, len(text)))
    np.testing.assert_array_equal(align_values(offsets, values, offsets, len(text)), values)


# ---------- target-aware selection: the group arithmetic ----------

def test_identical_tokenizers_reduce_to_per_token_differences():
    from titok.core.reference import target_token_scores

    offsets = [(0, 3), (3, 8), (8, 12)]
    expert, amateur, target = [-0.5, -1.0, -2.0], [-0.7, -3.0, -2.5], [-1.5, -0.2, -2.0]
    np.testing.assert_allclose(target_token_scores(offsets, expert, amateur, offsets, target, 12, "target_base"),
                               np.subtract(expert, target))
    both = target_token_scores(offsets, expert, amateur, offsets, target, 12, "both")
    np.testing.assert_allclose(both, np.maximum(np.subtract(expert, target), np.subtract(expert, amateur)))


def test_a_split_token_scores_the_same_whichever_side_splits_it():
    """'righteousness' as three source tokens and one target token, then the other way round: the
    group compares the same span's total log-probabilities, so the score is the same."""
    from titok.core.reference import target_token_scores

    text_length = len("righteousness")
    pieces, whole = [(0, 5), (5, 9), (9, 13)], [(0, 13)]
    piece_lp, whole_lp = [-1.0, -0.5, -0.25], [-3.0]
    split_source = target_token_scores(pieces, piece_lp, [0, 0, 0], whole, whole_lp, text_length, "target_base")
    split_target = target_token_scores(whole, [-1.75], [0], pieces, [-1.0, -1.0, -1.0], text_length, "target_base")
    assert split_source.tolist() == [-1.75 + 3.0]  # sum of the pieces against the whole
    assert split_target.tolist() == [-1.75 + 3.0] * 3  # the whole against the sum of the pieces, on every piece
