"""Conversations: turns that reuse the last turn's KV cache, context overflow, continuing a reply, the chat
pipeline and `neolm chat`."""

from __future__ import annotations

import io
import json

import pytest
import torch

import neolm
from neolm.cli import main
from neolm.errors import NeolmError
from neolm.generate import DecodeBatch
from neolm.generation_config import GenerationConfig

GREEDY = {"do_sample": False, "repetition_penalty": 1.0}  # the bundled model samples by default


def _generate(batch: DecodeBatch, prefill) -> list[int]:
    prefill.read(batch.model)
    batch.join(prefill)
    tokens = []
    while not batch.finished:
        tokens.append(batch.step().tokens[0])
    return tokens


@pytest.mark.parametrize("name, load", [("neo", {}), ("neox-parallel-pct25", {}), ("neo", {"kv_cache_dtype": "int8"}),
                                        ("neox-sequential-pct100", {"quantize": "int8"})])  # fmt: skip
@pytest.mark.parametrize("room", [True, False], ids=["in-place", "copied"])
def test_a_reused_cache_gives_the_numbers_of_a_fresh_prefill(tiny_checkpoints, name, load, room):
    """A prompt that begins with the last generation's prompt and reply (but a token of it changed) takes those
    slots from its cache (in place when it has the room, else copied) and reads only the rest: its first logits
    match a whole forward's and its greedy tokens are the same."""
    lm = neolm.load(tiny_checkpoints[name][1], **load)
    torch.manual_seed(1)
    first = torch.randint(0, 50000, (40,)).tolist()
    gc = GenerationConfig(max_new_tokens=30, do_sample=False)
    batch = DecodeBatch(lm.model, compact=False)
    reply = _generate(batch, batch.prefill([first], gc))
    held = (batch.cache, first + reply)
    assert held[0].length == 40 + 30 - 1 and held[0].max_len == 70
    extra = [7, 8, 9] if room else torch.randint(0, 50000, (60,)).tolist()
    second = first + reply[:20] + [reply[20] + 1] + extra  # shares 60 tokens
    gc2 = GenerationConfig(max_new_tokens=5, do_sample=False)

    fresh = DecodeBatch(lm.model, compact=False)
    whole = fresh.prefill([second], gc2)
    expected = _generate(fresh, whole)
    reusing = DecodeBatch(lm.model, compact=False)
    prefill = reusing.prefill([second], gc2, reuse=held)
    assert prefill.done == 60 and prefill.left == len(second) - 60
    assert (prefill.cache is held[0]) == room
    assert prefill.read(lm.model) == len(second) - 60
    # the kept slots of the reply were written by decode steps, whose kernels round otherwise than a prompt's. Int8
    # weights take activations rounded to bf16 (or to 16-bit integers), where a last-bit difference in fp32 can
    # flip a rounding of 2^-9: on an EPYC a decode step's logits differ from a prompt's by up to 1e-3 of their
    # scale, and these by 1e-2 (a wrong slot would be off by whole units). The greedy tokens are the same, but
    # with int8 weights, whose differences may flip a near-tie of these random weights
    scale = float(whole.logits.abs().max())
    tolerance = 2e-2 if load.get("quantize") else 1e-4
    torch.testing.assert_close(prefill.logits, whole.logits, atol=tolerance * scale, rtol=0)
    if not load.get("quantize"):
        assert _generate(reusing, prefill) == expected
    # a prompt that is all shared still reads its last token, for its logits
    again = DecodeBatch(lm.model, compact=False).prefill([first], gc2, reuse=(fresh.cache, second + expected))
    assert again.done == 39 and again.left == 1
    with pytest.raises(NeolmError, match="one sequence of one prompt"):
        DecodeBatch(lm.model).prefill([first, first], gc2, reuse=held)


def test_conversation_turns_reuse_the_cache_and_answer_as_fresh_prompts():
    lm = neolm.load()
    chat = neolm.Conversation(lm, [{"role": "system", "content": "Two lords speak."}], max_new_tokens=24, **GREEDY)
    reused = []
    for text in ["Good morrow, my lord.", "What news from the court?", "And the king?"]:
        before = list(chat.messages) + [{"role": "user", "content": text}]
        reply = "".join(chat.send(text))
        assert reply == lm.chat(before, max_new_tokens=24, **GREEDY)  # a fresh prompt, read whole
        assert chat.messages == before + [{"role": "assistant", "content": reply}]
        assert "\nUser:" not in reply and reply == reply.lstrip()
        reused.append(chat.reused)
    prompts = [lm.apply_chat_template(chat.messages[:i], add_generation_prompt=True) for i in (2, 4, 6)]
    assert reused[0] == 0 and all(0 < r < len(p) for r, p in zip(reused[1:], prompts[1:]))
    assert reused[1] >= len(prompts[0])  # at least the whole last prompt was kept


def test_undo_reset_and_an_unanswerable_message():
    lm = neolm.load()
    system = {"role": "system", "content": "Two lords speak."}
    chat = neolm.Conversation(lm, [system], max_new_tokens=4, **GREEDY)
    "".join(chat.send("Hail."))
    "".join(chat.send("Whence?"))
    assert [m["role"] for m in chat.undo()] == ["user", "assistant"] and len(chat.messages) == 3
    with pytest.raises(NeolmError, match="more than the model's context"):
        chat.send("word " * 3000)
    assert len(chat.messages) == 3  # the message that cannot be answered is not kept
    with pytest.raises(NeolmError, match="the message is empty"):
        chat.send("  ")
    chat.reset()
    assert chat.messages == [system]
    chat.reset([])
    assert chat.messages == [] and chat.undo() == []
    with pytest.raises(NeolmError, match="the conversation is empty"):
        chat.reply()
    with pytest.raises(NeolmError, match="num_return_sequences must be 1"):
        neolm.Conversation(lm, do_sample=True, num_return_sequences=2)


def test_a_long_conversation_leaves_out_its_oldest_exchanges(tiny_checkpoints, caplog):
    """Past the context (512), the oldest exchanges are left out of the prompt, the system message kept; the
    messages themselves stay."""
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    system = {"role": "system", "content": "Be brief."}
    chat = neolm.Conversation(lm, [system], max_new_tokens=40, do_sample=False)
    for turn in range(8):
        "".join(chat.send(f"Turn {turn}: " + "tell me more " * 20))
    assert len(chat.messages) == 17 and chat.dropped > 0 and chat.dropped % 2 == 0
    kept = [system] + chat.messages[1 + chat.dropped : -1]
    prompt = lm.apply_chat_template(kept, add_generation_prompt=True)
    assert len(prompt) + 40 <= 512 < len(lm.apply_chat_template(chat.messages[:-1], add_generation_prompt=True)) + 40
    assert kept[1]["role"] == "user" and "outgrew the context" in caplog.text


def test_a_reply_begun_for_the_model_is_continued():
    lm = neolm.load()
    begun = [{"role": "user", "content": "Who goes there?"}, {"role": "assistant", "content": "Who goes"}]
    chat = neolm.Conversation(lm, begun, max_new_tokens=12, **GREEDY)
    rest = "".join(chat.reply())
    prompt = lm.apply_chat_template(begun, continue_final_message=True)
    assert lm.decode(prompt).endswith("Assistant: Who goes")
    new = lm.decode(lm.generate_ids([prompt], max_new_tokens=12, stop_strings="\nUser:", **GREEDY)[0])
    assert rest == new.split("\nUser:")[0]  # not stripped: it goes on from "goes"
    assert chat.messages == [begun[0], {"role": "assistant", "content": "Who goes" + rest}]
    assert lm.chat(begun, max_new_tokens=12, **GREEDY) == rest


def test_a_reply_closed_early_keeps_what_was_said():
    lm = neolm.load()
    chat = neolm.Conversation(lm, max_new_tokens=60, **GREEDY)
    pieces = chat.send("Speak, speak.")
    said = next(pieces) + next(pieces)
    pieces.close()
    assert chat.messages[-1] == {"role": "assistant", "content": said}
    assert "".join(chat.send("Go on.")) and chat.reused > 0


def test_the_pipeline_takes_chats_as_transformers():
    generator = neolm.pipeline("text-generation")
    chat = [{"role": "user", "content": "Hail!"}]
    (out,) = generator(chat, max_new_tokens=8, **GREEDY)
    reply = generator.lm.chat(chat, max_new_tokens=8, **GREEDY)
    assert out["generated_text"] == chat + [{"role": "assistant", "content": reply}]
    both = generator([chat, chat], max_new_tokens=8, return_full_text=False, **GREEDY)
    assert both == [[{"generated_text": reply}]] * 2


def run_chat(monkeypatch, capsys, lines: list[str], *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_neolm_chat_command(monkeypatch, capsys, tmp_path):
    lm = neolm.load()
    saved = tmp_path / "conversation.json"
    lines = ["Good morrow.", "/help", "", "//slash", "/undo", "Whence?", "/nope", f"/save {saved}", "/exit", "unread"]
    code, out, err = run_chat(monkeypatch, capsys, lines, "--system", "Two lords.", "--max-new-tokens", "10",
                              "--no-do-sample", "--repetition-penalty", "1")  # fmt: skip
    assert code == 0
    expected = neolm.Conversation(lm, [{"role": "system", "content": "Two lords."}], max_new_tokens=10, **GREEDY)
    first = "".join(expected.send("Good morrow."))
    "".join(expected.send("/slash"))  # sent, then taken back by /undo
    expected.undo()
    second = "".join(expected.send("Whence?"))
    assert out.count("\n") >= 3 and out.startswith(first) and out.endswith(second + "\n")
    assert "/system TEXT" in err and "took back 2 messages" in err and "unknown command '/nope'" in err
    messages = json.loads(saved.read_text())
    assert messages == expected.messages and "unread" not in out
    # start from the saved conversation, with another system message
    code, out, err = run_chat(monkeypatch, capsys, ["And then?"], "--messages", str(saved), "--system", "Kings.",
                              "--max-new-tokens", "10", "--no-do-sample", "--repetition-penalty", "1")  # fmt: skip
    expected.reset([{"role": "system", "content": "Kings."}] + messages[1:])
    assert code == 0 and out == "".join(expected.send("And then?")) + "\n"
    # errors
    (tmp_path / "bad.json").write_text('[{"role": "robot", "content": "x"}]')
    code, out, err = run_chat(monkeypatch, capsys, [], "--messages", str(tmp_path / "bad.json"))
    assert code == 1 and "role must be one of" in err
    code, out, err = run_chat(monkeypatch, capsys, ["word " * 3000, "Hail."], "--max-new-tokens", "4",
                              "--no-do-sample", "--repetition-penalty", "1")  # fmt: skip
    assert code == 0 and "more than the model's context" in err  # the message is refused; the next is answered:
    assert out == "".join(neolm.Conversation(lm, max_new_tokens=4, **GREEDY).send("Hail.")) + "\n"


def test_neolm_chat_messages_of_several_lines(monkeypatch, capsys):
    """A backslash at a line's end goes on at the next line (llama.cpp's way); lines between three double quotes
    are one message (ollama's); a /command inside them is text; a message begun at the end of input is sent."""
    lm = neolm.load()
    lines = ["Good morrow,\\", "my lord.", '"""', "Whence come you?", "/reset", '  and whither?"""',
             '"""Hail."""', "Farewell\\"]  # fmt: skip
    code, out, err = run_chat(monkeypatch, capsys, lines, "--max-new-tokens", "6", "--no-do-sample",
                              "--repetition-penalty", "1")  # fmt: skip
    assert code == 0, err
    expected = neolm.Conversation(lm, max_new_tokens=6, **GREEDY)
    replies = ["".join(expected.send(m)) for m in ("Good morrow,\nmy lord.", "Whence come you?\n/reset\n  and whither?",
                                                    "Hail.", "Farewell")]  # fmt: skip
    assert out == "".join(r + "\n" for r in replies)
    assert "a new conversation" not in err


def test_row_cache_holds_a_finished_sequences_slots(tiny_checkpoints):
    """The server's prefix cache keeps a finished sequence's row: its prompt and tokens but the last, as one
    row without padding, equal to the cache of that sequence run alone."""
    lm = neolm.load(tiny_checkpoints["neo"][1])
    gc = GenerationConfig(max_new_tokens=6, do_sample=False)
    batch = DecodeBatch(lm.model)
    batch.add([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], GenerationConfig(max_new_tokens=20, do_sample=False))
    batch.step()
    (short,) = batch.add([[11, 12, 13]], gc)  # joins right-aligned, shorter
    kept, got = None, []
    while kept is None:
        step = batch.step()
        row = step.ids.index(short)
        got.append(step.tokens[row])
        if step.ends[row] is not None:  # (its row leaves at the next step)
            kept = batch.row_cache(short)
    alone = DecodeBatch(lm.model, compact=False)
    assert _generate(alone, alone.prefill([[11, 12, 13]], gc)) == got
    assert kept.length == 3 + 6 - 1 and kept.valid is None and kept.k.shape[1] == 1
    torch.testing.assert_close(kept.k, alone.cache.k[:, :, :, : kept.length], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kept.v, alone.cache.v[:, :, :, : kept.length], atol=1e-5, rtol=1e-5)


def test_prefix_cache_finds_the_longest_shared_entry_and_evicts_the_least_recently_used(tiny_checkpoints):
    from neolm.model import KVCache
    from neolm.serve.prefix import MIN_SHARED, PrefixCache

    config = neolm.load(tiny_checkpoints["neo"][1]).config

    def entry(n):
        cache = KVCache(config, 1, n, torch.float32)
        cache.length = n
        return cache

    size = entry(40).nbytes
    prefixes = PrefixCache(2 * size + size // 2)  # room for two entries of 40 slots
    a, b, c = list(range(40)), list(range(20)) + [99] * 20, list(range(100, 140))
    for tokens in (a, b):
        prefixes.put(entry(40), tokens + [7, 7])  # tokens past the cache's slots are not kept
    prefixes.put(entry(MIN_SHARED - 1), c)  # too short to be worth keeping
    assert len(prefixes) == 2 and prefixes.bytes == 2 * size
    assert prefixes.find(list(range(MIN_SHARED - 1)) + [5]) is None  # shares too little
    found = prefixes.find(list(range(60)))  # a shares 40, b 20
    assert found[1] == a and len(prefixes) == 2  # it stays, for others too
    assert prefixes.find(list(range(60)))[0] is found[0]
    prefixes.put(entry(40), c)  # the least recently used (b: a was just found) goes
    assert prefixes.find(b) is None and len(prefixes) == 2 and prefixes.bytes == 2 * size
    longer = entry(45)
    prefixes.put(longer, a + [1, 2, 3, 4, 5])  # holds all of a: a goes
    assert len(prefixes) == 2 and prefixes.bytes == size + longer.nbytes and prefixes.find(a)[0] is longer
    prefixes.put(entry(40), b, adapter=1)  # made with a LoRA adapter (neolm.multilora): for prompts with that one
    assert prefixes.find(b) is None and prefixes.find(b, adapter=2) is None
    assert prefixes.find(b, adapter=1)[1] == b
