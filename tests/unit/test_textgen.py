"""Incremental detokenization and stop sequences, without a server."""
import pytest

from router.generation import IncrementalDecoder, StopMatcher, StreamDecoder, incremental_decoder
from sluice.modelfiles import load_tokenizer, resolve


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve(None))


# Both decoders keep the same rule: tokenizers' streaming one (Rust) and ours (Python, for tokenizers only
# transformers decodes right).
DECODERS = {"stream": lambda tok, ids: StreamDecoder(tok.backend_tokenizer, ids), "python": IncrementalDecoder}


@pytest.fixture(params=sorted(DECODERS))
def make_decoder(request):
    return DECODERS[request.param]


def test_a_rust_tokenizer_gets_the_streaming_decoder(tokenizer):
    assert type(incremental_decoder(tokenizer, [])) is StreamDecoder


@pytest.mark.parametrize("text", ["Héllo wörld, 日本語のテキスト 😀🎉 and ascii", " leading space\nnew line\ttab"])
def test_pieces_are_whole_characters_and_add_up(tokenizer, make_decoder, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decoder = make_decoder(tokenizer, tokenizer("Say:", add_special_tokens=False).input_ids)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    # Byte-level BPE splits emoji over several tokens: some tokens must have waited for the next one.
    if "😀" in text:
        assert "" in pieces[:-1]


def test_a_character_cut_by_the_end_still_shows(tokenizer, make_decoder):
    """The generation ended inside a character: flush gives what is left (a replacement character), not nothing."""
    ids = tokenizer("ok 😀", add_special_tokens=False).input_ids
    decoder = make_decoder(tokenizer, [])
    pieces = [decoder.add(i) for i in ids[:-1]]
    assert "".join(pieces) == "ok" and decoder.flush().strip() == "\ufffd"


def test_special_tokens_have_no_text(tokenizer, make_decoder):
    decoder = make_decoder(tokenizer, [])
    assert decoder.add(tokenizer("Hi", add_special_tokens=False).input_ids[0]) == "Hi"
    assert decoder.add(tokenizer.eos_token_id) == ""


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out = []
    for p in pieces:
        text, stopped = matcher.add(p)
        out.append(text)
        if stopped:
            return out, True
    out.append(matcher.finish())
    return out, False


def test_hold_back_never_emits_the_stop_string():
    out, stopped = feed(StopMatcher(["\nUser:"], hold_back=True), ["Hello", " there", "\n", "Us", "er:", " more"])
    assert stopped and "".join(out) == "Hello there"
    assert out[2] == "" and out[3] == ""  # "\n" and "\nUs" could still become the stop string


def test_hold_back_releases_a_false_alarm():
    out, stopped = feed(StopMatcher(["\nUser:"], hold_back=True), ["a", "\n", "Usage", " b"])
    assert not stopped and "".join(out) == "a\nUsage b"
    assert out[1] == "" and out[2] == "\nUsage"


def test_stop_inside_one_piece_cuts_the_rest():
    out, stopped = feed(StopMatcher(["END", "zz"], hold_back=True), ["abc", "dENDxyz"])
    assert stopped and "".join(out) == "abcd"


def test_without_hold_back_text_flows_and_keeps_the_match():
    matcher = StopMatcher(["wor"], hold_back=False)
    out, stopped = feed(matcher, ["hello", " w", "orld"])
    assert stopped and out == ["hello", " w", "orld"]
