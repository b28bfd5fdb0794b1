"""Golden outputs of transformers 4's own diverse and constrained beam search, which transformers 5 moved to the
hub (out of reach offline), for tests/test_beam.py to compare neolm with.

    python bench/transformers4.py checkpoints /tmp/tf4            # with this repo's transformers (5)
    python -m venv --system-site-packages /tmp/tf4/venv
    /tmp/tf4/venv/bin/pip install "transformers==4.46.3"
    /tmp/tf4/venv/bin/python bench/transformers4.py reference /tmp/tf4 tests/golden/transformers4_beams.json

`checkpoints` saves the test suite's tiny random checkpoints (tests/conftest.py: TINY, the same seeds as its
tiny_checkpoints fixture) for GPT-Neo and GPT-NeoX, with the rotary fields transformers 4 reads. `reference` runs
transformers 4's generate on them (its _group_beam_search and _constrained_beam_search): every setting of DIVERSE,
CONSTRAINED and LIKELY (constraints built from the greedy continuation, so that hypotheses meet them early and end
at eos) on every prompt, with an eos that never comes (the vocabulary's last id) and with three likely tokens made
eos, 10 new tokens. It writes each case's settings and hypotheses (new tokens, trailing eos/pad removed) with their
sequences_scores (none where transformers 4's finalize fails on its own fallback hypotheses). Not a test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS = ("neo", "neox-sequential-pct100")  # (transformers 4 fails on an odd rotary width, as neox-parallel-pct25's)
PROMPTS = [[11, 22, 33, 44, 55, 66, 77], [5, 6, 7, 5, 6, 7, 5, 6], [300, 1200, 45, 9, 870]]
DIVERSE = [
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=4),
    dict(num_beams=6, num_beam_groups=3, diversity_penalty=0.5, num_return_sequences=3, length_penalty=0.7),
    dict(num_beams=3, num_beam_groups=3, diversity_penalty=2.0, num_return_sequences=2, repetition_penalty=1.3),
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=2, early_stopping=True),
    dict(num_beams=4, num_beam_groups=4, diversity_penalty=0.3, num_return_sequences=4, no_repeat_ngram_size=2),
]
CONSTRAINED = [
    dict(num_beams=4, num_return_sequences=4, force_words_ids=[[500, 600]]),
    dict(num_beams=3, num_return_sequences=2, force_words_ids=[[700], [800, 801, 802]]),
    dict(num_beams=5, num_return_sequences=3, force_words_ids=[[[900, 901], [902], [903, 904, 905]]]),
    dict(num_beams=4, num_return_sequences=1, force_words_ids=[[1000, 1001], [[1100], [1200, 1201]]],
         length_penalty=0.5),
    dict(num_beams=4, num_return_sequences=4, force_words_ids=[[33, 44]]),  # met by the first prompt already
]
LIKELY = [
    lambda g: dict(num_beams=4, num_return_sequences=4, force_words_ids=[[g[0]]]),
    lambda g: dict(num_beams=3, num_return_sequences=3, force_words_ids=[[g[0], g[1]], [[g[3]], [g[4], 77]]]),
    lambda g: dict(num_beams=4, num_return_sequences=2, force_words_ids=[[g[2]]], early_stopping=True),
    lambda g: dict(num_beams=4, num_return_sequences=4, force_words_ids=[[g[1]]], early_stopping="never",
                   length_penalty=2.0),
]
NEW_TOKENS = 10


def strip(tokens: list[int], eos: list[int]) -> list[int]:
    """Without the trailing eos and pad tokens (transformers 4 writes eos_token_id[0] after a hypothesis that ended,
    whichever eos ended it, then pads)."""
    end = len(tokens)
    while end and tokens[end - 1] in eos:
        end -= 1
    return tokens[:end]


def checkpoints(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import TINY, hf_model, save_hf

    for seed, (name, spec) in enumerate(TINY.items()):
        if name in MODELS:
            (folder / name).mkdir(parents=True, exist_ok=True)
            out = save_hf(hf_model(spec, seed=seed, std=0.2), folder / name)
            config_file = Path(out) / "config.json"
            config = json.loads(config_file.read_text())
            if "rope_parameters" in config:  # (transformers 4's names)
                config["rotary_pct"] = config["rope_parameters"]["partial_rotary_factor"]
                config["rotary_emb_base"] = config["rope_parameters"]["rope_theta"]
            config_file.write_text(json.dumps(config, indent=2))
            print(name, out)


def reference(folder: Path, out_file: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    assert transformers.__version__.startswith("4."), "run this with transformers 4"
    cases = []
    for name in MODELS:
        hf = AutoModelForCausalLM.from_pretrained(folder / name, torch_dtype=torch.float32).eval()
        for kind, settings_list in (("diverse", DIVERSE), ("constrained", CONSTRAINED), ("likely", LIKELY)):
            for case in settings_list:
                for prompt in PROMPTS:
                    ids = torch.tensor([prompt])
                    with torch.no_grad():
                        greedy = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                             pad_token_id=hf.config.vocab_size - 1)  # fmt: skip
                    greedy = greedy[0, len(prompt) :].tolist()
                    settings = case(greedy) if callable(case) else case
                    for eos in ([hf.config.vocab_size - 1], [greedy[1], greedy[2], greedy[5]]):
                        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=eos[0],
                                  max_new_tokens=NEW_TOKENS, eos_token_id=eos, return_dict_in_generate=True,
                                  **settings)  # fmt: skip
                        with torch.no_grad():
                            try:
                                r = hf.generate(ids, output_scores=True, **kw)
                                scores = [round(s, 5) for s in r.sequences_scores.tolist()]
                            except RuntimeError:  # (its finalize fails on its own fallback hypotheses)
                                r, scores = hf.generate(ids, **kw), None
                        hypotheses = [strip(row, eos) for row in r.sequences[:, len(prompt) :].tolist()]
                        cases.append(dict(model=name, kind=kind, prompt=prompt, eos=eos, settings=settings,
                                          hypotheses=hypotheses, scores=scores))  # fmt: skip
        print(name, len(cases), file=sys.stderr)
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "new_tokens": NEW_TOKENS,
           "cases": cases}  # fmt: skip
    out_file.write_text(json.dumps(out, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "checkpoints":
        checkpoints(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "reference":
        reference(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
