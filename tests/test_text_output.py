"""Stop strings across token boundaries and UTF-8 characters split across tokens."""

from __future__ import annotations

from llmserve.server.engines.text_output import TextAssembler


def run(pieces: list[bytes], stops: tuple[str, ...]) -> tuple[str, bool]:
    assembler = TextAssembler(stops)
    out = ""
    for piece in pieces:
        out += assembler.feed(piece)
        if assembler.stopped:
            return out, True
    return out + assembler.flush(), False


def test_without_stops_text_passes_straight_through():
    assembler = TextAssembler(())
    assert assembler.feed(b"Hello") == "Hello"
    assert assembler.feed(b" world") == " world"


def test_stop_split_across_tokens_is_not_emitted():
    assert run([b"The end", b" of", b" ST", b"OP", b" more"], ("STOP",)) == ("The end of ", True)


def test_partial_stop_that_does_not_complete_is_released():
    assert run([b"ST", b"AR", b"T"], ("STOP",)) == ("START", False)


def test_text_before_a_stop_inside_one_token_is_kept():
    assert run([b"abc\n\nUser:"], ("\n\nUser:",)) == ("abc", True)


def test_earliest_of_several_stops_wins():
    assert run([b"one two three"], ("three", "two")) == ("one ", True)


def test_multibyte_character_split_across_tokens():
    euro = "€".encode()
    assert run([euro[:1], euro[1:2], euro[2:], b"!"], ()) == ("€!", False)


def test_invalid_bytes_become_replacement_characters_not_errors():
    assert run([b"\xff", b"ok"], ()) == ("\ufffdok", False)


def test_flush_after_stop_returns_nothing():
    assembler = TextAssembler(("x",))
    assert assembler.feed(b"ax") == "a"
    assert assembler.flush() == ""
