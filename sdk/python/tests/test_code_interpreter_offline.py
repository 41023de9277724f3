"""run_code's event reading, without a stack: the code-interpreter helper's JSON lines
(docs/TEMPLATES.md) split anywhere across output chunks become one ``Execution``."""

import base64
import json

import pytest

from nullspace import AsyncSandbox, CodeContext, Execution, Sandbox, SandboxError
from nullspace._core import (CODE_HELPER, CodeEventReader, CommandResult, code_command, desktop_command,
                             code_context_args, context_event)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()
EVENTS = [
    {"type": "stdout", "text": "hello\n"},
    {"type": "stderr", "text": "warn\n"},
    {"type": "result", "isMainResult": False, "data": {"text/plain": "<Figure>",
                                                        "image/png": PNG}},
    {"type": "result", "isMainResult": True, "data": {"text/plain": "42",
                                                       "text/html": "<b>42</b>"}},
    {"type": "error", "name": "ValueError", "value": "bad", "traceback": ["line 1", "bad"]},
    {"type": "done", "executionCount": 3},
]


def test_events_split_across_chunks_make_one_execution():
    stream = "".join(json.dumps(e) + "\n" for e in EVENTS)
    seen = {"stdout": [], "stderr": [], "result": [], "error": []}
    x = Execution()
    reader = CodeEventReader(x, seen["stdout"].append, seen["stderr"].append,
                             seen["result"].append, seen["error"].append)
    for i in range(0, len(stream), 7):
        reader.feed(stream[i:i + 7])
    reader.finish(CommandResult(exit_code=0))
    assert x.logs.stdout == ["hello\n"] and x.logs.stderr == ["warn\n"]
    assert [r.is_main_result for r in x.results] == [False, True]
    assert x.results[0].png == PNG and x.results[0].png_bytes().startswith(b"\x89PNG")
    assert x.results[1].text == "42" and x.results[1].html == "<b>42</b>"
    assert x.results[1].formats() == ["text", "html"]
    assert x.text == "42"
    assert (x.error.name, x.error.value, x.error.traceback) == ("ValueError", "bad",
                                                                 ["line 1", "bad"])
    assert x.execution_count == 3 and not x.timed_out
    assert seen["stdout"] == ["hello\n"] and len(seen["result"]) == 2
    assert str(seen["error"][0]) == "ValueError: bad"


def test_a_run_without_a_done_event_says_why():
    reader = CodeEventReader(Execution())
    reader.feed("")
    with pytest.raises(SandboxError) as e:
        reader.finish(CommandResult(exit_code=127, stderr="sh: nullspace-code: not found"))
    assert e.value.code == "code_interpreter"
    assert "not found" in e.value.message and "code-interpreter sandbox" in e.value.message


def test_commands_and_contexts():
    assert code_context_args(None, None) == ("default", "python")
    assert code_context_args(CodeContext("abc", "bash"), None) == ("abc", "bash")
    assert code_context_args("abc", "python") == ("abc", "python")
    with pytest.raises(SandboxError):
        code_context_args(None, "r")
    cmd = code_command("default", "python", 30, code_b64="eDE=")
    assert cmd == f"{CODE_HELPER} run --context default --language python --timeout 30 --code-b64 eDE="
    assert "--code-file /tmp/x" in code_command("c1", "bash", 1.5, code_file="/tmp/x")
    assert context_event(CommandResult(stdout='{"type": "context", "id": "c1"}\n'))["id"] == "c1"


def test_both_classes_have_the_code_calls():
    for cls in (Sandbox, AsyncSandbox):
        for name in ("run_code", "create_code_context", "remove_code_context"):
            assert callable(getattr(cls, name)), (cls, name)


def test_desktop_commands_and_the_viewer_url():
    from nullspace._core import desktop_command, parse_windows, viewer_url
    url = viewer_url("http://6080-sbx-1.localhost:7072/?ns_preview_token=abc", view_only=True)
    assert url.startswith("http://6080-sbx-1.localhost:7072/vnc.html?")
    for part in ("ns_preview_token=abc", "autoconnect=1", "view_only=1", "path=websockify"):
        assert part in url, url
    assert "view_only" not in viewer_url("http://h/?ns_preview_token=t", view_only=False)
    assert desktop_command("click", 1, 2, 10, 20) == (
        "xdotool mousemove --sync 10 20 && xdotool click --repeat 2 --delay 80 1")
    assert desktop_command("type", "it's") == "xdotool type --delay 15 -- 'it'\"'\"'s'"
    assert desktop_command("press", ("ctrl+l", "Return")) == "xdotool key -- ctrl+l Return"
    assert desktop_command("open", "https://example.com").startswith("setsid -f x-www-browser")
    assert desktop_command("scroll", -3) == "xdotool click --repeat 3 --delay 30 4"
    wins = parse_windows("0x00e00003  0 321    10 20  640 480  sbx xterm: user@sbx\n")
    assert wins == [{"id": "0x00e00003", "desktop": 0, "pid": 321, "x": 10, "y": 20,
                     "width": 640, "height": 480, "title": "xterm: user@sbx"}]


@pytest.mark.parametrize("action,args", [
    ("move", (-5, 10)), ("click", (1, 1, 3, -1)), ("click", (1, 1, "3", 4)),
    ("move", (True, 2)), ("scroll", (1001,)), ("scroll", (2.5,)),
])
def test_desktop_input_off_the_screen_is_refused(action, args):
    with pytest.raises(SandboxError) as e:
        desktop_command(action, *args)
    assert e.value.code == "invalid_request"
