"""A conversation turn by turn, with the last turn's KV cache kept (neolm.Conversation's default) and without.

    python bench/chat_turns.py --model /tmp/neolm-bench/models/pythia-1.4b/hf --turns 8 --message-tokens 48 \\
        --reply-tokens 32 --rounds 2 --out bench/CHAT.md

Each round holds the same conversation twice, once per mode (the order alternates between rounds): --turns user
messages of --message-tokens tokens (common one-token words), each answered greedily with exactly
--reply-tokens tokens (eos blocked). The conversation is written in a ChatML template (as chat fine-tunes have;
--chat-template none: the plain transcript, whose stop line holds a reply's first characters back), so the
first piece of a reply comes with its first token. Reported per turn: the prompt's length, how many of its
tokens the kept cache supplied, and the time to the first piece of the reply (the prompt's forward and one
step) in both modes; and the whole conversation's time. Medians over the rounds. Not a test.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time

import torch
from report import publish

import neolm

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = [" the", " of", " and", " to", " in", " a", " is", " that", " for", " it", " was", " on"]  # one token each


def converse(lm, messages: list[str], keep: bool, reply_tokens: int) -> dict:
    chat = neolm.Conversation(lm, keep_cache=keep, max_new_tokens=reply_tokens, min_new_tokens=reply_tokens,
                              do_sample=False, repetition_penalty=1.0)  # fmt: skip
    first, prompts, reused = [], [], []
    start = time.perf_counter()
    for text in messages:
        t = time.perf_counter()
        pieces = chat.send(text)
        next(pieces, None)
        first.append(time.perf_counter() - t)
        for _ in pieces:
            pass
        reused.append(chat.reused)
        prompts.append(len(lm.apply_chat_template(chat.messages[:-1], add_generation_prompt=True)))
    return {"first": first, "prompts": prompts, "reused": reused, "total": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder or hub id (default: the bundled model)")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--message-tokens", type=int, default=48)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chat-template", default=CHATML, help="a template, or none for the plain transcript")
    p.add_argument("--out", help="append the table to this markdown file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = neolm.load(args.model, chat_template=None if args.chat_template == "none" else args.chat_template)
    rng = random.Random(0)
    messages = ["".join(rng.choice(WORDS) for _ in range(args.message_tokens)).strip() for _ in range(args.turns)]
    converse(lm, messages[:2], True, 4)  # warm-up: kernels built, memory faulted in
    runs = {True: [], False: []}
    for round_ in range(args.rounds):
        for keep in (True, False) if round_ % 2 == 0 else (False, True):
            runs[keep].append(converse(lm, messages, keep, args.reply_tokens))
            print(keep, runs[keep][-1], file=sys.stderr)
    kept, fresh = runs[True], runs[False]

    def median(runs_, key, turn=None):
        return statistics.median(r[key] if turn is None else r[key][turn] for r in runs_)

    lines = [
        f"`python {' '.join(sys.argv)}`",
        "",
        (
            f"{platform.processor() or platform.machine()}, {args.threads} threads; {lm.source} "
            f"({lm.config.family}, {lm.dtype}), {lm.chat_format.name}; {args.turns} turns of "
            f"{args.message_tokens}-token messages and {args.reply_tokens}-token greedy replies; median of "
            f"{args.rounds} round(s)"
        ),
        "",
        "| turn | prompt tokens | from the kept cache | first piece, kept, s | first piece, read whole, s | speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for turn in range(args.turns):
        a, b = median(kept, "first", turn), median(fresh, "first", turn)
        lines.append(f"| {turn + 1} | {kept[0]['prompts'][turn]} | {kept[0]['reused'][turn]} | {a:.3f} | {b:.3f} | "
                     f"{b / a:.2f}x |")  # fmt: skip
    a, b = median(kept, "total"), median(fresh, "total")
    lines += ["", f"Whole conversation: {a:.2f} s kept, {b:.2f} s read whole ({b / a:.2f}x).", ""]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
