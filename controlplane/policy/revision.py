"""The revision of a policy set: a content hash always, the git commit when the folder is in git."""
from __future__ import annotations

import hashlib
import os
import subprocess
from typing import Optional

from headroom_sidecar.controlplane.policy.types import Revision

GIT_TIMEOUT_S = 10.0


def content_sha256(folder: str, names: list[str]) -> str:
    """sha256 over each file's name and bytes, files in sorted order; a rename changes it too."""
    h = hashlib.sha256()
    for name in sorted(names):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


# The policy files only (not tests/ below them), also when deleted: pathspecs, relative to folder.
POLICY_PATHSPECS = (":(glob)*.yaml", ":(glob)*.yml")


def revision_of(folder: str, names: list[str]) -> Revision:
    commit = _git(folder, "log", "-1", "--format=%H", "--", *POLICY_PATHSPECS)
    dirty = bool(commit) and bool(_git(folder, "status", "--porcelain", "--", *POLICY_PATHSPECS))
    return Revision(content_sha256=content_sha256(folder, names), git_commit=commit or None,
                    git_dirty=dirty)


def _git(folder: str, *args: str) -> Optional[str]:
    """stdout of a git command run in folder, or None outside a repository or without git."""
    try:
        out = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True,
                             timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
