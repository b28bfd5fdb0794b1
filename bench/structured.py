"""Structured outputs (neolm.structured): what constraining decoding to a JSON schema costs, against free decoding
of the same model, and the same against llama.cpp's JSON-schema grammars (llama-cpp-python) on a GGUF of the
same checkpoint, in one run.

    python bench/structured.py --model /tmp/neolm-bench/models/pythia-160m/hf \\
        [--gguf /tmp/neolm-bench/models/pythia-160m/f32.gguf --llama-python /tmp/neolm-bench/llama-venv/bin/python] \\
        --new-tokens 128 --rounds 3 --threads 2 --out bench/STRUCTURED.md

Greedy decoding of a 32-token prompt, every row made to produce all its new tokens (free rows ban eos; the schemas
cannot be completed in that many tokens), decode tokens/s over tokens 2..n as in bench.py. Schemas: "string", one
string field of at least 1,000 characters (each count of characters is its own automaton state, so every token
reaches a new one); "records", an array of at least 50 small objects (names of at most 8 characters, integers
0..120, booleans; 483 states since session 46, each item a call of one rule; 13,368 written out before); "tree", an
array of at least 40 nodes, each a name and up to 3 nodes (a recursive $ref); "any", an array of at least 40 values
of any JSON (items of every type); "arith" (a GBNF grammar, not in the default --schemas), 200 arithmetic
expressions, left-recursive for neolm and the same written right-recursively for llama.cpp (which refuses left
recursion), and "arith-right" the right-recursive one for both. neolm's "cold" row is the first generation with a schema
in a fresh process: the schema is compiled before it (its own column) and each state's allowed tokens are found as
the state is reached; "warm" repeats the generation. "choosing a token ms": the mean time of a step's processing and
pick (DecodeBatch._choose, where the constraint works), which the VM's drifting memory speed does not blur as it
does the whole step's. Each figure: the median over rounds [min-max], every row once
per round, neolm's rows in a fresh process each round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from machine import describe

SCHEMAS = {
    "string": {"type": "object", "properties": {"text": {"type": "string", "minLength": 1000}}, "required": ["text"]},
    "records": {"type": "object", "properties": {"people": {"type": "array", "minItems": 50, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                         "alive": {"type": "boolean"}}, "required": ["name", "age", "alive"]}}},
                "required": ["people"]},
    # recursive: followed with a stack of calls (neolm.structured.pushdown) since session 46
    "tree": {"type": "object", "properties": {"nodes": {"type": "array", "minItems": 40,
                                                        "items": {"$ref": "#/$defs/node"}}},
             "required": ["nodes"], "$defs": {"node": {"type": "object", "properties": {
                 "name": {"type": "string", "maxLength": 8},
                 "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3}},
                 "required": ["name", "kids"]}}},
    # (every type listed: llama-cpp-python 0.3.36 cannot read "items": true or {})
    "any": {"type": "object", "properties": {"data": {"type": "array", "minItems": 40, "items": {"type": [
        "object", "array", "string", "number", "boolean", "null"]}}}, "required": ["data"]},
}  # fmt: skip
# GBNF grammars: (neolm's, llama.cpp's). llama.cpp refuses left recursion, so it gets the same language written
# right-recursively; neolm reads the left-recursive one, rewritten (neolm.structured.leftrec: session 47), and the
# "-right" row the right-recursive one, the rewrite's cost. 200 expressions cannot be written in 128 tokens.
_ARITH = 'term ::= term ("*" | "/") factor | factor\nfactor ::= [0-9]+ | "(" expr ")" | "-" factor'
_ARITH_RIGHT = 'term ::= factor (("*" | "/") factor)*\nfactor ::= [0-9]+ | "(" expr ")" | "-" factor'
GRAMMARS = {
    "arith": ('root ::= (expr ";"){200}\nexpr ::= expr ("+" | "-") term | term\n' + _ARITH,
              'root ::= (expr ";"){200}\nexpr ::= term (("+" | "-") term)*\n' + _ARITH_RIGHT),
    "arith-right": ('root ::= (expr ";"){200}\nexpr ::= term (("+" | "-") term)*\n' + _ARITH_RIGHT,) * 2,
}  # fmt: skip
ROWS = [*SCHEMAS, *GRAMMARS]


def spec(name: str) -> dict:
    """neolm's structured_outputs of a row."""
    return {"grammar": GRAMMARS[name][0]} if name in GRAMMARS else {"json": SCHEMAS[name]}


LLAMA = r"""
import json, sys, time
from llama_cpp import Llama, LlamaGrammar
args = json.loads(sys.argv[1])
llm = Llama(model_path=args["gguf"], n_threads=args["threads"], n_threads_batch=args["threads"], n_ctx=1024,
            verbose=False)
eos = llm.token_eos()
out = {}
for name in args["rows"]:
    if name in args["grammars"]:
        grammar = LlamaGrammar.from_string(args["grammars"][name], verbose=False)
    else:
        grammar = None if name == "free" else LlamaGrammar.from_json_schema(json.dumps(args["schemas"][name]),
                                                                            verbose=False)
    llm.reset()
    stamps, text = [], ""
    for chunk in llm.create_completion(args["prompt"], max_tokens=args["new"], temperature=0.0, stream=True,
                                       grammar=grammar, logit_bias=None if grammar else {eos: -1e9}):
        stamps.append(time.perf_counter())
        text += chunk["choices"][0]["text"]
    out[name] = {"tokens": len(stamps), "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "text": text[:120]}
print(json.dumps(out))
"""


CHOOSING = []  # seconds each DecodeBatch._choose (processors and pick: where the constraint works) took


def _timed_choose(choose):
    def timed(self, keep_scores):
        start = time.perf_counter()
        out = choose(self, keep_scores)
        CHOOSING.append(time.perf_counter() - start)
        return out

    return timed


def neolm_row(lm, ids, new: int, spec: dict | None) -> dict:
    from neolm.generate import iter_generate

    kwargs = {"structured_outputs": spec} if spec else {"suppress_tokens": [lm.config.eos_token_id]}
    gc = lm.generation_config(max_new_tokens=new, do_sample=False, repetition_penalty=1.0, **kwargs)
    start, stamps, tokens = time.perf_counter(), [], []
    CHOOSING.clear()
    for step in iter_generate(lm.model, [ids], gc, lm.tokenizer.decode):
        stamps.append(time.perf_counter())
        tokens += step
    return {"tokens": len(tokens), "tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "first_s": stamps[0] - start, "choose_ms": 1000 * statistics.mean(CHOOSING[1:]),
            "text": lm.decode(tokens)[:120]}  # fmt: skip


def run_neolm(args, prompt_ids) -> dict:
    import torch

    import neolm
    from neolm import structured
    from neolm.generate import DecodeBatch

    DecodeBatch._choose = _timed_choose(DecodeBatch._choose)
    torch.set_num_threads(args.threads)
    lm = neolm.load(args.model)
    ids = prompt_ids(lm)
    out = {"free": neolm_row(lm, ids, args.new_tokens, None)}
    for name in args.schemas.split(","):
        structured._compiled.cache_clear()  # cold: compile the schema and find each state's tokens afresh
        structured.regex._compiled.cache_clear()
        t = time.perf_counter()
        guide = structured.compile(spec(name), lm.tokenizer)
        compile_s = time.perf_counter() - t
        out[f"{name} cold"] = neolm_row(lm, ids, args.new_tokens, spec(name)) | {"compile_s": compile_s}
        out[f"{name} warm"] = neolm_row(lm, ids, args.new_tokens, spec(name))
        out[f"{name} warm"]["states"] = guide.dfa.states
        out[f"{name} warm"]["states_found"] = len(guide._masks)
    return out


def run_llama(args, text: str) -> dict:
    job = {"gguf": args.gguf, "threads": args.threads, "new": args.new_tokens, "prompt": text, "schemas": SCHEMAS,
           "grammars": {k: v[1] for k, v in GRAMMARS.items()}, "rows": ["free", *args.schemas.split(",")]}  # fmt: skip
    done = subprocess.run([args.llama_python, "-c", LLAMA, json.dumps(job)], capture_output=True, text=True, check=False,
                          timeout=1800)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def cell(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face checkpoint folder")
    p.add_argument("--gguf", help="llama.cpp's GGUF of the same checkpoint (f32): adds llama.cpp's rows")
    p.add_argument("--llama-python", default=sys.executable, help="an interpreter with llama-cpp-python")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--schemas", default=",".join(SCHEMAS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the table here (markdown)")
    args = p.parse_args()

    import neolm

    text = neolm.load(args.model).tokenizer.decode(prompt_ids(neolm.load(args.model)))
    results: list[dict] = []
    for r in range(args.rounds):
        round_ = {f"neolm {k}": v for k, v in subprocess_neolm(args).items()}
        if args.gguf:
            round_ |= {f"llama.cpp {k}": v for k, v in run_llama(args, text).items()}
        results.append(round_)
        print(f"round {r + 1}:", {k: round(v["tok_s"], 1) for k, v in round_.items()}, flush=True)
    rows = list(results[0])
    machine = describe()
    llama_version = "not run"
    if args.gguf:
        llama_version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                       capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    lines = [
        f"`python bench/structured.py {' '.join(sys.argv[1:])}`",
        "",
        (
            f"{machine['cpu']} ({machine['cpu_id']}; {machine['simd']}), {args.threads} threads, torch "
            f"{machine.get('torch')}, neolm at {machine['neolm_commit']}, llama-cpp-python {llama_version}; "
            f"{args.rounds} rounds, {args.new_tokens} new tokens, greedy; model {args.model}"
        ),
        "",
        (
            "| row | decode tok/s | vs its engine's free decoding | choosing a token ms | first token s | schema compile s "
            "| states found / automaton states |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        engine = row.split()[0]
        speed = [res[row]["tok_s"] for res in results]
        ratio = [res[row]["tok_s"] / res[f"{engine} free"]["tok_s"] for res in results]
        first = [res[row]["first_s"] for res in results if "first_s" in res[row]]
        choose = [res[row]["choose_ms"] for res in results if "choose_ms" in res[row]]
        comp = [res[row]["compile_s"] for res in results if "compile_s" in res[row]]
        last = results[-1][row]
        states = f"{last['states_found']} / {last['states']}" if "states" in last else ""
        lines.append(f"| {row} | {cell(speed)} | {cell(ratio, '{:.2f}')}x | {cell(choose, '{:.2f}') if choose else ''} "
                     f"| {cell(first, '{:.2f}') if first else ''} "
                     f"| {cell(comp, '{:.2f}') if comp else ''} | {states} |")  # fmt: skip
    lines += ["", "Texts (last round, first 120 characters):", ""]
    lines += [f"- {row}: `{results[-1][row]['text']!r}`" for row in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)


def subprocess_neolm(args) -> dict:
    """neolm's rows in a fresh process (so "cold" is cold)."""
    code = (f"import json, sys; sys.argv = ['x']; sys.path.insert(0, {str(Path(__file__).parent)!r}); import structured as s; import argparse; "
            f"a = argparse.Namespace(**json.loads({json.dumps(vars(args))!r})); "
            "print(json.dumps(s.run_neolm(a, s.prompt_ids)))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def prompt_ids(lm) -> list[int]:
    """The 32-token prompt every row continues."""
    return lm.encode("The following is a list of the people of the town, with their ages, as JSON: " * 4)[:32]


if __name__ == "__main__":
    main()
