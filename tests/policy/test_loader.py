"""Rollout files: valid documents load; each kind of mistake is named by file, line and field."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rollguard.policy.errors import PolicyInvalid
from rollguard.policy.loader import (
    MAX_DEPTH,
    MAX_NODES,
    check_files,
    find_line,
    load_rollout,
    parse_rollout,
)
from rollguard.policy.schema import json_schema

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*REPO.glob("config/policies/*.yaml"), *REPO.glob("config/examples/*.yaml")])

VALID = """\
apiVersion: rollguard/v1
kind: Rollout
metadata: {name: fraud}
spec:
  model: fraud
  stable: "1.0.0"
  candidate: "1.1.0"
  strategy: canary
  key: header:x-user-id
  steps:
    - {weight: 5, hold: 2s, min_requests: 50}
    - {weight: 100}
  checks:
    - {metric: error_rate, max: 0.01}
    - metric: latency_p99
      max_ratio_to_stable: 1.5
"""


def _error(text: str) -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as info:
        parse_rollout(text, "fraud.yaml")
    return info.value


def test_valid_document_parses() -> None:
    rollout = parse_rollout(VALID, "fraud.yaml")
    assert rollout.name == "fraud"
    assert rollout.spec.steps[0].hold == 2.0
    assert rollout.spec.checks[1].percentile == 99.0


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # a scalar: the line of its key, and the value in the reason
        ("strategy: canary", "strategy: canery", "fraud.yaml:8: spec.strategy: Input should be"),
        # nested in a list item
        ("hold: 2s,", "hold: 2 fortnights,", "fraud.yaml:11: spec.steps.0.hold: '2 fortnights'"),
        # an unknown key, with a suggestion
        ("max_ratio_to_stable", "max_ratio_to_stabel", "fraud.yaml:16: spec.checks.1.max_ratio_"),
        # a rule over the whole check points at the list item
        ("metric: latency_p99", "metric: latency_q99", "fraud.yaml:15: spec.checks.1: unknown"),
        # a rule over the whole spec points at `spec:`
        ('candidate: "1.1.0"', 'candidate: "1.0.0"', "fraud.yaml:4: spec: stable and candidate"),
        # a missing field is named; the line is its parent's
        ("  model: fraud\n", "", "fraud.yaml:4: spec.model: required field is missing"),
    ],
)
def test_errors_name_file_line_and_field(old: str, new: str, expected: str) -> None:
    assert old in VALID
    error = _error(VALID.replace(old, new, 1))
    assert str(error).startswith(expected), str(error)
    assert error.file == "fraud.yaml"
    assert error.line == int(expected.split(":")[1])


def test_unknown_field_suggests_the_close_one() -> None:
    error = _error(VALID.replace("max_ratio_to_stable", "max_ratio_to_stabel"))
    assert "did you mean 'max_ratio_to_stable'?" in str(error)


def test_a_key_that_is_no_field_name_is_described_not_quoted() -> None:
    """A policy file symlinked to /etc/shadow had each line echoed as an unknown field,
    into the log and /admin/rollouts (found by an adversarial probe)."""
    shadow = "root:$6$salt$0123456789abcdef:19000:0:99999:7:::\ndaemon:*:19000::::::\n"
    error = str(_error(shadow))
    assert "$6$" not in error and "daemon" not in error and "19000" not in error, error
    assert "fraud.yaml:1: <a key of 47 characters>: unknown field: a key of 47" in error
    typo = str(_error(VALID.replace("max_ratio_to_stable", "max_ratio_to_stabel")))
    assert "unknown field 'max_ratio_to_stabel'" in typo  # a plausible name is still named
    # Found in review: a whole-file scalar (a token) and a known field's long value.
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYSJ9.c2lnbmF0dXJl"
    assert token not in str(_error(token + "\n"))
    assert "got a text of 47 characters" in str(_error(f"apiVersion: sk-{'0' * 44}\n"))
    assert "got 'canery'" in str(_error(VALID.replace("strategy: canary", "strategy: canery")))


def test_a_duration_of_hundreds_of_digits_is_an_error_not_a_crash() -> None:
    """Found in review: float() raised OverflowError; `policy check` died."""
    error = str(_error(VALID.replace("hold: 2s,", f"hold: {'9' * 400},")))
    assert "spec.steps.0.hold: that duration is not a finite number of seconds" in error


def test_unquoted_version_number_gets_a_quoting_hint() -> None:
    error = _error(VALID.replace('stable: "1.0.0"', "stable: 1.10"))
    assert str(error) == (
        'fraud.yaml:6: spec.stable: expected a string, got the number 1.10; quote it: "1.10"'
    )


def test_several_problems_one_line_each_earliest_first() -> None:
    text = VALID.replace("strategy: canary", "strategy: nope").replace("weight: 100", "weight: 101")
    lines = str(_error(text)).splitlines()
    assert [line.split(":")[1] for line in lines] == ["8", "12"]
    assert lines[1].startswith("fraud.yaml:12: spec.steps.1.weight:")


def test_yaml_syntax_error_uses_yamls_mark() -> None:
    error = _error(VALID.replace("    - {weight: 100}", "    - {weight: 100"))
    assert str(error).startswith("fraud.yaml:13: YAML: ")
    assert error.line == 13


def test_second_document_is_an_error_at_its_line() -> None:
    error = _error(VALID + "---\n" + VALID)
    assert str(error) == (
        "fraud.yaml:17: YAML: a second YAML document; a file holds exactly one Rollout"
    )


def test_duplicate_key_is_an_error_not_silently_the_last() -> None:
    error = _error(VALID + "  interval: 5s\n  interval: 1s\n")
    assert str(error) == "fraud.yaml:18: spec.interval: duplicate key 'interval'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "fraud.yaml:1: (document): empty; expected a Rollout"),
        ("- a\n- b\n", "fraud.yaml:1: (document): expected a mapping, got a list"),
        (
            "apiVersion: rollguard/v1\nkind: Rollout\nmetadata: {name: x}\nspec:\n",
            "fraud.yaml:4: spec: expected a mapping, got nothing",
        ),
    ],
)
def test_documents_of_the_wrong_shape(text: str, expected: str) -> None:
    assert str(_error(text)) == expected


def test_load_rollout_reads_files_and_reports_unreadable_ones(tmp_path: Path) -> None:
    good = tmp_path / "fraud.yaml"
    good.write_text(VALID)
    assert load_rollout(good).spec.candidate == "1.1.0"
    binary = tmp_path / "bad.yaml"
    binary.write_bytes(VALID.encode() + b"# \xff\xfe\n")
    with pytest.raises(PolicyInvalid, match=r"bad\.yaml:17: \(document\): not UTF-8"):
        load_rollout(binary)
    with pytest.raises(PolicyInvalid, match="cannot read"):
        load_rollout(tmp_path / "missing.yaml")


def test_check_files_reports_each_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(VALID)
    bad.write_text(VALID.replace("kind: Rollout", "kind: Deployment"))
    results = check_files([good, bad])
    assert results[0] == (str(good), None)
    assert results[1][0] == str(bad)
    assert results[1][1] is not None and results[1][1].startswith(f"{bad}:2: kind: ")


# The billion laughs in YAML: a document built from it holds 9^9 strings. Padded with a
# comment to the 555 bytes that froze the gateway for 36 s.
_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)
ALIAS_BOMB = _LAUGHS + "#" + "." * (555 - len(_LAUGHS) - 2) + "\n"


def test_alias_bomb_is_refused_at_once() -> None:
    assert len(ALIAS_BOMB) == 555
    started = time.monotonic()
    error = _error(ALIAS_BOMB)
    assert time.monotonic() - started < 1.0
    assert str(error) == (
        "fraud.yaml:1: YAML: an anchor (&name): anchors and aliases are not allowed in policies"
    )


def test_an_alias_alone_is_refused_too() -> None:
    text = VALID.replace("spec:\n", "spec: &s\n") + "copy: *s\n"
    assert "anchors and aliases are not allowed" in str(_error(text))
    # Merge keys need aliases, so they go with them.
    merged = "base: {x: 1}\nother:\n  <<: *base\n"
    assert "an alias (*name)" in str(_error(merged))


@pytest.mark.parametrize(
    "text",
    [
        "spec: " + "[" * 200_000 + "]" * 200_000,
        "spec: " + "{a: " * 5_000 + "1" + "}" * 5_000,
        "spec:\n" + "".join(" " * i + "a:\n" for i in range(1, 2_000)),
    ],
    ids=["flow-lists", "flow-maps", "block-maps"],
)
def test_deep_nesting_is_this_files_error_not_a_recursion_error(text: str) -> None:
    started = time.monotonic()
    error = _error(text)
    assert time.monotonic() - started < 1.0
    assert f"nested deeper than {MAX_DEPTH} levels" in str(error)


def test_a_huge_flat_document_is_cut_short() -> None:
    started = time.monotonic()
    error = _error("[" + "1, " * 200_000 + "1]")
    assert time.monotonic() - started < 1.0
    assert f"more than {MAX_NODES} values" in str(error)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # A policy ticking every microsecond held a core; the other models' p99 went
        # from 5.9 to 174 ms (found by an adversarial probe).
        ("  checks:", "  interval: 1ms\n  checks:", "fraud.yaml:13: spec.interval: Input should"),
        ("  checks:", "  interval: 0.000001\n  checks:", "fraud.yaml:13: spec.interval: Input"),
        # Nothing coerced (found by an adversarial probe: `weight: yes` was a 1 % step).
        ("weight: 5,", "weight: yes,", "fraud.yaml:11: spec.steps.0.weight: Input should be"),
        ("  checks:", '  require_approval: "yes"\n  checks:', "fraud.yaml:13: spec.require_"),
        ("max: 0.01}", "max: 0.01, min_samples: true}", "fraud.yaml:14: spec.checks.0.min_"),
        # The name is a state file's name: 245 characters stopped the next start.
        ("{name: fraud}", "{name: %s}" % ("f" * 101), "fraud.yaml:3: metadata.name: String should"),
    ],
)
def test_values_that_would_mislead_or_hurt_the_gateway_are_refused(
    old: str, new: str, expected: str
) -> None:
    assert old in VALID
    assert str(_error(VALID.replace(old, new, 1))).startswith(expected)
    assert parse_rollout(VALID.replace("{name: fraud}", "{name: %s}" % ("f" * 100)), "f.yaml")
    assert parse_rollout(VALID.replace("  checks:", "  interval: 100ms\n  checks:", 1), "f.yaml")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        # A NaN bound compares false with everything: a check that could never fail.
        ("max: 0.01}", "max: .nan}", "fraud.yaml:14: spec.checks.0.max: Input should be a finite"),
        ("max: 0.01}", "max: .inf}", "fraud.yaml:14: spec.checks.0.max: Input should be a finite"),
        ("max_ratio_to_stable: 1.5", "max_ratio_to_stable: .inf", "fraud.yaml:16: spec.checks.1."),
        ("weight: 5,", "weight: .nan,", "fraud.yaml:11: spec.steps.0.weight: Input should be a"),
        # A NaN hold was no hold at all, and took the step's default deadline with it.
        ("hold: 2s,", "hold: .nan,", "fraud.yaml:11: spec.steps.0.hold: nan is not a duration"),
        ("hold: 2s,", "hold: .inf,", "fraud.yaml:11: spec.steps.0.hold: inf is not a duration"),
        ("  checks:", "  interval: -.inf\n  checks:", "fraud.yaml:13: spec.interval: -inf is not"),
    ],
)
def test_no_number_is_nan_or_infinite(old: str, new: str, expected: str) -> None:
    assert old in VALID
    assert str(_error(VALID.replace(old, new, 1))).startswith(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("9" * 5_000, "fraud.yaml:1: YAML: Exceeds the limit"),  # int() refuses; not a crash
        ("!!python/object/apply:os.system [echo]", "fraud.yaml:6: YAML: could not determine"),
    ],
)
def test_values_the_yaml_library_refuses_are_this_files_error(value: str, expected: str) -> None:
    assert str(_error(VALID.replace('"1.0.0"', value))).startswith(expected)


HOOK = VALID + '  notify:\n    - {webhook: "%s", headers_from_env: {Authorization: HOOK_AUTH}}\n'


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        ("https://hooks.example.com/x", ("hooks.example.com",)),
        ("https://hooks.example.com:8443/x", ("hooks.example.com:8443",)),
        ("http://a.b.example.com/x", ("*.example.com",)),
        ("http://127.0.0.1:9000/hook", ("127.0.0.1:9000",)),
        ("http://[::1]:9000/hook", ("[::1]:9000",)),
    ],
)
def test_webhooks_to_allowed_hosts_load(url: str, hosts: tuple[str, ...]) -> None:
    rollout = parse_rollout(HOOK % url, "fraud.yaml", webhook_hosts=hosts)
    assert rollout.spec.notify[0].headers_from_env == {"Authorization": "HOOK_AUTH"}


@pytest.mark.parametrize(
    ("url", "hosts", "named"),
    [
        ("http://127.0.0.1:8081/admin/rollouts/fraud/promote", (), "'127.0.0.1' (port 8081)"),
        ("http://169.254.169.254/latest/meta-data", ("hooks.example.com",), "'169.254.169.254'"),
        ("https://hooks.example.com:8443/x", ("hooks.example.com:443",), "(port 8443)"),
        ("http://example.com/x", ("*.example.com",), "'example.com'"),
        ("http://127.1:9000/x", ("127.0.0.1",), "'127.1'"),  # spelled otherwise: not listed
    ],
)
def test_webhooks_elsewhere_are_refused_naming_host_and_setting(
    url: str, hosts: tuple[str, ...], named: str
) -> None:
    with pytest.raises(PolicyInvalid) as info:
        parse_rollout(HOOK % url, "fraud.yaml", webhook_hosts=hosts)
    message = str(info.value)
    assert message.startswith("fraud.yaml:18: spec.notify.0.webhook: host "), message
    assert named in message and "webhook_allowed_hosts" in message


@pytest.mark.parametrize(
    ("hook", "reason"),
    [
        ('{webhook: "http://user:pw@hooks.example.com/x"}', "must not carry credentials"),
        ('{webhook: "http://hooks.example.com/x", headers: {Authorization: x}}', "unknown field"),
        (
            '{webhook: "http://hooks.example.com/x", headers_from_env: {Authorization: "B 1"}}',
            "is not an environment variable name",
        ),
        (
            '{webhook: "http://hooks.example.com/x", headers_from_env: {Host: HOOK_HOST}}',
            "is set by rollguard",
        ),
    ],
)
def test_webhook_secrets_never_come_from_the_policy(hook: str, reason: str) -> None:
    text = VALID + f"  notify: [{hook}]\n"
    with pytest.raises(PolicyInvalid, match=reason):
        parse_rollout(text, "fraud.yaml", webhook_hosts=("hooks.example.com",))


def test_policy_check_uses_the_configured_allow_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rollguard.proxy.cli import main

    policy = tmp_path / "fraud.yaml"
    policy.write_text(HOOK % "https://hooks.example.com/rollouts")
    config = tmp_path / "rollguard.yaml"
    config.write_text("webhook_allowed_hosts: []\n")
    assert main(["policy", "check", "--config", str(config), str(policy)]) == 1
    err = capsys.readouterr().err
    assert "'hooks.example.com'" in err and "webhook_allowed_hosts" in err
    config.write_text("webhook_allowed_hosts: [hooks.example.com]\n")
    assert main(["policy", "check", "--config", str(config), str(policy)]) == 0


def test_find_line() -> None:
    assert find_line(VALID, "metadata.name") == 3
    assert find_line(VALID, "spec.checks.1.metric") == 15
    assert find_line(VALID, "spec.nothing") is None
    assert find_line("a: [", "a") is None


def test_shipped_schema_is_current() -> None:
    shipped = json.loads((REPO / "policy" / "rollout.schema.json").read_text())
    assert shipped == json.loads(json.dumps(json_schema()))


def test_shipped_policies_exist_and_validate() -> None:
    names = {p.name for p in SHIPPED}
    assert {"fraud-canary.yaml", "shadow.yaml", "ab.yaml", "blue-green.yaml"} <= names
    assert "approval.yaml" in names
    # approval.yaml notifies a local receiver: the operator lists it, as its comment says.
    hosts = ("127.0.0.1:9000",)
    assert check_files(SHIPPED, webhook_hosts=hosts) == [(str(p), None) for p in SHIPPED]


def _python_with_jsonschema() -> str | None:
    """The venv may lack jsonschema; a system interpreter that has it will do."""
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if (
            candidate
            and subprocess.run(
                [candidate, "-c", "import jsonschema"], capture_output=True, check=False
            ).returncode
            == 0
        ):
            return candidate
    return None


_VALIDATE = """
import json, sys, jsonschema
schema, documents = json.load(sys.stdin)
jsonschema.Draft202012Validator.check_schema(schema)
validator = jsonschema.Draft202012Validator(schema)
for name, document in documents.items():
    for error in validator.iter_errors(document):
        print(name, list(error.absolute_path), error.message)
"""


def test_shipped_policies_validate_against_the_json_schema() -> None:
    python = _python_with_jsonschema()
    if python is None:
        pytest.skip("no interpreter with jsonschema; the pydantic model validated them above")
    schema = json.loads((REPO / "policy" / "rollout.schema.json").read_text())
    documents = {p.name: yaml.safe_load(p.read_text()) for p in SHIPPED}
    # The schema must also accept what the model accepts in other spellings.
    documents["durations-as-numbers"] = yaml.safe_load(VALID.replace("hold: 2s", "hold: 2.5"))
    done = subprocess.run(
        [python, "-c", _VALIDATE],
        input=json.dumps([schema, documents]),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""


def test_json_schema_rejects_what_the_model_rejects_structurally() -> None:
    python = _python_with_jsonschema()
    if python is None:
        pytest.skip("no interpreter with jsonschema")
    schema = json.loads((REPO / "policy" / "rollout.schema.json").read_text())
    bad = yaml.safe_load(VALID.replace("hold: 2s", "hold: 2 fortnights").replace("canary", "x"))
    done = subprocess.run(
        [python, "-c", _VALIDATE],
        input=json.dumps([schema, {"bad": bad}]),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert "['spec', 'steps', 0, 'hold']" in done.stdout
    assert "['spec', 'strategy']" in done.stdout
