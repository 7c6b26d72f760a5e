import hashlib
import shutil
import subprocess

import pytest

from headroom_sidecar.controlplane.policy import PolicyError, PolicyStore, evaluate, load_policy_set
from headroom_sidecar.controlplane.policy.plan import TransformKind
from headroom_sidecar.controlplane.policy.revision import content_sha256
from tests.controlplane.policy.conftest import SHIPPED_POLICIES, inputs, policy_text

GOOD = "- {id: r, kind: metric_bound, metric: top1_agreement, min: 0.98}"

BAD_FILES = [
    # (id, file text, line, reason fragment)
    ("syntax-error", "schema: headroom.policy/v1\nrules:\n  - id: r\n    kind: [metric_bound\n", 5,
     "YAML syntax error"),
    ("unknown-field", policy_text("- id: r\n  kind: metric_bound\n  metric: ppl_ratio\n  max: 1.0\n"
                                  "  maxx: 2.0"), 7, "maxx: unknown field"),
    ("unknown-metric", policy_text("- id: r\n  kind: metric_bound\n  metric: top1\n  min: 0.9"), 5,
     "unknown metric 'top1'"),
    ("wrong-type", policy_text("- id: r\n  kind: removal_cap\n  unit: heads\n  max_fraction: lots"), 6,
     "max_fraction: expected a number, got a string 'lots'"),
    ("wrong-type-bool", policy_text("- {id: r, kind: metric_bound, metric: exact_match, min: 0.9,\n"
                                    "   required: 'no'}"), 4, "required: expected true or false"),
    ("unknown-kind", policy_text("- id: r\n  kind: maybe"), 4, "kind: expected one of metric_bound"),
    ("missing-field", policy_text("- id: r\n  kind: rate_limit\n  window_s: 60"), 3,
     "max_applies: required field is missing"),
    ("duplicate-key", policy_text("- id: r\n  kind: risk_approval\n  at_or_above: high\n"
                                  "  at_or_above: low"), 6, "at_or_above: duplicate key"),
    ("bad-enum-in-list", policy_text("- id: r\n  kind: transform_access\n  forbid: [skip_layers, fold]"),
     5, "forbid[1]: expected one of weight_precision"),
    ("min-above-max", policy_text("- {id: r, kind: metric_bound, metric: mean_kl, min: 0.5, max: 0.1}"),
     3, "min 0.5 is above max 0.1"),
    ("wrong-schema", "schema: headroom.policy/v2\nrules: []\n", 1, "expected 'headroom.policy/v1'"),
    ("top-level-unknown", "schema: headroom.policy/v1\nrule: []\n", 1, "rules: required field"),
    ("empty-file", "", 1, "empty file"),
]


@pytest.mark.parametrize("text,line,reason", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_policy_file_names_file_line_and_reason(tmp_path, text, line, reason):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy_set(str(tmp_path))
    problem = next(p for p in e.value.problems if reason in str(p))
    assert (problem.file, problem.line) == (str(tmp_path / "bad.yaml"), line), str(e.value)
    assert f"{tmp_path / 'bad.yaml'}:{line}:" in str(e.value)


PROTECT_HEAD = "- id: r\n  kind: protect\n  layers: [0]\n"  # rules[0] at line 3; transforms at 6


@pytest.mark.parametrize("transforms,expected", [
    ("", tuple(TransformKind)),    # absent: every kind, as before the field existed
    ("  transforms: [skip_layers, prune_heads]", (TransformKind.SKIP_LAYERS, TransformKind.PRUNE_HEADS)),
    ("  transforms:\n    - activation_sparsity\n    - activation_sparsity", (TransformKind.ACTIVATION_SPARSITY,)),
    ("  transforms: [weight_precision]", (TransformKind.WEIGHT_PRECISION,)),
], ids=["absent-means-all", "two-kinds", "duplicate-once", "one-kind"])
def test_protect_transforms_are_parsed(tmp_path, transforms, expected):
    (tmp_path / "p.yaml").write_text(policy_text(PROTECT_HEAD + transforms))
    (rule,) = load_policy_set(str(tmp_path)).rules
    assert rule.params.transforms == expected and rule.params.layers == (0,)


@pytest.mark.parametrize("transforms,line,field,reason", [
    ("  transforms: [skip_layers, int8]", 6, "rules[0].transforms[1]",
     "expected one of weight_precision, activation_sparsity, prune_heads, skip_layers, execution, "
     "got 'int8'"),
    ("  transforms:\n    - skip_layers\n    - prune_head", 8, "rules[0].transforms[1]",
     "got 'prune_head'"),
    ("  transforms: skip_layers", 6, "rules[0].transforms", "expected a list, got a string 'skip_layers'"),
    ("  transforms: [{kind: skip_layers}]", 6, "rules[0].transforms[0]", "expected one of"),
    ("  transform: [skip_layers]", 6, "rules[0].transform", "unknown field (known here:"),
], ids=["unknown-kind", "typo-on-its-own-line", "not-a-list", "mapping-item", "misspelt-field"])
def test_protect_bad_transforms_name_file_line_and_field(tmp_path, transforms, line, field, reason):
    (tmp_path / "bad.yaml").write_text(policy_text(PROTECT_HEAD + transforms))
    with pytest.raises(PolicyError) as e:
        load_policy_set(str(tmp_path))
    (problem,) = e.value.problems
    assert (problem.file, problem.line, problem.field) == (str(tmp_path / "bad.yaml"), line, field)
    assert reason in problem.reason
    assert f"{tmp_path / 'bad.yaml'}:{line}: error: {field}: " in str(e.value)


def test_every_problem_in_every_file_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text(policy_text(
        "- {id: a, kind: metric_bound, metric: nope, min: 1}\n"
        "- {id: b, kind: removal_cap, unit: rows, max_fraction: 2}\n"
        "- {id: c, kind: rate_limit, max_applies: 1.5, window_s: 60, extra: 1}"))
    (tmp_path / "b.yaml").write_text(policy_text(GOOD))
    (tmp_path / "c.yaml").write_text(policy_text(GOOD))  # same id r as b.yaml
    with pytest.raises(PolicyError) as e:
        load_policy_set(str(tmp_path))
    got = {(p.file.rsplit("/", 1)[1], p.line, p.field) for p in e.value.problems}
    assert got == {("a.yaml", 3, "rules[0].metric"), ("a.yaml", 4, "rules[1].unit"),
                   ("a.yaml", 4, "rules[1].max_fraction"), ("a.yaml", 5, "rules[2].max_applies"),
                   ("a.yaml", 5, "rules[2].extra"), ("c.yaml", 3, "id")}


def test_shipped_policies_load_with_every_rule_kind():
    from headroom_sidecar.controlplane.policy import RuleKind
    policy_set = load_policy_set(str(SHIPPED_POLICIES))
    assert {r.kind for r in policy_set.rules} == set(RuleKind)
    assert policy_set.files == ("determinism.yaml", "safety.yaml")


def test_content_hash_always_and_changes_with_content(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "a.yaml").write_text(policy_text(GOOD))
    rev = load_policy_set(str(folder)).revision
    data = (folder / "a.yaml").read_bytes()
    expected = hashlib.sha256(b"a.yaml\0" + str(len(data)).encode() + b"\0" + data).hexdigest()
    assert (rev.content_sha256, rev.git_commit, rev.git_dirty) == (expected, None, False)
    (folder / "a.yaml").write_text(policy_text(GOOD.replace("0.98", "0.99")))
    assert load_policy_set(str(folder)).revision.content_sha256 != expected
    assert content_sha256(str(folder), ["a.yaml"]) == load_policy_set(str(folder)).revision.content_sha256


def _git(cwd, *args) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_revision_has_git_commit_in_a_repo(tmp_path):
    shutil.copytree(SHIPPED_POLICIES, tmp_path / "policies")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "policies")
    first = _git(tmp_path, "rev-parse", "HEAD")
    rev = load_policy_set(str(tmp_path / "policies")).revision
    assert (rev.git_commit, rev.git_dirty) == (first, False)
    # A commit that touches only the test cases does not change the policy revision.
    (tmp_path / "policies" / "tests" / "extra.yaml").write_text("schema: x\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "tests only")
    assert load_policy_set(str(tmp_path / "policies")).revision == rev
    with open(tmp_path / "policies" / "safety.yaml", "a") as f:
        f.write("# edited\n")
    dirty = load_policy_set(str(tmp_path / "policies")).revision
    assert (dirty.git_commit, dirty.git_dirty) == (first, True)
    assert dirty.content_sha256 != rev.content_sha256


def test_store_keeps_last_good_set_after_a_bad_reload(tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "a.yaml").write_text(policy_text(GOOD))
    store = PolicyStore(str(folder))
    good = store.current.revision
    low = inputs(evidence={"top1_agreement": 0.97})
    assert store.evaluate(**low).outcome.value == "reject"

    (folder / "a.yaml").write_text(policy_text(GOOD.replace("top1_agreement", "top1")))
    result = store.reload()
    assert (result.ok, result.changed, result.revision) == (False, False, good)
    assert "unknown metric 'top1'" in str(result.problems[0]) and store.last_problems
    assert store.current.revision == good
    assert store.evaluate(**low).outcome.value == "reject"  # the old rule still decides

    (folder / "a.yaml").write_text(policy_text(GOOD.replace("0.98", "0.95")))
    result = store.reload()
    assert (result.ok, result.changed, result.problems) == (True, True, ())
    assert store.evaluate(**low).outcome.value == "approve"
    assert store.reload().changed is False


def test_store_refuses_a_bad_first_load(tmp_path):
    (tmp_path / "a.yaml").write_text("rules: [")
    with pytest.raises(PolicyError, match="a.yaml:1"):
        PolicyStore(str(tmp_path))


def test_decision_names_the_revision_it_used(tmp_path):
    (tmp_path / "a.yaml").write_text(policy_text(GOOD))
    policy_set = load_policy_set(str(tmp_path))
    assert evaluate(policy_set, **inputs()).revision.content_sha256 == policy_set.revision.content_sha256
