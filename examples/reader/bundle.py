#!/usr/bin/env python3
"""Assemble the reader app's bundle (docs/bundles.md) from this folder and print it as JSON.

    python3 examples/reader/bundle.py > reader.json

schema.sql → migrations; policies.json → policies and grants; functions/*.lua → functions
(named by file; `@include PATH` inside a source is replaced by that file's text, e.g. the
dashboard's TSX); checks.json → checks.
"""
import json
import pathlib
import re

here = pathlib.Path(__file__).resolve().parent


def source(path):
    text = path.read_text(encoding="utf-8")
    return re.sub(r"@include ([\w./-]+)", lambda m: (here / m.group(1)).read_text(encoding="utf-8"), text)


policies = json.loads((here / "policies.json").read_text(encoding="utf-8"))
bundle = {
    "name": "reader",
    "description": (here / "intent.txt").read_text(encoding="utf-8").strip(),
    "migrations": [{"name": "reader tables", "sql": (here / "schema.sql").read_text(encoding="utf-8")}],
    "policies": policies["policies"],
    "grants": policies.get("grants", []),
    "functions": [{"name": p.stem, "source": source(p)} for p in sorted((here / "functions").glob("*.lua"))],
    "checks": json.loads((here / "checks.json").read_text(encoding="utf-8")),
}
print(json.dumps(bundle, ensure_ascii=False, indent=1))
