"""Test data for preprocessing: a small bilingual corpus written in every input format."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

SENTENCES = {
    "en": [
        "The quick brown fox jumps over the lazy dog.",
        "To be, or not to be, that is the question:",
        "Megatron-Core trains large transformer models with tensor and pipeline parallelism.",
        "def add(a, b):\n    return a + b\n",
        "Prices rose 3.5% in 2025; analysts expect 12,000 new jobs.",
        "A literal <|end_of_text|> inside a web page is just text.",
        "Ünïcödé, emoji 😀 and tabs\tand CRLF\r\nlines.",
    ],
    "zh": [
        "中共中央总书记、国家主席江泽民发表新年讲话。",
        "送货速度快，质量还不错，值得购买。",
        "北京市大力发展首都经济，努力争取在世纪之交再上一个新台阶。",
        "这本书的内容只适合边上厕所边消遣了。",
        "１９９８年，中国人民将满怀信心地开创新的业绩。",
    ],
}
SOURCES = {"en": ["book-en", "code-en", "encyclopedia-en"], "zh": ["news-cn", "forum-cn"]}


def make_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        lang = "en" if i % 3 else "zh"
        text = " ".join(rng.choice(SENTENCES[lang]) for _ in range(rng.randint(1, 12)))
        record = {"text": f"[{i}] {text}", "lang": lang, "source": rng.choice(SOURCES[lang])}
        if i % 5 == 0:
            record["topic"] = rng.choice(["science", "society", "technology"])
        records.append(record)
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data, mtime=0))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(data))
    else:
        path.write_bytes(data)
    return path


def write_parquet(path: Path, records: list[dict], row_group_size: int = 40) -> Path:
    columns = {k: [r.get(k) for r in records] for k in ("text", "lang", "source", "topic")}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def read_input_records(path: str) -> list[dict]:
    """Records of an input file in order (test oracle; whole file in memory)."""
    if path.endswith(".parquet"):
        return pq.read_table(path).to_pylist()
    raw = Path(path).read_bytes()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    elif path.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().decompress(raw)
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def output_files(prefix: str) -> dict[str, bytes]:
    """Every file a run writes for ``--output-prefix prefix`` (key 'text'), by suffix."""
    names = {
        "bin": f"{prefix}_text_document.bin",
        "idx": f"{prefix}_text_document.idx",
        "meta": f"{prefix}_text_document.meta.parquet",
        "rejects": f"{prefix}.rejects.jsonl",
    }
    return {k: Path(v).read_bytes() for k, v in names.items()}
