"""The server's counters, served at GET /metrics in Prometheus' text format (version 0.0.4), named as vLLM's
(`vllm:` -> `neolm:`) so that dashboards made for it read these: requests running and waiting, prompt and
generated tokens, finished sequences by reason, histograms of time to first token and request latency, and with
LoRA adapters held, which ones running and waiting requests use (lora_requests_info).

The engine thread writes them and HTTP threads read them without a lock: a scrape may see one request's
numbers half-updated, as Prometheus clients tolerate.
"""

from __future__ import annotations

import bisect
import time

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
REASONS = ("stop", "length", "abort")


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip([*map(repr, self.buckets), "+Inf"], self.counts):
            total += count
            out.append(f'{name}_bucket{{{labels},le="{bound}"}} {total}')
        return out + [f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {total}"]


class Metrics:
    def __init__(self, speculating: bool = False):
        self.speculating = speculating  # speculative decoding's counters are served (neolm.serve.speculation)
        self.spec_drafts = self.spec_draft_tokens = self.spec_accepted = 0  # its rounds, guesses, guesses kept
        self.running = 0  # requests decoding
        self.running_adapters: set[int] = set()  # the LoRA adapters they use (neolm.multilora's indices)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # and found there (not read)
        self.finished = dict.fromkeys(REASONS, 0)  # sequences, by why they ended ("abort": the client went away)
        self.ttft = Histogram(TTFT_BUCKETS)  # request submitted -> its first token
        self.latency = Histogram(LATENCY_BUCKETS)  # request submitted -> its last sequence ended

    def speculated(self, rounds: int, guessed: int, kept: int) -> None:
        self.spec_drafts += rounds
        self.spec_draft_tokens += guessed
        self.spec_accepted += kept

    def render(self, model_name: str, waiting: int, lora: tuple[list[str], list[str], int] | None = None) -> str:
        """The text a Prometheus scrape gets; lora: the adapters running and waiting requests use, and how many
        are held (Engine.lora_info), for vLLM's lora_requests_info."""
        labels = f'model_name="{_escape(model_name)}"'
        out: list[str] = []

        def metric(name: str, kind: str, about: str, lines: list[str]) -> None:
            out.extend([f"# HELP neolm:{name} {about}", f"# TYPE neolm:{name} {kind}", *lines])

        metric(
            "num_requests_running",
            "gauge",
            "Requests decoding now.",
            [f"neolm:num_requests_running{{{labels}}} {self.running}"],
        )
        metric(
            "num_requests_waiting",
            "gauge",
            "Requests waiting to join the batch.",
            [f"neolm:num_requests_waiting{{{labels}}} {waiting}"],
        )
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens read.",
            [f"neolm:prompt_tokens_total{{{labels}}} {self.prompt_tokens}"],
        )
        metric(
            "generation_tokens_total",
            "counter",
            "Tokens generated.",
            [f"neolm:generation_tokens_total{{{labels}}} {self.generation_tokens}"],
        )
        metric(
            "prefix_cache_queries_total",
            "counter",
            "Prompt tokens looked up in the prefix cache (neolm serve --prefix-cache).",
            [f"neolm:prefix_cache_queries_total{{{labels}}} {self.prefix_queries}"],
        )
        metric(
            "prefix_cache_hits_total",
            "counter",
            "Prompt tokens found in the prefix cache, not read.",
            [f"neolm:prefix_cache_hits_total{{{labels}}} {self.prefix_hits}"],
        )
        metric(
            "request_success_total",
            "counter",
            "Sequences finished, by reason.",
            [f'neolm:request_success_total{{{labels},finished_reason="{r}"}} {n}' for r, n in self.finished.items()],
        )
        metric(
            "time_to_first_token_seconds",
            "histogram",
            "From a request's arrival to its first token.",
            self.ttft.lines("neolm:time_to_first_token_seconds", labels),
        )
        metric("e2e_request_latency_seconds", "histogram", "From a request's arrival to its end.",
               self.latency.lines("neolm:e2e_request_latency_seconds", labels))  # fmt: skip
        if self.speculating:
            for name, about, value in (
                ("spec_decode_num_drafts_total", "Speculative rounds (guesses checked in one forward).",
                 self.spec_drafts),
                ("spec_decode_num_draft_tokens_total", "Tokens guessed.", self.spec_draft_tokens),
                ("spec_decode_num_accepted_tokens_total", "Guessed tokens the model kept.", self.spec_accepted),
            ):  # fmt: skip
                metric(name, "counter", about, [f"neolm:{name}{{{labels}}} {value}"])
        if lora is not None:  # as vLLM: the labels carry the names, the value is when they were read
            running, waiting_on, held = lora
            info = (f'max_lora="{held}",running_lora_adapters="{_escape(",".join(running))}",'
                    f'waiting_lora_adapters="{_escape(",".join(waiting_on))}"')  # fmt: skip
            metric("lora_requests_info", "gauge", "Running stats on LoRA requests.",
                   [f"neolm:lora_requests_info{{{info}}} {time.time()}"])  # fmt: skip
        return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
