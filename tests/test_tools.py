"""Function calling: the tool-call formats (neolm.tool_calls) read back what they write, the plain transcript
teaches its format, and the server answers tool_choice "auto", "required", "none" and named functions as OpenAI
and vLLM do, streamed and whole."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import tokenizers
from conftest import NAME
from test_cli import cli
from test_conversation import run_chat
from test_serve import call
from test_structured import _events

import neolm
from neolm.chat import Template, Transcript
from neolm.errors import NeolmError
from neolm.serve import answer, protocol
from neolm.serve.engine import End, Job, Token
from neolm.serve.tools import CallStream, Held, ToolChoice
from neolm.tokenizer import StreamDecoder, Tokenizer
from neolm.tool_calls import FORMATS, Call

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"]}}},
]  # fmt: skip
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TOOL_CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
             "max_tokens": 200, "temperature": 0}  # fmt: skip
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_named_tool_choice_answers_one_call_of_that_function(server):
    status, body = call(server, "/v1/chat/completions", TOOL_CHAT | {"tool_choice": NAMED})
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None
    (tool_call,) = choice["message"]["tool_calls"]
    assert tool_call["type"] == "function" and tool_call["id"].startswith("chatcmpl-tool-")
    assert tool_call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(tool_call["function"]["arguments"]), SCHEMA_OF["get_weather"])
    status, text = call(server, "/v1/chat/completions", TOOL_CHAT | {"tool_choice": NAMED, "stream": True})
    chunks = [e["choices"][0]["delta"] for e in _events(text)]
    assert chunks[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    streamed = "".join(d["tool_calls"][0]["function"]["arguments"] for d in chunks[1:] if d)
    assert streamed == tool_call["function"]["arguments"]


def test_required_tool_choice_answers_calls_of_the_tools(server):
    status, body = call(
        server, "/v1/chat/completions", TOOL_CHAT | {"tool_choice": "required", "parallel_tool_calls": False}
    )
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, body
    (tool_call,) = choice["message"]["tool_calls"]
    name = tool_call["function"]["name"]
    jsonschema.validate(json.loads(tool_call["function"]["arguments"]), SCHEMA_OF[name])


NESTED_TOOLS = [  # parameters with $defs, as Pydantic writes them: both name theirs "Item"; "tree" refers to itself
    {"type": "function", "function": {"name": "tree", "parameters": {"type": "object", "properties": {
        "label": {"$ref": "#/$defs/Item"}, "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}},
        "required": ["label", "kids"], "$defs": {"Item": {"enum": ["a", "b"]}}}}},
    {"type": "function", "function": {"name": "count", "parameters": {"type": "object", "properties": {
        "n": {"$ref": "#/$defs/Item"}}, "required": ["n"], "$defs": {"Item": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}}}}},
]  # fmt: skip


def test_required_tool_calls_keep_each_tool_s_own_defs(server):
    """A "required" answer is held to one schema for all the tools: each tool's $defs move into it under names of
    their own, and its $refs with them ("#": the tool's parameters)."""
    from neolm.serve.tools import required_schema

    schema = required_schema({t["function"]["name"]: t["function"]["parameters"] for t in NESTED_TOOLS})
    assert sorted(schema["$defs"]) == ["tool0", "tool0-defs-Item", "tool1-defs-Item"]
    good = [{"name": "tree", "parameters": {"label": "a", "kids": [{"label": "b", "kids": []}]}},
            {"name": "count", "parameters": {"n": 7}}]  # fmt: skip
    jsonschema.validate(good, schema)
    for bad in ({"name": "tree", "parameters": {"label": "c", "kids": []}},
                {"name": "tree", "parameters": {"label": "a", "kids": [{"label": 1, "kids": []}]}},
                {"name": "count", "parameters": {"n": "a"}}):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([bad], schema)
    status, body = call(server, "/v1/chat/completions", TOOL_CHAT | {"tools": NESTED_TOOLS, "tool_choice": "required"})
    assert status == 200, body
    calls = body["choices"][0]["message"]["tool_calls"]
    own = {t["function"]["name"]: t["function"]["parameters"] for t in NESTED_TOOLS}
    for tool_call in calls:
        jsonschema.validate(json.loads(tool_call["function"]["arguments"]), own[tool_call["function"]["name"]])


def test_required_tool_calls_stream_as_they_are_written(server):
    """A "required" call opens (id, type, name, no arguments) once its name is written, then its arguments come in
    pieces as the model writes them, adding up to the whole answer's; the last chunk only ends the choice."""
    fields = {"tool_choice": "required", "parallel_tool_calls": False}
    status, body = call(server, "/v1/chat/completions", TOOL_CHAT | fields)
    status, text = call(server, "/v1/chat/completions", TOOL_CHAT | fields | {"stream": True})
    assert status == 200
    events = [e["choices"][0] for e in _events(text)]
    assert events[0]["delta"] == {"role": "assistant", "content": None}
    assert events[-1] == events[-1] | {"finish_reason": "tool_calls", "delta": {}}
    deltas = [d for e in events[1:-1] for d in e["delta"]["tool_calls"]]
    (whole,) = body["choices"][0]["message"]["tool_calls"]
    opening = deltas[0]
    assert opening["index"] == 0 and opening["type"] == "function" and opening["id"].startswith("chatcmpl-tool-")
    assert opening["function"] == {"name": whole["function"]["name"], "arguments": ""}
    pieces = [d["function"]["arguments"] for d in deltas[1:]]
    assert all(d["index"] == 0 and set(d) == {"index", "function"} for d in deltas[1:]) and len(pieces) > 3
    assert "".join(pieces) == whole["function"]["arguments"]
    jsonschema.validate(json.loads(whole["function"]["arguments"]), SCHEMA_OF[whole["function"]["name"]])


@pytest.mark.parametrize("text", [
    '[{"name": "time", "parameters": {"zone": "UTC"}}]',
    ('[{"name":"get_weather","parameters":{"city":"Pa\\"ri}s[","unit":"c","n":[1,{"a":[]}]}} , {"name": "time",'
     ' "parameters": {}}]'),
    '[ { "name" : "a\\"b" , "parameters" : 12 },{"name": "c", "parameters": "x,}"}, {"name": "d", "parameters": null}]',
])  # fmt: skip
def test_a_required_reply_s_calls_are_read_as_it_is_written(text):
    """CallStream, piece by piece in every split of one to five characters: each call opens once with its name, and
    its arguments' pieces add up to exactly the text written for its parameters, which is the whole answer's."""
    expected = [(c["name"], json.dumps(c["parameters"])) for c in json.loads(text)]
    _, calls = ToolChoice(functions=("time", "get_weather")).answer(text)
    assert [(c["function"]["name"], json.dumps(json.loads(c["function"]["arguments"]))) for c in calls] == expected
    for size in range(1, 6):
        stream, opened, arguments = CallStream(), [], {}
        for i in range(0, len(text), size):
            for delta in stream.push(text[i : i + size]):
                if "id" in delta:
                    opened.append(delta["function"]["name"])
                    assert delta["index"] == len(opened) - 1 and delta["function"]["arguments"] == ""
                else:
                    arguments[delta["index"]] = arguments.get(delta["index"], "") + delta["function"]["arguments"]
        assert opened == [name for name, _ in expected]
        assert [arguments.get(k, "") for k in range(len(opened))] == [c["function"]["arguments"] for c in calls]


def test_openai_client_reads_tool_calls(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="none")
    reply = client.chat.completions.create(model=NAME, messages=TOOL_CHAT["messages"], tools=TOOLS, tool_choice=NAMED,
                                           max_tokens=200, temperature=0)  # fmt: skip
    arguments = json.loads(reply.choices[0].message.tool_calls[0].function.arguments)
    jsonschema.validate(arguments, SCHEMA_OF["get_weather"])


def test_a_conversation_with_tool_calls_and_results_is_rendered(server):
    messages = TOOL_CHAT["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "12 C"},
    ]  # fmt: skip
    status, body = call(server, "/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 5})
    assert status == 200, body
    text = Transcript().render(messages)
    assert ('Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>\n'
            in text)  # fmt: skip
    assert text.endswith("Tool: 12 C\nAssistant:")
    template = Template("{% for t in tools %}{{ t.function.name }};{% endfor %}{% for m in messages %}{{ m.role }}="
                        "{{ m.tool_call_id or '' }}{{ m.content }}|{% endfor %}")  # fmt: skip
    assert template.render(messages, tools=TOOLS) == ("get_weather;time;user=Weather in Paris?|assistant=|tool=112 C|")


@pytest.mark.parametrize("fields, param, needle", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not among the tools"),
    ({"tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tool_choice", "leave out response_format"),
    ({"tools": [{"type": "function"}], "tool_choice": "none"}, "tools", "tools[0]"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tool_choice": "sometimes"}, "tool_choice", "must be"),
])  # fmt: skip
def test_tool_requests_neolm_cannot_answer_are_refused(server, fields, param, needle):
    status, body = call(server, "/v1/chat/completions", TOOL_CHAT | fields)
    assert status == 400 and needle in body["error"]["message"] and body["error"]["param"] == param, body


def test_tokenize_counts_a_chat_with_tools_as_its_request_reads_it(server):
    status, body = call(server, "/v1/chat/completions", TOOL_CHAT | {"tool_choice": NAMED, "max_tokens": 3})
    assert status == 200, body
    status, tokens = call(server, "/tokenize", {"messages": TOOL_CHAT["messages"], "tools": TOOLS})
    assert status == 200 and tokens["count"] == body["usage"]["prompt_tokens"], tokens


# tool_choice "auto": the model's own calls, read in its chat format's tool-call format


def test_hermes_reads_content_and_calls():
    hermes = FORMATS["hermes"]
    text = 'Let me look.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "b", ' \
        '"arguments": "{\\"y\\": [2]}"}'  # fmt: skip
    assert hermes.parse(text) == ("Let me look.", [Call("a", {"x": 1}), Call("b", {"y": [2]})])  # the last left open
    assert hermes.parse('<tool_call>{"name": "a"}</tool_call>') == (None, [Call("a", {})])
    for text in ("no call here", '<tool_call>{"name": "a", "arguments": {"x": </tool_call>', "<tool_call>[1]",
                 '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"name": "a", "arguments": 3}'):  # fmt: skip
        assert hermes.parse(text) is None, text
    # the calls up to the first that does not parse: what follows it is left out
    text = '<tool_call>{"name": "a"}</tool_call> then <tool_call>{"name": 3}</tool_call><tool_call>{"name": "c"}'
    assert hermes.parse(text) == (None, [Call("a", {})])
    assert hermes.calls(text[:-5], final=False) == hermes.calls(text[:36], final=False) == [Call("a", {})]
    assert hermes.calls(text[:24], final=False) == [] and hermes.calls(text[:24]) == [Call("a", {})]  # (left open)


def test_llama3_json_reads_calls_joined_by_semicolons():
    fmt = FORMATS["llama3_json"]
    assert fmt.parse(' <|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "arguments": {}}') == (
        None, [Call("a", {"x": 1}), Call("b", {})])  # fmt: skip
    for text in ("Hello {", '{"name": "a"', "<|python_tag|>3", '[{"name": "a"}]'):
        assert fmt.parse(text) is None, text
    # the calls up to the first that does not parse: what follows it is left out; a call is whole once it closes
    assert fmt.parse('{"name": "a"} and more') == fmt.parse('{"name": "a"}; {"name": 3}; {"name": "c"}') == (
        None, [Call("a", {})])  # fmt: skip
    assert fmt.calls('{"name": "a"}', final=False) == [Call("a", {})] and fmt.calls('{"name": "a"', final=False) == []


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_a_format_reads_back_the_calls_it_writes(name):
    fmt = FORMATS[name]
    calls = [Call("get_weather", {"city": "Zürich", "unit": "c"}), Call("time", {"zone": "CET", "n": [1, None]}),
             Call("f", {"class": True, "a-b": {'q"': "x\n)", "r": [{"s": -1.5e-3}]}, "z": "ü\\"})]  # fmt: skip
    content, parsed = fmt.parse(fmt.write(calls))
    assert parsed == calls and content is None


TIME, LATER = '{"name": "time", "arguments": {}}', '{"name": "time", "arguments": {"zone": "CET"}}'


@pytest.mark.parametrize("name, text, content, streamed, whole", [
    ("hermes", f"Sure, <b>one</b> moment.<tool_call>{TIME}</tool_call>", "Sure, <b>one</b> moment.", 1, 1),
    ("hermes", "A <tool_ca without a call, ending in <tool_c", "A <tool_ca without a call, ending in <tool_c", 0, 0),
    ("hermes", f"A.\n<tool_call>{TIME}</tool_call>\n<tool_call>{LATER}</tool_call><tool_call>{{bad", "A.", 2, 2),
    ("hermes", f"<tool_call>{TIME}</tool_call><tool_call>{LATER}", "", 1, 2),  # the last closed by the reply's end
    ("hermes", f'<tool_call>{TIME}</tool_call><tool_call>{{"name": "news"}}</tool_call>{TIME}', "", 1, 1),
    ("llama3_json", f"  <|python_tag|>{TIME}", "", 1, 1),
    ("llama3_json", f"{TIME}; {LATER} ;{{", "", 2, 2),
    ("llama3_json", "  <|python_tail| is text", "  <|python_tail| is text", 0, 0),
    ("mistral", 'Let me see.[TOOL_CALLS]time[ARGS]{}[TOOL_CALLS]time{"zone": "CET"}', "Let me see.", 2, 2),
    ("mistral", f"[TOOL_CALLS] [{TIME}, {LATER}]", "", 2, 2),
    ("mistral", "A [TOOL_CALL mention, ending in [TOOL_CA", "A [TOOL_CALL mention, ending in [TOOL_CA", 0, 0),
    ("pythonic", ' [time(), time(zone="C)E,T")]', "", 2, 2),
    ("pythonic", "<|python_start|>[time(zone='CET'), news()]", "", 1, 1),
    ("pythonic", "[citation needed] is text", "[citation needed] is text", 0, 0),
])  # fmt: skip
def test_a_streamed_reply_sends_its_content_and_each_call_once_it_is_whole(name, text, content, streamed, whole):
    """Piece by piece, in every split of one to five characters, a stream sends exactly the content (never a part
    of the calls' opening, everything of a reply without calls) and the calls of the whole answer: each whole in one
    delta, `streamed` of them as soon as they are written whole (the rest with the end); a call naming a function
    not offered ("news") ends the calls."""
    choice = ToolChoice(auto=FORMATS[name], functions=("time",))
    whole_content, calls = choice.answer(text)
    assert len(calls or []) == whole
    for size in range(1, 6):
        held = Held(choice)
        deltas = [held.push(text[i : i + size]) for i in range(0, len(text), size)]
        sent = "".join(d.get("content", "") for d in deltas)
        last, calling = held.end()
        assert sent + last.get("content", "") == (whole_content or "") == content, (size, sent, last)
        pushed = [c for d in deltas for c in d.get("tool_calls", [])]
        assert len(pushed) == streamed, (size, pushed)
        sent_calls = pushed + last.get("tool_calls", [])
        assert [c["index"] for c in sent_calls] == list(range(whole))
        assert [c["function"] for c in sent_calls] == [c["function"] for c in calls or []]
        assert all(c["id"].startswith("chatcmpl-tool-") and c["type"] == "function" for c in sent_calls)
        assert (calls is None) == (not calling)


def test_mistral_reads_its_calls_of_either_tokenizer_generation():
    fmt = FORMATS["mistral"]
    weather = Call("get_weather", {"city": "Paris"})
    # v11 and later: each call after a [TOOL_CALLS], [ARGS] (and Mistral's [CALL_ID]) optional
    for text in ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', '[TOOL_CALLS] get_weather{"city": "Paris"}\n',
                 '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}'):  # fmt: skip
        assert fmt.parse(text) == (None, [weather]), text
    text = 'It rains. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]time[ARGS]{}'
    assert fmt.parse(text) == ("It rains.", [weather, Call("time", {})])
    # before v11: one JSON array of {"name", "arguments"} (an object, or JSON text as OpenAI's messages hold it)
    text = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "time", "arguments": "{}"}]'
    assert fmt.parse(text) == (None, [weather, Call("time", {})])
    # up to the first call that does not parse; a call whose arguments have not closed is not whole yet
    assert fmt.parse('[TOOL_CALLS]get_weather{"city": "Paris"} and[TOOL_CALLS]time{}') == (None, [weather])
    assert fmt.parse('[TOOL_CALLS]get_weather{"city": "Paris"}[TOOL_CALLS]time[1]') == (None, [weather])
    assert fmt.calls('[TOOL_CALLS]get_weather{"city": "Pa', final=False) == []
    for text in ("no calls", "[TOOL_CALLS]", '[TOOL_CALLS]get weather{"city": "Paris"}', "[TOOL_CALLS]time[ARGS][1]",
                 '[TOOL_CALLS] [{"name": 3}]', '[TOOL_CALLS]{"name": "time"}'):  # fmt: skip
        assert fmt.parse(text) is None, text
    assert {fmt.call_id() for _ in range(50)} != {fmt.call_id()}
    assert all(len(i) == 9 and i.isalnum() and i.isascii() for i in (fmt.call_id() for _ in range(50)))


def test_pythonic_reads_a_list_of_calls_with_literal_arguments():
    fmt = FORMATS["pythonic"]
    text = """[get_weather(city='Paris', unit="c"), time(), f(a=(1, -2.5), b={'k': [True, None]}, c=true, d=null)]"""
    assert fmt.parse(text) == (None, [Call("get_weather", {"city": "Paris", "unit": "c"}), Call("time", {}),
                                      Call("f", {"a": [1, -2.5], "b": {"k": [True, None]}, "c": True, "d": None})])
    assert fmt.parse('[f(x=1, **{"a-b": 2, "class": "c"})]') == (None, [Call("f", {"x": 1, "a-b": 2, "class": "c"})])
    assert fmt.parse('<|python_start|>[f(s="(])")]<|python_end|>') == (None, [Call("f", {"s": "(])"})])
    # up to the first call that does not parse: positional arguments, values that are not literals or not JSON's
    assert fmt.parse("[time(), f(1), g()]") == (None, [Call("time", {})])
    for text in ("[f(x=g())]", "[f(x=y)]", "[f(x={1, 2})]", "[f(x=b'1')]", "[f(x=1j)]", "[f(x=float('nan'))]",
                 "[f(**x)]", "[f(x={1: 2})]", "[a.b(x=1)]", "[f(x=1", "f(x=1)", "[[f()]]", "Answer: [f()]"):  # fmt: skip
        assert fmt.parse(text) is None, text
    assert fmt.calls("[f(x=1), g(y=", final=False) == [Call("f", {"x": 1})]


def _mistral_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer with Mistral's [TOOL_CALLS] and [ARGS] as special tokens."""
    backend = tokenizers.Tokenizer.from_str(Tokenizer.builtin("gpt2")._backend.to_str())
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in ("[TOOL_CALLS]", "[ARGS]")])
    return Tokenizer(backend, "gpt2 with Mistral's markers")


def test_a_decoder_keeps_the_special_tokens_a_format_writes_its_calls_with():
    tok = _mistral_tokenizer()
    text = 'Hi.[TOOL_CALLS]time[ARGS]{"zone": "CET"}<|endoftext|>'
    ids = tok.encode(text)
    assert tok.token_to_id("[TOOL_CALLS]") in ids and tok.token_to_id("[ARGS]") in ids
    assert tok.decode(ids) == 'Hi.time{"zone": "CET"}'
    kept = tok.decode(ids, keep=FORMATS["mistral"].markers)
    assert kept == text.removesuffix("<|endoftext|>") and tok.decode(ids, skip_special_tokens=False) == text
    decoder = StreamDecoder(tok, keep=FORMATS["mistral"].markers)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == kept


def test_the_server_reads_mistral_calls_written_with_its_special_tokens(lm):
    """A reply is decoded with its format's markers where tool_choice is "auto": the calls and content come back
    (whole and streamed) with Mistral's 9-character ids; with tool_choice "none" the markers are skipped."""
    tok = _mistral_tokenizer()
    reply = tok.encode('Let me see.[TOOL_CALLS]time[ARGS]{"zone": "CET"}[TOOL_CALLS]get_weather[ARGS]{"city": '
                       '"Rome", "unit": "c"}')  # fmt: skip

    def job_of(request):
        job = Job([[1, 2]], request.gc)
        for token in reply:
            job._events.put(Token(0, token))
        job._events.put(End(0, "stop", len(reply)))
        job._events.put(None)
        return job

    kept = lm.chat_format
    lm.chat_format = Template("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    lm.chat_format.tool_calls = FORMATS["mistral"]
    try:
        request = protocol.parse("chat", TOOL_CHAT, lm)
        (choice,) = answer.whole(request, job_of(request), tok, NAME)["choices"]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me see.", choice
        calls = choice["message"]["tool_calls"]
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
            ("time", {"zone": "CET"}), ("get_weather", {"city": "Rome", "unit": "c"})]  # fmt: skip
        assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)
        request = protocol.parse("chat", TOOL_CHAT | {"stream": True}, lm)
        chunks = list(answer.chunks(request, job_of(request), tok, NAME))
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert "".join(d.get("content") or "" for d in deltas) == "Let me see."
        streamed = [c for d in deltas for c in d.get("tool_calls", [])]
        assert [c["function"] for c in streamed] == [c["function"] for c in calls]
        request = protocol.parse("chat", TOOL_CHAT | {"tool_choice": "none"}, lm)
        (choice,) = answer.whole(request, job_of(request), tok, NAME)["choices"]
        assert choice["message"]["content"] == 'Let me see.time{"zone": "CET"}get_weather{"city": "Rome", "unit": ' \
            '"c"}' and "tool_calls" not in choice["message"]  # fmt: skip
    finally:
        lm.chat_format = kept


def test_the_server_answers_pythonic_calls(lm, server):
    kept = lm.chat_format
    lm.chat_format = Template("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    lm.chat_format.tool_calls = FORMATS["pythonic"]
    try:
        regex = re.escape("[time(zone='UTC'), get_weather(city=\"Oslo\", unit='f')]")
        status, body = call(server, "/v1/chat/completions", TOOL_CHAT | {"guided_regex": regex})
        assert status == 200, body
        message = body["choices"][0]["message"]
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
            ("time", {"zone": "UTC"}), ("get_weather", {"city": "Oslo", "unit": "f"})]  # fmt: skip
        assert message["content"] is None and body["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        lm.chat_format = kept


def test_a_conversation_keeps_its_replies_calls_and_the_tools_results(lm):
    """A reply that calls offered functions is kept as OpenAI's assistant message (content and tool_calls); the
    results answer the calls by id, and the next reply reads them (the transcript writes them as Tool: lines)."""
    chat = neolm.Conversation(lm, TOOL_CHAT["messages"], tools=TOOLS, max_new_tokens=200, do_sample=False,
                              structured_outputs={"regex": re.escape(CALL_TEXT)})  # fmt: skip
    assert "".join(chat.reply()) == CALL_TEXT
    (made,) = chat.calls()
    assert chat.messages[-1]["content"] == "Checking." and made["type"] == "function"
    assert made["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}
    with pytest.raises(NeolmError, match="no tool call has the id"):
        chat.add_tool_result("call_0", "18 C")
    chat.add_tool_result(made["id"], "18 C, rain")
    assert chat.messages[-1] == {"role": "tool", "tool_call_id": made["id"], "name": "get_weather",
                                 "content": "18 C, rain"}  # fmt: skip
    chat.generation["structured_outputs"] = {"regex": "It rains in Paris\\."}
    prompt = lm.chat_format.render(chat.messages, tools=TOOLS)
    assert CALL_TEXT.split(". ")[1] in prompt and "Tool: 18 C, rain" in prompt
    assert "".join(chat.reply()) == "It rains in Paris." and chat.calls() == []
    # a call of a function not offered is text
    chat = neolm.Conversation(lm, TOOL_CHAT["messages"], tools=TOOLS[1:], max_new_tokens=200, do_sample=False,
                              structured_outputs={"regex": re.escape(CALL_TEXT)})  # fmt: skip
    "".join(chat.reply())
    assert chat.calls() == [] and chat.messages[-1] == {"role": "assistant", "content": CALL_TEXT}


def test_neolm_chat_with_tools_reads_each_call_s_result(monkeypatch, capsys, tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps({"tools": TOOLS}))
    tools = str(path)
    args = ("--tools", tools, "--regex", re.escape(CALL_TEXT), "--no-do-sample", "--max-new-tokens", "200")
    # every reply calls: the first's result is read, the reply to it calls again, and the input ends
    code, out, err = run_chat(monkeypatch, capsys, ["Weather in Paris?", "18 C"], *args)
    assert code == 0, err
    assert re.findall(r"\[call (\w+) (.*)\]", err) == [("get_weather", '{"city": "Paris", "unit": "c"}')] * 2, err
    assert out.splitlines() == [CALL_TEXT] * 2
    # errors: a file that is not tools; a template whose calls' format is not named
    path.write_text('[{"type": "function", "function": {"description": "nameless"}}]')
    code, out, err = run_chat(monkeypatch, capsys, [], "--tools", tools)
    assert code == 1 and "tools[0] is not" in err
    path.write_text(json.dumps(TOOLS))
    code, out, err = run_chat(monkeypatch, capsys, [], "--tools", tools, "--chat-template", "{{ messages }}")
    assert code == 1 and "--tool-call-parser" in err
    with pytest.raises(SystemExit) as exit_:
        run_chat(monkeypatch, capsys, [], "--tools", tools, "--tool-call-parser", "xml")
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_the_transcript_teaches_its_tool_call_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Time?"}]
    text = Transcript().render(messages, tools=TOOLS)
    system, functions, _ = text.split("\n", 2)
    assert system == "Be brief." and functions.startswith("Functions the assistant can call")
    listed = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert listed == [t["function"] for t in TOOLS]
    assert FORMATS["hermes"].example in text and text.endswith("User: Time?\nAssistant:")
    assert "\nTool:" in Transcript.stop  # a base model writing a call's result itself ends its turn there
    with pytest.raises(NeolmError, match="tools must be functions"):
        Transcript().render(messages, tools=[{"type": "retrieval"}])


CALL_TEXT = 'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
AUTO_CALL = {"guided_regex": re.escape(CALL_TEXT)}  # the model made to write a call in the transcript's format


def test_auto_tool_choice_answers_the_calls_the_model_writes(server):
    status, body = call(server, "/v1/chat/completions", TOOL_CHAT | AUTO_CALL)
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking.", body
    (tool_call,) = choice["message"]["tool_calls"]
    assert tool_call["id"].startswith("chatcmpl-tool-") and tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "Paris", "unit": "c"}
    status, text = call(server, "/v1/chat/completions", TOOL_CHAT | AUTO_CALL | {"stream": True, "tool_choice": "auto"})
    events = [e["choices"][0] for e in _events(text)]
    assert events[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["delta"].get("content", "") for e in events).strip() == "Checking."
    (streamed,) = [c for e in events for c in e["delta"].get("tool_calls", [])]
    assert events[-1]["finish_reason"] == "tool_calls" and "tool_calls" not in events[-1]["delta"]  # (sent whole)
    assert streamed["index"] == 0 and streamed["function"] == tool_call["function"]


@pytest.mark.parametrize("regex, finish", [
    (r"It is sunny\.", "stop"),  # no call: text
    (re.escape(CALL_TEXT.replace("get_weather", "get_news")), "stop"),  # a function it was not given: text
    (re.escape(CALL_TEXT[:-12]), "length"),  # cut short by max_tokens, the call unfinished: text
])  # fmt: skip
def test_auto_tool_choice_answers_text_without_a_whole_call_of_a_tool(server, regex, finish):
    fields = {"guided_regex": regex} | ({"max_tokens": 12} if finish == "length" else {})
    status, body = call(server, "/v1/chat/completions", TOOL_CHAT | fields)
    choice = body["choices"][0]
    assert status == 200 and "tool_calls" not in choice["message"], body
    assert choice["finish_reason"] == finish and choice["message"]["content"], body
    assert re.fullmatch(regex, choice["message"]["content"]) or finish == "length"


def test_auto_parallel_tool_calls_false_answers_the_first_call(server):
    two = CALL_TEXT + CALL_TEXT.split(". ")[1].replace("Paris", "Rome")
    status, body = call(server, "/v1/chat/completions", TOOL_CHAT | {"guided_regex": re.escape(two)})
    assert [json.loads(c["function"]["arguments"])["city"] for c in body["choices"][0]["message"]["tool_calls"]] == [
        "Paris", "Rome"]  # fmt: skip
    status, body = call(server, "/v1/chat/completions",
                        TOOL_CHAT | {"guided_regex": re.escape(two), "parallel_tool_calls": False})  # fmt: skip
    assert status == 200, body
    (only,) = body["choices"][0]["message"]["tool_calls"]
    assert json.loads(only["function"]["arguments"])["city"] == "Paris"


def test_auto_tool_choice_reads_a_template_s_format_when_told(lm, server):
    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if tools %}tools: "
                "{{ tools | tojson }}\n{% endif %}assistant:")  # fmt: skip
    kept = lm.chat_format
    lm.chat_format = Template(template)
    try:
        status, body = call(server, "/v1/chat/completions", TOOL_CHAT)
        assert status == 400 and "--tool-call-parser" in body["error"]["message"], body
        assert body["error"]["param"] == "tool_choice"
        lm.chat_format.tool_calls = FORMATS["llama3_json"]
        regex = re.escape('{"name": "time", "parameters": {"zone": "UTC"}}')
        status, body = call(server, "/v1/chat/completions", TOOL_CHAT | {"guided_regex": regex})
        (tool_call,) = body["choices"][0]["message"]["tool_calls"]
        assert tool_call["function"] == {"name": "time", "arguments": '{"zone": "UTC"}'}
        assert body["choices"][0]["message"]["content"] is None and body["choices"][0]["finish_reason"] == "tool_calls"
    finally:
        lm.chat_format = kept


def test_openai_client_reads_auto_tool_calls_and_content(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="none")
    reply = client.chat.completions.create(model=NAME, messages=TOOL_CHAT["messages"], tools=TOOLS, max_tokens=200,
                                           extra_body=AUTO_CALL)  # fmt: skip
    message = reply.choices[0].message
    assert message.content == "Checking." and message.tool_calls[0].function.name == "get_weather"
    stream = client.chat.completions.create(model=NAME, messages=TOOL_CHAT["messages"], tools=TOOLS, max_tokens=200,
                                            extra_body=AUTO_CALL, stream=True)  # fmt: skip
    deltas = [c.choices[0].delta for c in stream]
    assert [t.function.name for d in deltas for t in d.tool_calls or []] == ["get_weather"]


def test_batch_reads_a_template_s_tool_calls_with_tool_call_parser(tmp_path, capsys):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    body = TOOL_CHAT | {"guided_regex": re.escape('<|python_tag|>{"name": "time", "parameters": {"zone": "UTC"}}')}
    requests, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    requests.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    code, _, err = cli(capsys, "batch", requests, output, "--chat-template", template)
    assert code == 0 and "1 failed" in err, err
    assert "--tool-call-parser" in json.loads(output.read_text())["error"]["message"]
    output.unlink()
    code, _, err = cli(capsys, "batch", requests, output, "--chat-template", template, "--tool-call-parser",
                       "llama3_json")  # fmt: skip
    assert code == 0 and "0 failed" in err, err
    choice = json.loads(output.read_text())["response"]["body"]["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "time", "arguments": '{"zone": "UTC"}'}
    assert choice["finish_reason"] == "tool_calls"
    code, _, err = cli(capsys, "batch", requests, output, "--tool-call-parser", "xml")
    assert code == 2 and "invalid choice" in err


def test_library_chat_with_tools_and_the_calls_read_back(lm):
    reply = lm.chat(TOOL_CHAT["messages"], tools=TOOLS, structured_outputs={"regex": re.escape(CALL_TEXT)},
                    max_new_tokens=len(CALL_TEXT))  # fmt: skip
    assert reply == CALL_TEXT
    content, calls = lm.chat_format.tool_calls.parse(reply)
    assert content == "Checking." and calls == [Call("get_weather", {"city": "Paris", "unit": "c"})]
    conversation = neolm.Conversation(lm, TOOL_CHAT["messages"], tools=TOOLS)
    assert conversation.template_kwargs == {"tools": TOOLS}
    assert lm.chat_format.render(TOOL_CHAT["messages"], tools=TOOLS).startswith("Functions the assistant can call")
