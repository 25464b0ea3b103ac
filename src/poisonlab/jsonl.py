"""JSON and JSON Lines files: the records, logs, manifests and tables poisonlab writes."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from .errors import PoisonlabError
from .paths import atomic_write_text


def read_json(path: Path, what: str) -> dict:
    """A JSON object written by poisonlab; a missing, torn or edited file is a one-line error."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PoisonlabError(f"{what} {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PoisonlabError(f"{what} {path} is damaged (not valid JSON: {e}); restore it or delete its folder") from None
    if not isinstance(value, dict):
        raise PoisonlabError(f"{what} {path} is damaged (not a JSON object); restore it or delete its folder")
    return value


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file. A line that is not a JSON object (a torn write, an edit) is skipped
    with a warning on stderr, so one bad line never hides the rows after it."""
    if not path.is_file():
        return []
    rows, bad = [], []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): text may hold U+2028
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(lineno)
    if bad:
        print(f"poisonlab: warning: {path}: skipped {len(bad)} damaged line(s) (line {', '.join(map(str, bad[:5]))}"
              f"{', ...' if len(bad) > 5 else ''})", file=sys.stderr)
    return rows


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Replace ``path`` with ``rows`` atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row; after a torn last line (a killed writer) the row starts a line of its own."""
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
