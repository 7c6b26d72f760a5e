"""`--json` on every command: the flag and the one way a document is written."""
from __future__ import annotations

import argparse
import json
import sys


def add_json_flag(p: argparse.ArgumentParser, shape: str = "") -> None:
    """`--json`: one JSON document on stdout instead of text (errors too: {command, error})."""
    p.add_argument("--json", action="store_true",
                   help=f"print one JSON document: {shape}" if shape else
                   "one JSON document on stdout, not text")


def write_json(doc, out=None) -> None:
    (out or sys.stdout).write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
