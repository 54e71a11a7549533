"""Local benchmark files: where they are, and readers that validate every record.

The data directory is the folder holding `eval/` (the project's `../shared/data`) or the
`eval/` folder itself. It is resolved from, in order: the explicit argument (`--data-dir`), the
environment variable `CBOPRUNE_DATA_DIR`, `../shared/data` relative to the current directory,
and `../shared/data` relative to the repository root. Every reader raises `CBOPruneError` with
one line naming the file, the record and the fix.
"""

from __future__ import annotations

import bz2
import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from cboprune.core.errors import CBOPruneError

log = logging.getLogger(__name__)

ENV_VAR = "CBOPRUNE_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_MARKER = "arc_easy.jsonl"  # a file every eval folder holds; used to recognise one


def _candidates(data_dir: str | os.PathLike | None) -> list[tuple[Path, str]]:
    if data_dir is not None:
        return [(Path(data_dir).expanduser(), "--data-dir")]
    if os.environ.get(ENV_VAR):
        return [(Path(os.environ[ENV_VAR]).expanduser(), ENV_VAR)]
    return [(Path.cwd().parent / "shared" / "data", "default"),
            (_REPO_ROOT.parent / "shared" / "data", "default")]


def resolve_eval_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the benchmark files (`<data_dir>/eval`, or `data_dir` itself)."""
    tried = []
    for base, origin in _candidates(data_dir):
        for candidate in (base / "eval", base):
            if candidate.is_dir() and any(candidate.iterdir()):
                if (candidate / _MARKER).exists() or candidate.name == "eval" or origin != "default":
                    return candidate.resolve()
        tried.append(f"{base} (from {origin})")
    raise CBOPruneError(
        f"no benchmark data folder found (tried {', '.join(tried)}): pass --data-dir pointing at "
        f"the folder that holds eval/ (e.g. ../shared/data) or set {ENV_VAR}"
    )


def require_file(path: Path, task: str) -> Path:
    if not path.exists():
        raise CBOPruneError(
            f"data file for task {task!r} not found: {path}; put it there or pass --data-dir "
            f"(or {ENV_VAR}) pointing at the folder that holds eval/"
        )
    return path


def _malformed(path: Path, where: str, problem: str) -> CBOPruneError:
    return CBOPruneError(f"malformed record in {path} ({where}): {problem}; fix or remove that record")


def check_record(rec: Any, path: Path, where: str, schema: dict[str, type | tuple[type, ...]]) -> dict:
    """Validate that `rec` is an object with the keys and types of `schema`."""
    if not isinstance(rec, dict):
        raise _malformed(path, where, f"expected a JSON object, got {type(rec).__name__}")
    for key, typ in schema.items():
        if key not in rec:
            raise _malformed(path, where, f"missing key {key!r}")
        if not isinstance(rec[key], typ) or (typ is int and isinstance(rec[key], bool)):
            raise _malformed(path, where, f"key {key!r} has type {type(rec[key]).__name__}")
    return rec


def read_text(path: Path, task: str) -> str:
    """The file's text, or a one-line error when it is a folder, unreadable, binary or not UTF-8."""
    require_file(path, task)
    if path.is_dir():
        raise CBOPruneError(f"{path} (task {task!r}) is a directory: pass a text file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CBOPruneError(f"cannot read {path} (task {task!r}): {exc.strerror}; check its permissions") from None
    if b"\x00" in raw[:65536]:
        raise CBOPruneError(f"{path} (task {task!r}) looks like a binary file (it holds NUL bytes): "
                            "pass a UTF-8 text file (decompress archives first)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CBOPruneError(f"{path} (task {task!r}) is not UTF-8 text (invalid byte at offset {exc.start}): "
                            "convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def read_jsonl(path: Path, task: str, schema: dict[str, type | tuple[type, ...]]) -> list[dict]:
    records = []
    for n, line in enumerate(read_text(path, task).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _malformed(path, f"line {n}", f"invalid JSON ({exc.msg})") from None
        records.append(check_record(rec, path, f"line {n}", schema))
    if not records:
        raise CBOPruneError(f"data file for task {task!r} is empty: {path}; restore the file")
    return records


def check_choices(rec: dict, path: Path, where: str, n_key: str = "choices") -> None:
    choices = rec[n_key]
    if not choices or not all(isinstance(c, str) for c in choices):
        raise _malformed(path, where, f"{n_key!r} must be a non-empty list of strings")
    if not 0 <= rec["gold"] < len(choices):
        raise _malformed(path, where, f"gold {rec['gold']} is not an index into {n_key!r}")


def read_mc_jsonl(path: Path, task: str) -> list[dict]:
    """`{query, choices, gold}` records (ARC, PIQA, BoolQ)."""
    recs = read_jsonl(path, task, {"query": str, "choices": list, "gold": int})
    for n, rec in enumerate(recs, 1):
        check_choices(rec, path, f"record {n}")
    return recs


def read_winogrande(path: Path, task: str) -> list[dict]:
    recs = read_jsonl(path, task, {"context_options": list, "continuation": str, "gold": int})
    for n, rec in enumerate(recs, 1):
        check_choices(rec, path, f"record {n}", "context_options")
    return recs


def read_hellaswag(path: Path, task: str) -> list[dict]:
    """The bz2 text file: 6 lines per item (`label: ctx`, gold index, 4 endings)."""
    require_file(path, task)
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise _malformed(path, f"line {len(lines) - len(lines) % 6 + 1}",
                         f"{len(lines)} lines is not a multiple of 6 (query, gold, 4 endings)")
    docs = []
    for i in range(0, len(lines), 6):
        query, gold, *endings = lines[i:i + 6]
        if not gold.strip().isdigit() or int(gold) > 3:
            raise _malformed(path, f"line {i + 2}", f"gold index {gold!r} is not 0-3")
        docs.append({"query": query, "choices": endings, "gold": int(gold)})
    return docs


def read_mmlu_csv(path: Path, task: str) -> list[dict]:
    """`question,choice0..3,answer` rows -> `{question, choices, answer}`."""
    require_file(path, task)
    docs = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        need = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
        if reader.fieldnames is None or any(k not in reader.fieldnames for k in need):
            raise _malformed(path, "header", f"expected columns {','.join(need)}")
        for n, row in enumerate(reader, 2):
            if not row["answer"] or row["answer"].strip() not in "0123":
                raise _malformed(path, f"line {n}", f"answer {row['answer']!r} is not 0-3")
            docs.append({"question": row["question"],
                         "choices": [row[f"choice{k}"] for k in range(4)],
                         "answer": int(row["answer"])})
    return docs


def read_bbh(path: Path, task: str) -> list[dict]:
    require_file(path, task)
    try:
        data = json.loads(read_text(path, task))
    except json.JSONDecodeError as exc:
        raise _malformed(path, f"line {exc.lineno}", f"invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise _malformed(path, "top level", "expected an object with a list 'examples'")
    return [check_record(rec, path, f"example {n}", {"input": str, "target": str})
            for n, rec in enumerate(data["examples"], 1)]


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def read_wikitext_documents(path: Path, task: str) -> list[str]:
    """Split the raw WikiText test file into articles (a line ` = Title = ` starts one).

    CRLF endings are normalised; lines are joined with `\\n`. Returns the pages before
    detokenization (lm-eval counts words on these).
    """
    require_file(path, task)
    text = read_text(path, task).replace("\r\n", "\n").replace("\r", "\n")
    pages: list[list[str]] = []
    for line in text.split("\n"):
        if not line:
            continue
        if _WIKI_TITLE.match(line) or not pages:
            pages.append([])
        pages[-1].append(line)
    if not pages:
        raise CBOPruneError(f"data file for task {task!r} is empty: {path}; restore the file")
    return ["\n".join(p) + "\n" for p in pages]


def read_text_documents(path: Path, task: str) -> list[str]:
    """Any text file as one document; a `.jsonl` file as one document per record's `text`."""
    if path.suffix == ".jsonl":
        return [r["text"] for r in read_jsonl(path, task, {"text": str})]
    text = read_text(path, task).replace("\r\n", "\n")
    if not text.strip():
        raise CBOPruneError(f"text file for task {task!r} is empty: {path}; pass a file with text")
    return [text]


def wikitext_detokenize(page: str) -> str:
    """Undo WikiText's tokenization (`@-@`, spaced punctuation), as lm-eval's `wikitext` task."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                 (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176))
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s
