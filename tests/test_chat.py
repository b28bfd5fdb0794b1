"""Chat formats: Hugging Face chat templates rendered as transformers renders them, and chats through the server."""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import TINY, hf_model, save_hf

import neolm
from neolm.chat import Reply, Template, Transcript, load_chat_format
from neolm.errors import NeolmError
from neolm.serve.http import Server
from neolm.serve.prefix import MIN_SHARED
from neolm.tokenizer import load_tokenizer

NEOX_TOKENIZER = neolm.__path__[0] + "/tokenizers/gpt-neox-20b/tokenizer.json"
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>"]

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if greeting is defined %}{{ greeting }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALTERNATING = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
# Whitespace control, namespace, a filtered loop, loop controls, {% generation %} and tojson.
BLOCKS = """{%- set ns = namespace(system='') -%}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% set ns.system = message.content %}
    {% endif %}
{% endfor %}
{% if ns.system %}<|system|>
{{ ns.system }}{{ eos_token }}
{% endif %}
{% for message in messages if message.role != 'system' %}
    {% if message.role == 'user' %}
<|user|>
{{ message.content }}{{ eos_token }}
    {% else %}
{% generation %}<|assistant|>
{{ message.content }}{{ eos_token }}{% endgeneration %}
    {% endif %}
    {% if loop.index > 8 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
{{ {'turns': messages|length, 'text': '<&> café'}|tojson }}"""

CHAT = [
    {"role": "system", "content": "Answer in verse."},
    {"role": "user", "content": "Who art thou? café ✓"},
    {"role": "assistant", "content": " A player, sir. "},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "whence?"}]},
]
ALTERNATING_CHAT = CHAT[1:]


def hf_tokenizer(folder, template: str):
    """A GPT-NeoX tokenizer with chat special tokens and `template`, saved and read back by transformers."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=NEOX_TOKENIZER, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.add_tokens(SPECIAL, special_tokens=True)
    tok.chat_template = template
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def as_transformers_messages(messages):
    """transformers passes content parts through as lists; neolm joins OpenAI's text parts first."""
    return [m | {"content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
            for m in messages]  # fmt: skip


@pytest.mark.parametrize("template, messages", [(CHATML, CHAT), (ALTERNATING, ALTERNATING_CHAT), (BLOCKS, CHAT)],
                         ids=["chatml", "alternating", "blocks"])  # fmt: skip
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_templates_render_and_tokenize_as_transformers(tmp_path, template, messages, add_generation_prompt):
    reference = hf_tokenizer(tmp_path, template)
    assert (tmp_path / "chat_template.jinja").is_file()  # transformers >= 4.43 saves the template beside
    chat_format, tokenizer = load_chat_format(tmp_path), load_tokenizer(tmp_path, "gpt-neox-20b")
    assert isinstance(chat_format, Template) and chat_format.source == template
    plain = as_transformers_messages(messages)
    text = reference.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert chat_format.render(messages, add_generation_prompt=add_generation_prompt) == text
    ids = tokenizer.encode(text)
    assert ids == reference(text, add_special_tokens=False)["input_ids"]
    assert any(i >= 50277 for i in ids) or template is ALTERNATING  # the added special tokens are single ids


@pytest.mark.parametrize(
    "template, messages",
    [(CHATML, CHAT[:3]), (ALTERNATING, ALTERNATING_CHAT[:2]), (BLOCKS, CHAT[:3])],
    ids=["chatml", "alternating", "blocks"],
)
@pytest.mark.parametrize("final", [" A player, sir. ", "A player"])
def test_continue_final_message_as_transformers(tmp_path, template, messages, final):
    """The text ends inside the final message, with its trailing space where the template keeps what follows
    the message as it is, without where the message's end is trimmed."""
    reference = hf_tokenizer(tmp_path, template)
    messages = messages[:-1] + [{"role": "assistant", "content": final}]
    text = reference.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert load_chat_format(tmp_path).render(messages, False, continue_final_message=True) == text
    assert text.rstrip().endswith(final.strip())
    with pytest.raises(NeolmError, match="exclude each other"):
        load_chat_format(tmp_path).render(messages, True, continue_final_message=True)


def test_transcript_continues_and_refusals():
    begun = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " The answer is "}]
    assert Transcript().render(begun, False, True) == "User: Hi\nAssistant: The answer is"
    dropping = Template("{% for m in messages %}{{ m.role }}{% endfor %}")  # leaves the content out
    with pytest.raises(NeolmError, match="leaves \\(part of\\) the final message out"):
        dropping.render(begun, False, True)


@pytest.mark.parametrize(
    "pieces, stops, sent",
    [
        (["Hello", " wor", "ld"], ["world"], "Hello "),  # a stop string over three pieces
        (["ab", "cXY", "Zd"], ["XYZ", "Q"], "abc"),
        (["ab", "c"], ["cd"], "abc"),  # held back, then released at the end
        (["  Hi", "!"], [], "Hi!"),  # transcript replies lose their leading space
    ],
)
def test_reply_text(pieces, stops, sent):
    reply = Reply(stops, strip_leading=not stops)
    out = "".join(reply.push(p) for p in pieces)
    assert out + reply.finish("") == sent


def test_template_in_tokenizer_config_and_special_tokens(tmp_path):
    hf_tokenizer(tmp_path, ALTERNATING)
    (tmp_path / "chat_template.jinja").unlink()
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config |= {"bos_token": {"content": "<|im_start|>", "__type": "AddedToken"}, "eos_token": "<|im_end|>"}
    for form in (ALTERNATING, [{"name": "tool_use", "template": "x"}, {"name": "default", "template": ALTERNATING}]):
        config_path.write_text(json.dumps(config | {"chat_template": form}))
        text = load_chat_format(tmp_path).render(ALTERNATING_CHAT[:2], add_generation_prompt=True)
        assert text == "<|im_start|>[INST] Who art thou? café ✓ [/INST] A player, sir. <|im_end|>"
    config_path.write_text(json.dumps(config))
    assert isinstance(load_chat_format(tmp_path), Transcript)


def test_template_errors_and_overrides(tmp_path):
    chat_format = Template(ALTERNATING, {"bos_token": "", "eos_token": "</s>"})
    with pytest.raises(NeolmError, match="refused the conversation: Conversation roles must alternate"):
        chat_format.render(CHAT)  # starts with a system message
    with pytest.raises(NeolmError, match=r"does not parse: .*line 1"):
        Template("{% for m in messages %}{{ m.content }}")
    with pytest.raises(NeolmError, match="messages\\[0\\]: role must be one of"):
        chat_format.render([{"role": "robot", "content": "x"}])
    file = tmp_path / "t.jinja"
    file.write_text(CHATML)
    assert load_chat_format(None, str(file)).source == CHATML  # a file
    assert load_chat_format(None, CHATML).render(CHAT[:1]) == load_chat_format(None, str(file)).render(CHAT[:1])
    with pytest.raises(NeolmError, match="chat template file not found: nope.jinja"):
        load_chat_format(None, "nope.jinja")
    transcript = Transcript().render(CHAT)
    assert transcript == ("Answer in verse.\nUser: Who art thou? café ✓\nAssistant: A player, sir.\nUser: And whence?\n"
                          "Assistant:")  # fmt: skip


def test_bundled_model_chats_as_a_transcript():
    lm = neolm.load()
    assert isinstance(lm.chat_format, Transcript)
    assert lm.apply_chat_template(CHAT[:2], tokenize=False) == "Answer in verse.\nUser: Who art thou? café ✓\n"
    assert lm.apply_chat_template(CHAT[:2], add_generation_prompt=True) == lm.encode(
        "Answer in verse.\nUser: Who art thou? café ✓\nAssistant:"
    )


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random GPT-NeoX checkpoint with the ChatML template and <|im_end|> as an eos."""
    folder = tmp_path_factory.mktemp("chatml")
    save_hf(hf_model(TINY["neox-parallel-pct25"], seed=3, std=0.2), folder)
    tok = hf_tokenizer(folder, CHATML)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, im_end]}))
    return neolm.load(folder)


def post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_server_chats_in_the_checkpoint_template(chat_model, tmp_path):
    lm = chat_model
    assert lm.chat_format.source == CHATML
    server = Server(lm, port=0, model_name="chatml")
    server.start()
    try:
        body = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
        status, answer = post(server, "/v1/chat/completions", body)
        assert status == 200, answer
        prompt = lm.apply_chat_template(CHAT, add_generation_prompt=True)
        opening = lm.encode("<|im_start|>assistant\n")  # the generation prompt, <|im_start|> one id
        assert prompt[-len(opening) :] == opening and len(opening) == 4
        expected = lm.decode(lm.generate_ids([prompt], max_new_tokens=12, do_sample=False)[0])  # not stripped
        assert answer["choices"][0]["message"]["content"] == expected
        assert answer["usage"]["prompt_tokens"] == len(prompt)
        # vLLM's fields: no generation prompt, template arguments
        status, answer = post(server, "/v1/chat/completions", body | {"add_generation_prompt": False,
                                                                      "chat_template_kwargs": {"greeting": "Hi"}})  # fmt: skip
        assert status == 200 and answer["usage"]["prompt_tokens"] == len(prompt) - 4 + len(lm.encode("Hi"))
        status, tokens = post(server, "/tokenize", {"messages": CHAT})
        assert status == 200 and tokens["tokens"] == prompt
        # vLLM's continue_final_message: the reply goes on with a begun assistant message
        begun = CHAT + [{"role": "assistant", "content": "Thou"}]
        going_on = body | {"messages": begun, "continue_final_message": True}
        status, answer = post(server, "/v1/chat/completions", going_on)
        prompt = lm.apply_chat_template(begun, continue_final_message=True)
        assert status == 200 and prompt == lm.encode(lm.apply_chat_template(CHAT, tokenize=False) + "<|im_start|>"
                                                     "assistant\nThou")  # fmt: skip
        assert answer["usage"]["prompt_tokens"] == len(prompt)
        expected = lm.decode(lm.generate_ids([prompt], max_new_tokens=12, do_sample=False)[0])
        assert answer["choices"][0]["message"]["content"] == expected
        status, tokens = post(server, "/tokenize", {"messages": begun, "continue_final_message": True})
        assert status == 200 and tokens["tokens"] == prompt
        status, answer = post(server, "/v1/chat/completions", going_on | {"add_generation_prompt": True})
        assert status == 400 and answer["error"]["param"] == "continue_final_message"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/tokenizer_info") as r:
            assert json.loads(r.read())["chat_template"] == CHATML
    finally:
        server.close()
    refusing = neolm.load(shutil.copytree(lm.source, tmp_path / "m"), chat_template=ALTERNATING)
    server = Server(refusing, port=0)
    server.start()
    try:
        status, answer = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
        assert status == 400 and "roles must alternate" in answer["error"]["message"]
        assert answer["error"]["param"] == "messages"
    finally:
        server.close()


SYSTEM = "Two lords speak of the king and his court, of the queen, of war and peace, in the old tongue of the stage."


def test_server_prefix_cache_serves_a_chats_next_turn():
    """With --prefix-cache, a chat's next turn (the conversation resent, the reply added) takes the last turn's
    keys and values and reads only the rest: usage and /metrics count them, and greedy replies are those
    without the cache (the bundled model: no near-ties here)."""
    lm = neolm.load()
    replies = {}
    for mb in (0, 64):
        server = Server(lm, port=0, prefix_cache_mb=mb)
        server.start()
        try:
            messages, got = [{"role": "system", "content": SYSTEM}], []
            for text in ["Good morrow, my lord, what news?", "And what of the queen?", "Then let us go."]:
                messages.append({"role": "user", "content": text})
                status, answer = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 24,
                                                                       "temperature": 0})  # fmt: skip
                assert status == 200, answer
                reply = answer["choices"][0]["message"]["content"]
                messages.append({"role": "assistant", "content": reply})
                got.append((reply, answer["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)))
            # the first turn again: all of its prompt but the last token is in the cache (copied from it)
            status, answer = post(server, "/v1/chat/completions", {"messages": messages[:2], "max_tokens": 24,
                                                                   "temperature": 0})  # fmt: skip
            got.append((answer["choices"][0]["message"]["content"],
                        answer["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)))  # fmt: skip
            with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/metrics") as r:
                metrics = r.read().decode()
        finally:
            server.close()
        replies[mb] = got
        hits = int(re.search(r"neolm:prefix_cache_hits_total\{[^}]*\} (\d+)", metrics)[1])
        assert hits == sum(cached for _, cached in got)
    assert [reply for reply, _ in replies[64]] == [reply for reply, _ in replies[0]]
    assert [cached for _, cached in replies[0]] == [0, 0, 0, 0] and replies[0][3][0] == replies[0][0][0]
    cached = [cached for _, cached in replies[64]]
    first_prompt = len(lm.apply_chat_template(
        [{"role": "system", "content": SYSTEM},
         {"role": "user", "content": "Good morrow, my lord, what news?"}], add_generation_prompt=True))  # fmt: skip
    assert cached[0] == 0 and cached[1] >= first_prompt and cached[2] > cached[1], (cached, first_prompt)
    assert cached[3] == first_prompt - 1


def test_server_prefix_cache_entry_serves_requests_that_run_at_once():
    """Requests that share a system prompt and arrive together all start from the one cache entry that an earlier
    request left (the entry is copied from, not taken by the first of them)."""
    lm = neolm.load()
    server = Server(lm, port=0, prefix_cache_mb=64)
    server.start()
    system = SYSTEM + " They speak in verse, and briefly."

    def ask(question: str) -> int:
        status, answer = post(server, "/v1/chat/completions", {"messages": [
            {"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 24, "temperature": 0})  # fmt: skip
        assert status == 200, answer
        return answer["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)

    try:
        assert ask("Good morrow, my lord, what news?") == 0
        with ThreadPoolExecutor(4) as pool:
            cached = list(pool.map(ask, ["What of the queen?", "Where is the king?", "Who comes here?", "Is it war?"]))
    finally:
        server.close()
    shared = len(lm.apply_chat_template([{"role": "system", "content": system}]))
    assert all(n >= shared - 1 for n in cached) and shared - 1 >= MIN_SHARED, (cached, shared)
