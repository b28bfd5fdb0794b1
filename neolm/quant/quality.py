"""What quantization costs: perplexity on a text, and agreement of greedy continuations.

`measure` runs on the float model before the swap and on the quantized one after it, so only one copy
of the weights is ever in memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from neolm.eval.perplexity import perplexity
from neolm.generate import generate
from neolm.generation_config import GenerationConfig
from neolm.model import GPT

GREEDY_TOKENS = 20

# Used when no --eval-text is given: public-domain prose (Jerome K. Jerome, Three Men in a Boat, 1889).
BUILTIN_TEXT = """\
There were four of us - George, and William Samuel Harris, and myself, and Montmorency. We were sitting in \
my room, smoking, and talking about how bad we were - bad from a medical point of view I mean, of course.
We were all feeling seedy, and we were getting quite nervous about it. Harris said he felt such extraordinary \
fits of giddiness come over him at times, that he hardly knew what he was doing; and then George said that \
he had fits of giddiness too, and hardly knew what he was doing. With me, it was my liver that was out of \
order. I knew it was my liver that was out of order, because I had just been reading a patent liver-pill \
circular, in which were detailed the various symptoms by which a man could tell when his liver was out of \
order. I had them all.
It is a most extraordinary thing, but I never read a patent medicine advertisement without being impelled \
to the conclusion that I am suffering from the particular disease therein dealt with in its most virulent \
form. The diagnosis seems in every case to correspond exactly with all the sensations that I have ever felt.
I remember going to the British Museum one day to read up the treatment for some slight ailment of which I \
had a touch - hay fever, I fancy it was. I got down the book, and read all I came to read; and then, in an \
unthinking moment, I idly turned the leaves, and began to indolently study diseases, generally. I forget \
which was the first distemper I plunged into - some fearful, devastating scourge, I know - and, before I \
had glanced half down the list of premonitory symptoms, it was borne in upon me that I had fairly got it.
I sat for a while, frozen with horror; and then, in the listlessness of despair, I again turned over the \
pages. I came to typhoid fever - read the symptoms - discovered that I had typhoid fever, must have had it \
for months without knowing it - wondered what else I had got; turned up St. Vitus's Dance - found, as I \
expected, that I had that too, - began to get interested in my case, and determined to sift it to the \
bottom, and so started alphabetically.
"""


@dataclass
class Quality:
    perplexity: float
    tokens: int
    seconds: float
    greedy: list[list[int]] = field(repr=False)


def prompts_from(token_lists: list[list[int]], count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, evenly spaced through the texts' tokens."""
    flat = [t for tokens in token_lists for t in tokens]
    if len(flat) <= length:
        return [flat] if flat else []
    step = max((len(flat) - length) // max(count, 1), 1)
    return [flat[i : i + length] for i in range(0, len(flat) - length + 1, step)][:count]


@torch.inference_mode()
def measure(model: GPT, encode, texts: list[str], prompts: list[list[int]], prefix: int,
            max_len: int | None = None, batch_size: int = 4) -> Quality:  # fmt: skip
    """Perplexity of `texts` and the greedy continuations (GREEDY_TOKENS tokens) of `prompts`."""
    start = time.perf_counter()
    ppl = perplexity(model, encode, texts, prefix, max_len, batch_size)
    gc = GenerationConfig(max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False)
    greedy = generate(model, prompts, gc.validated()) if prompts else []
    return Quality(ppl.token_perplexity, ppl.tokens, time.perf_counter() - start, greedy)


def compare(full: Quality, quant: Quality) -> dict:
    """The report: perplexities, their relative change, and greedy agreement."""
    same = [a[:GREEDY_TOKENS] == b[:GREEDY_TOKENS] for a, b in zip(full.greedy, quant.greedy)]
    prefix = []
    for a, b in zip(full.greedy, quant.greedy):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n)
    return {
        "perplexity_full": full.perplexity,
        "perplexity_quantized": quant.perplexity,
        "perplexity_change": quant.perplexity / full.perplexity - 1,
        "tokens": full.tokens,
        "greedy_prompts": len(same),
        "greedy_identical": sum(same),
        "greedy_tokens": GREEDY_TOKENS,
        "greedy_mean_common_prefix": sum(prefix) / len(prefix) if prefix else None,
    }
