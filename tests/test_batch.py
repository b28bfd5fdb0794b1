"""`neolm batch` (neolm.serve.batch): a file of OpenAI batch requests answered as `neolm serve` answers them,
written as each ends, resumable after a crash, and a bad file refused before the model loads."""

from __future__ import annotations

import json

import pytest
from conftest import NAME
from test_cli import assert_one_line_error, cli
from test_serve import call

from neolm.serve.batch import answered, read_requests

BODIES = {
    "plain": ("/v1/completions", {"prompt": "KING.", "max_tokens": 12, "temperature": 0}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hail, my lord."}], "max_tokens": 10,
                                      "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    "seeded": ("/v1/completions", {"prompt": ["To be", "or not"], "max_tokens": 6, "n": 2, "temperature": 0.8,
                                   "seed": 3}),
    "echo": ("/v1/completions", {"prompt": "Now is the winter", "max_tokens": 0, "echo": True, "logprobs": 1,
                                 "temperature": 0}),
    "stop": ("/v1/completions", {"prompt": "KING.", "max_tokens": 30, "temperature": 0, "stop": ["\n\n"]}),
    "too long": ("/v1/completions", {"prompt": "x", "max_tokens": 100000}),
    "bad field": ("/v1/completions", {"prompt": "x", "temperature": "hot"}),
    "streamed": ("/v1/completions", {"prompt": "x", "stream": True}),
}  # fmt: skip


def write_input(path, names=BODIES) -> None:
    path.write_text("".join(json.dumps({"custom_id": name, "method": "POST", "url": BODIES[name][0],
                                        "body": BODIES[name][1]}) + "\n" for name in names))  # fmt: skip


def read_output(path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {r["custom_id"]: r for r in records}
    assert len(by_id) == len(records)  # each request once
    return by_id


def comparable(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_answers_are_the_servers(server, tmp_path, capsys):
    requests, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(requests)
    code, _, err = cli(capsys, "batch", requests, output, "--served-model-name", NAME)
    assert code == 0, err
    assert f"{len(BODIES)} requests answered" in err and "3 failed" in err
    records = read_output(output)
    assert set(records) == set(BODIES)
    for name, (path, body) in BODIES.items():
        record = records[name]
        status, expected = call(server, path, {**body, "stream": False} if name != "streamed" else body)
        if name == "streamed":  # the server streams it; a batch answers whole or not at all
            assert record["response"]["status_code"] == 400 and "stream" in record["error"]["message"]
            continue
        assert record["response"]["status_code"] == status, name
        assert record["id"].startswith("batch_req_")
        if status == 200:
            assert record["error"] is None
            assert comparable(record["response"]["body"]) == comparable(expected), name
            assert record["response"]["request_id"] == record["response"]["body"]["id"]
        else:
            assert record["response"]["body"] == expected, name
            assert record["error"] == {"code": expected["error"]["type"], "message": expected["error"]["message"]}


def test_resume_adds_what_a_crash_lost(tmp_path, capsys):
    requests, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    names = ["plain", "chat", "seeded", "stop"]
    write_input(requests, names)
    assert cli(capsys, "batch", requests, output)[0] == 0
    whole = read_output(output)
    lines = output.read_text().splitlines(keepends=True)
    output.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # a crash while the second answer was written
    code, _, err = cli(capsys, "batch", requests, output)
    assert_one_line_error(code, err, "exists", "--resume")
    code, _, err = cli(capsys, "batch", requests, output, "--resume")
    assert code == 0, err
    assert "1 of 4 requests already answered" in err and "3 requests answered" in err
    resumed = read_output(output)
    assert set(resumed) == set(names)
    for name in names:
        assert comparable(resumed[name]["response"]["body"]) == comparable(whole[name]["response"]["body"])
    code, _, err = cli(capsys, "batch", requests, output, "--resume")
    assert code == 0 and "4 of 4 requests already answered" in err
    assert answered(output) == set(names)


@pytest.mark.parametrize(
    "text, needle",
    [
        ('{"custom_id": "a", "url": "/v1/completions", "body": {}}\nnot json\n', "line 2: not JSON"),
        ('{"custom_id": "a", "url": "/v1/completions", "body": {}}\n' * 2, "line 2: custom_id 'a' is used twice"),
        ('{"custom_id": "a", "url": "/v1/embeddings", "body": {}}\n', "url must be one of"),
        ('{"custom_id": "a", "url": "/v1/completions"}\n', "body must be a JSON object"),
        ('{"custom_id": 3, "url": "/v1/completions", "body": {}}\n', "custom_id must be a non-empty string"),
        ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}\n', "method must be POST"),
        ("[1, 2]\n", "a request is a JSON object"),
        ("\n\n", "holds no requests"),
    ],
)
def test_a_bad_file_is_refused_before_the_load(tmp_path, capsys, monkeypatch, text, needle):
    requests = tmp_path / "in.jsonl"
    requests.write_text(text)
    monkeypatch.setattr("neolm.serve.cli.load_model", lambda args: pytest.fail("loaded the model"))
    code, _, err = cli(capsys, "batch", requests, tmp_path / "out.jsonl")
    assert_one_line_error(code, err, needle)
    with pytest.raises(Exception, match=needle.split(": ")[-1]):
        read_requests(requests)


def test_an_output_that_is_not_a_batch_output_is_refused(tmp_path, capsys):
    requests, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(requests, ["plain"])
    output.write_text("something else\n{}\n")
    code, _, err = cli(capsys, "batch", requests, output, "--resume")
    assert_one_line_error(code, err, "not a batch output file")
    assert output.read_text() == "something else\n{}\n"  # left as it was
