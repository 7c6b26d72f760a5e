"""The policy component's settings: argument > environment variable > default, validated."""
from __future__ import annotations

import os
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

from headroom_sidecar.controlplane.settings import resolve_settings


def default_folder() -> str:
    if os.path.isdir("policies"):
        return "policies"
    # A data-only namespace package: its one search location is the folder itself.
    spec = importlib.util.find_spec("headroom_sidecar.policies")
    return list(spec.submodule_search_locations)[0] if spec else "policies"


@dataclass(frozen=True)
class PolicySettings:
    # Folder of the policy set: every *.yaml directly in it. None: ./policies where the current
    # directory has one (a checkout, a mounted ConfigMap), else the defaults shipped in the package.
    folder: Optional[str] = field(default=None, metadata={"env": "HEADROOM_POLICIES"})
    # Folder of policy test cases; None means <folder>/tests.
    tests_folder: Optional[str] = field(default=None, metadata={"env": "HEADROOM_POLICY_TESTS"})

    def __post_init__(self):
        if self.folder is None:
            object.__setattr__(self, "folder", default_folder())
        if not self.folder:
            raise ValueError("invalid PolicySettings: folder must not be empty")
        if self.tests_folder is None:
            object.__setattr__(self, "tests_folder", os.path.join(self.folder, "tests"))

    @classmethod
    def resolve(cls, **overrides: Any) -> "PolicySettings":
        """Arguments win, then HEADROOM_* environment variables, then defaults."""
        return resolve_settings(cls, overrides, "policy")
