"""Synthetic data for Stage II: science QA and code QA generated through an LLM server.

client.py / http.py  OpenAI-compatible async client (fleet, retries, deadlines)
local_backend.py     the same interface over a local transformers model
prompts.py           disciplines, keyword classifier, templates, prompt versions
parsing.py           [Problem]/[Solution]/[Tests] and code extraction
sandbox.py           running generated code against tests with limits
filters.py, text.py  length, repetition, language, MinHash dedup, decontamination
store.py             append-only resumable JSONL
pipeline.py          the shared engine; science_qa.py, code_qa.py the two tasks
corpus.py            accepted items -> training text JSONL
testing_server.py    scripted OpenAI-compatible server for tests and benchmarks
"""
