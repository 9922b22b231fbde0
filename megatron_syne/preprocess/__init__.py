"""Raw text -> Megatron indexed datasets with per-document metadata.

- ``tokenizers``: ``load_tokenizer`` by Megatron ``--tokenizer-type`` (Llama-3 by default).
- ``readers``: input discovery, work units, streaming JSONL(.gz/.zst) / Parquet readers.
- ``documents``: record validation and reject records.
- ``indexed``: ``.bin/.idx`` writing, reading and merging (megatron-core's format).
- ``pipeline``: ``PreprocessConfig`` / ``run_preprocess`` (tools/preprocess/preprocess_data.py).
- ``merge``, ``stats``, ``corpus``: merge_datasets.py, inspect_data.py, sample_corpus.py.
"""
