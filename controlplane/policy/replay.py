"""Replay: which recorded decisions a policy change would have turned out differently."""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from headroom_sidecar.controlplane.policy.engine import evaluate
from headroom_sidecar.controlplane.policy.loader import load_policy_set
from headroom_sidecar.controlplane.policy.schema import PolicySet
from headroom_sidecar.controlplane.policy.types import Decision, Outcome

RECORD_KEYS = ("plan", "evidence", "context", "model")
# Records without context.now_s are judged by both sets at this instant: only the policies differ.
FIXED_NOW_S = 1_700_000_000.0


@dataclass(frozen=True)
class Record:
    plan: Mapping[str, Any]
    evidence: Mapping[str, Any]
    context: Mapping[str, Any]
    model: Mapping[str, Any]


@dataclass(frozen=True)
class Change:
    index: int                      # position of the record in the input
    plan_id: str
    old: Outcome
    new: Outcome
    rules: tuple[str, ...]          # rules whose outcome differs, "id: old -> new"


def replay(records: Iterable[Record], old_folder: str, new_folder: str) -> list[Change]:
    return replay_sets(records, load_policy_set(old_folder), load_policy_set(new_folder))


def replay_sets(records: Iterable[Record], old: PolicySet, new: PolicySet) -> list[Change]:
    changes = []
    for i, rec in enumerate(records):
        before, after = _decide(old, rec), _decide(new, rec)
        if before.outcome is not after.outcome:
            changes.append(Change(i, before.plan_id, before.outcome, after.outcome,
                                  _rule_diff(before, after)))
    return changes


def _decide(policy_set: PolicySet, rec: Record) -> Decision:
    return evaluate(policy_set, rec.plan, rec.evidence, rec.model, rec.context,
                    clock=lambda: FIXED_NOW_S)


def _rule_diff(before: Decision, after: Decision) -> tuple[str, ...]:
    old = {r.rule_id: r.outcome.value for r in before.results}
    new = {r.rule_id: r.outcome.value for r in after.results}
    absent = "absent"
    return tuple(f"{rid}: {old.get(rid, absent)} -> {new.get(rid, absent)}"
                 for rid in sorted(set(old) | set(new)) if old.get(rid) != new.get(rid))


def read_records_jsonl(path: str) -> list[Record]:
    """One JSON object per line with plan, evidence, context, model; blank lines are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                records.append(_record(line, f"{path}:{lineno}"))
    return records


def _record(line: str, where: str) -> Record:
    try:
        d = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object")
    unknown = sorted(set(d) - set(RECORD_KEYS))
    missing = [k for k in ("plan", "evidence", "model") if k not in d]
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}")
    return Record(plan=d["plan"], evidence=d["evidence"], context=d.get("context", {}),
                  model=d["model"])


def checkout_policies(folder: str, rev: str, dest: str) -> str:
    """Writes the policy files of folder as of git revision rev into dest (for replay --old-rev)."""
    # ls-tree run inside folder names its entries relative to folder; subfolders (tests/) are skipped.
    listing = _git(folder, "ls-tree", "--name-only", rev, "--", ".")
    names = [n for n in listing.splitlines() if "/" not in n and n.endswith((".yaml", ".yml"))]
    if not names:
        raise ValueError(f"no policy files in {folder} at git revision {rev}")
    os.makedirs(dest, exist_ok=True)
    for name in names:
        with open(os.path.join(dest, name), "w", encoding="utf-8") as f:
            f.write(_git(folder, "show", f"{rev}:./{name}"))
    return dest


def _git(folder: str, *args: str) -> str:
    out = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ValueError(f"git {' '.join(args)} in {folder}: {out.stderr.strip()}")
    return out.stdout


def record_from(plan: Mapping[str, Any], evidence: Mapping[str, Any], context: Mapping[str, Any],
                model: Mapping[str, Any], now_s: Optional[float] = None) -> Record:
    """A record as the control plane would store it; now_s pins the instant it was decided."""
    ctx = dict(context)
    if now_s is not None:
        ctx["now_s"] = now_s
    return Record(plan=plan, evidence=evidence, context=ctx, model=model)
