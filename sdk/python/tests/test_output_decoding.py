"""Command output split inside a multi-byte UTF-8 character (offline: apply_event only)."""
import base64

from nullspace._core import CommandResult, apply_event


def b64(raw: bytes) -> dict:
    return {"dataBase64": base64.b64encode(raw).decode()}


def run(events):
    result = CommandResult()
    out, err = [], []
    ended = False
    for e in events:
        ended |= apply_event(e, result, out.append, err.append)
    return ended, result, out, err


def test_character_split_across_base64_chunks():
    euro = "€".encode()  # 3 bytes
    ended, r, out, _ = run([
        {"event": "start", "pid": 1},
        {"event": "stdout", **b64(b"a" + euro[:1])},
        {"event": "stdout", **b64(euro[1:2])},
        {"event": "stdout", **b64(euro[2:] + b"b")},
        {"event": "stdout", "data": "c"},
        {"event": "exit", "exitCode": 0},
    ])
    assert ended
    assert r.stdout == "a€bc"
    assert "".join(out) == "a€bc"
    assert r.exit_code == 0


def test_streams_decode_separately_and_flush_at_exit():
    smile = "😀".encode()  # 4 bytes
    ended, r, out, err = run([
        {"event": "stdout", **b64(smile[:2])},
        {"event": "stderr", **b64(b"x" + smile[:1])},
        {"event": "stdout", **b64(smile[2:])},
        {"event": "stderr", **b64(smile[1:])},
        # A truncated character at the end is replaced, not dropped.
        {"event": "stdout", **b64(smile[:3])},
        {"event": "exit", "exitCode": 1},
    ])
    assert ended
    assert r.stdout == "😀\ufffd"
    assert r.stderr == "x😀"
    assert "".join(out) == r.stdout and "".join(err) == r.stderr


def test_invalid_bytes_are_replaced():
    _, r, _, _ = run([{"event": "stderr", **b64(b"\xffA")}, {"event": "exit", "exitCode": 0}])
    assert r.stderr == "\ufffdA"
    assert "_decoders" not in repr(r)
