"""Seed labels: the keyword-lexicon bootstrap and labelling through an OpenAI-compatible server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_syne.topics.seeding import KeywordLexicon, parse_answer
from megatron_syne.topics.taxonomy import load_taxonomy
from tests.topics._data import load_tool, write_toy_taxonomy

seed_tool = load_tool("topics/seed_labels.py")


def _jsonl(path, rows):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_lexicon_bootstrap_on_the_default_taxonomy(tmp_path):
    docs = [
        {"lang": "en", "text": "The proof of the theorem uses algebra: solve the equation, then take the derivative and the integral."},
        {"lang": "zh", "text": "医生说患者的症状需要尽快诊断和治疗，医院准备了药物和手术方案。"},
        {"lang": "zh", "text": "这家公司今年的利润增长很快，投资者关注股票市场和企业管理。"},
        {"lang": "en", "text": "We walked home."},  # no keywords
        # three law keywords and three economics keywords: ambiguous, set aside
        {"lang": "en", "text": "The court and the judge read the contract while the bank and the market set the price."},
    ]  # fmt: skip
    data = _jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "seeds.jsonl"
    assert seed_tool.main(["--method", "lexicon", "--input", str(data), "--output", str(out)]) == 0
    labelled = {row["where"].rsplit(":", 1)[1]: row["topic"] for row in _read(out)}
    assert labelled == {
        "1": "en_math_physics",
        "2": "zh_medicine_health",
        "3": "zh_economics_business",
    }
    aside = {
        row["where"].rsplit(":", 1)[1]: row["reason"]
        for row in _read(tmp_path / "seeds.jsonl.set_aside.jsonl")
    }
    assert aside == {"4": "no_keywords", "5": "ambiguous"}


def test_lexicon_matches_english_on_word_boundaries():
    lexicon = KeywordLexicon(load_taxonomy())
    scores = lexicon.scores("Codes of conduct; artwork; cells", "en")
    assert scores["en_cs_engineering"] == (0, 0)  # "code" must not match inside "codes"
    assert scores["en_chemistry_biology"] == (0, 0)  # nor "cell" inside "cells"


def test_parse_answer():
    topics = load_taxonomy().topics_for_lang("en")
    assert parse_answer("en_law_politics", topics) == "en_law_politics"
    assert parse_answer('{"topic": "en_law_politics"}', topics) == "en_law_politics"
    assert parse_answer("Topic: Law and Politics.", topics) == "en_law_politics"
    assert parse_answer("en_law_politics or en_economics_business", topics) is None
    assert parse_answer("no idea", topics) is None


class _Server(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat server: answers by keyword; scripted failures."""

    calls: dict[str, int] = {}
    prompts: list[str] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["model"] == "toy-model"
        prompt = body["messages"][-1]["content"]
        document = prompt.split("<<<\n", 1)[1]
        key = document[:20]
        self.calls[key] = self.calls.get(key, 0) + 1
        self.prompts.append(prompt)
        if "FLAKY" in document and self.calls[key] == 1:
            self.send_response(503)
            self.end_headers()
            return
        if "GARBAGE" in document:
            answer = "It is hard to say."
        elif "football" in document:
            answer = "en_sport"
        else:
            answer = "Topic: en_cooking."
        payload = json.dumps(
            {"choices": [{"message": {"role": "assistant", "content": answer}}]}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_llm_seed_labels_retry_and_keep_unparsable_aside(tmp_path, chat_server):
    taxonomy = write_toy_taxonomy(tmp_path / "toy.yaml")
    docs = [
        {"lang": "en", "text": "football match tonight"},
        {"lang": "en", "text": "FLAKY server, football again"},
        {"lang": "en", "text": "bake the flour with butter"},
        {"lang": "en", "text": "GARBAGE in, garbage out"},
    ]
    data = _jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "seeds.jsonl"
    rc = seed_tool.main(
        ["--method", "llm", "--input", str(data), "--output", str(out), "--taxonomy", str(taxonomy),
         "--api-base", chat_server, "--model", "toy-model", "--concurrency", "2"]
    )  # fmt: skip
    assert rc == 0
    labelled = {row["text"]: (row["topic"], row["attempts"]) for row in _read(out)}
    assert labelled == {
        "football match tonight": ("en_sport", 1),
        "FLAKY server, football again": ("en_sport", 2),  # a 503, then retried
        "bake the flour with butter": ("en_cooking", 1),
    }
    aside = _read(tmp_path / "seeds.jsonl.set_aside.jsonl")
    assert [(r["text"], r["reason"], r["answer"]) for r in aside] == [
        ("GARBAGE in, garbage out", "unparsable", "It is hard to say.")
    ]
    # The prompt offers only the document language's topics, with their descriptions.
    prompt = _Server.prompts[0]
    assert "en_sport: en sport. documents about sport" in prompt and "zh_sport" not in prompt
