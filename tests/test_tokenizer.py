"""Incremental decoding streams exactly the text that decoding everything at once gives."""

from hypothesis import given
from hypothesis import strategies as st

from minifd.model.tokenizer import IncrementalDecoder, Tokenizer
from tiny_model import byte_tokenizer

TOKENIZER = Tokenizer(byte_tokenizer(), bos_id=256, add_bos=True, eos_ids=[257])


@given(prompt=st.text(max_size=10), continuation=st.text(min_size=1, max_size=30))
def test_streamed_pieces_join_to_the_full_decode(prompt, continuation):
    prompt_ids = TOKENIZER.encode(prompt)
    new_ids = TOKENIZER.tokenizer.encode(continuation, add_special_tokens=False).ids
    decoder = IncrementalDecoder(TOKENIZER, prompt_ids)
    pieces = [decoder.push(token) for token in new_ids]
    assert "".join(pieces) == TOKENIZER.decode(new_ids) == continuation
    assert all("\ufffd" not in piece for piece in pieces)


def test_multibyte_characters_wait_for_their_last_byte():
    ids = TOKENIZER.tokenizer.encode("é", add_special_tokens=False).ids
    assert len(ids) == 2
    decoder = IncrementalDecoder(TOKENIZER, [256])
    assert decoder.push(ids[0]) == ""
    assert decoder.push(ids[1]) == "é"


def test_flush_drops_a_character_whose_last_bytes_never_came():
    pizza = TOKENIZER.tokenizer.encode("🍕", add_special_tokens=False).ids
    assert len(pizza) == 4
    decoder = IncrementalDecoder(TOKENIZER, [256])
    assert [decoder.push(token) for token in pizza + pizza[:2]] == ["", "", "", "🍕", "", ""]
    assert decoder.flush() == ""

