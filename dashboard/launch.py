"""`headroom-dashboard [--address HOST:PORT] [--operator NAME] [streamlit flags]`: the installed
entry point. Streamlit runs a script file, so this runs `streamlit run <package>/app.py`; the
dashboard's own flags go after `--`, everything else is Streamlit's.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

APP = Path(__file__).resolve().parent / "app.py"
OWN_FLAGS = ("--address", "--operator", "--timeout-s", "--max-rows")
# Local-first defaults a user can override: no usage statistics, no browser to open.
DEFAULTS = ("--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer")


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(streamlit's flags, the dashboard's flags); a dashboard flag takes the value after it."""
    streamlit_args, own, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # the old `streamlit run app.py -- FLAGS` form: the split is ours now
            i += 1
            continue
        name = arg.split("=", 1)[0]
        target = own if name in OWN_FLAGS else streamlit_args
        target.append(arg)
        if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            target.append(argv[i + 1])
            i += 1
        i += 1
    return streamlit_args, own


def command(argv: Sequence[str]) -> list[str]:
    streamlit_args, own = split_args(argv)
    return [sys.executable, "-m", "streamlit", "run", str(APP), *DEFAULTS, *streamlit_args,
            "--", *own]


def main(argv: Sequence[str] | None = None) -> None:
    cmd = command(sys.argv[1:] if argv is None else argv)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
