"""The event definitions themselves: the documentation generated from them, and a sender that
never raises whatever it is handed."""

from __future__ import annotations

from pathlib import Path

from llmserve.shared.client import EventSender
from llmserve.shared.protocol import End, decode_datagram, encode_datagram, pack_event
from llmserve.shared.protocol_doc import BEGIN, END, render

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def an_end(**changes: object) -> End:
    fields: dict[str, object] = {
        "req": 1, "rid": "r", "key": "k", "model": "m", "endpoint": "chat", "stream": True,
        "status": "ok", "http_status": 200, "finish_reason": "stop", "error_type": None,
        "error": None, "cancel_reason": None, "prompt_tokens": 1, "completion_tokens": 2,
        "cached_tokens": 0, "e2e_ns": 1, "ttft_ns": 1, "queue_ns": 0, "prefill_ns": 1,
        "decode_ns": 1, "gen_ns": 1,
    }  # fmt: skip
    return End(**{**fields, **changes})  # type: ignore[arg-type]


def test_the_documented_wire_format_is_generated_from_the_definitions() -> None:
    text = DOC.read_text()
    committed = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert committed == render(), "run: python -m llmserve.shared.protocol_doc"


def test_a_sender_handed_what_cannot_be_packed_counts_it_and_never_raises(short_tmp: str) -> None:
    sender = EventSender(f"{short_tmp}/none.sock", max_buffered=10)
    sender.emit("no-such-kind", rid="r")
    sender.emit("end", not_a_field=1)
    sender.send(an_end(e2e_ns=2**70))  # no msgpack integer holds it
    assert (sender.unsendable, sender.buffered) == (3, 0)
    sender.close()


def test_text_is_cut_to_its_bound_after_surrogates_are_replaced() -> None:
    # Each lone surrogate becomes three replacement characters: the cut comes after.
    event = an_end(error="\udcff" * 2048, key="\ud800" * 256)
    packed = pack_event(event)
    (decoded,) = decode_datagram(encode_datagram("i", [packed])).events
    assert isinstance(decoded, End)
    error = decoded.error or ""
    assert len(error) == 2048 and error.endswith("...[truncated]")
    assert len(decoded.key) == 256 and decoded.key.startswith("\ufffd")
