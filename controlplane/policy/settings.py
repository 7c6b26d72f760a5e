"""The policy component's settings: argument > environment variable > default, validated."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from controlplane.settings import resolve_settings


@dataclass(frozen=True)
class PolicySettings:
    # Folder of the policy set: every *.yaml directly in it.
    folder: str = field(default="policies", metadata={"env": "HEADROOM_POLICIES"})
    # Folder of policy test cases; None means <folder>/tests.
    tests_folder: Optional[str] = field(default=None, metadata={"env": "HEADROOM_POLICY_TESTS"})

    def __post_init__(self):
        if not self.folder:
            raise ValueError("invalid PolicySettings: folder must not be empty")
        if self.tests_folder is None:
            object.__setattr__(self, "tests_folder", os.path.join(self.folder, "tests"))

    @classmethod
    def resolve(cls, **overrides: Any) -> "PolicySettings":
        """Arguments win, then HEADROOM_* environment variables, then defaults."""
        return resolve_settings(cls, overrides, "policy")
