"""Unit: pipeline spec parsing and validation; every error names its field, YAML errors their line."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest

from verlyard_shared.spec import WITH_KEYS, PipelineSpec, RetryPolicy
from verlyard_shared.validation import (
    MAX_DEPTH,
    MAX_SPEC_BYTES,
    SpecError,
    SpecIssue,
    SpecTooLarge,
    find_cycle,
    parse_pipeline,
    validate_pipeline,
)

README_EXAMPLE = """\
name: sales-sft                 # required: [a-z0-9][a-z0-9-]{0,62}
labels: {team: nlp}             # optional
defaults:                       # optional; per-stage values override
  retry: {max_attempts: 3, backoff: exponential, initial_delay: 10s, max_delay: 10m,
          jitter: full, retry_on: [infra, preempted, hang, lost]}
  timeout: 24h
stages:
  prep:
    kind: preprocess
    with: {dataset: sales_sft, format: auto, val_fraction: 0.1}
  train:
    kind: train
    needs: [prep]
    resources: {gpus: 1, gpu_memory_gb: 24, labels: {}}
    with:
      algorithm: sft
      model: Qwen/Qwen2.5-0.5B
      epochs: 1
      batch_size: 2
      lr: 1.0e-5
      lora: {rank: 8, alpha: 16}
      save_every: 100
      overrides: {trainer.total_training_steps: 10}
  eval:
    kind: evaluate
    needs: [train]
  cleanup:
    kind: cleanup
    needs: [eval]
    when: always
    with: {keep_last: 2}
"""


def errors_of(text: str, content_type: str = "yaml") -> list[SpecIssue]:
    with pytest.raises(SpecError) as info:
        parse_pipeline(textwrap.dedent(text), content_type=content_type)  # type: ignore[arg-type]
    return info.value.errors


def one_error(text: str, content_type: str = "yaml") -> SpecIssue:
    errors = errors_of(text, content_type)
    assert len(errors) == 1, errors
    return errors[0]


def doc(**stages: Any) -> dict[str, Any]:
    return {"name": "p", "stages": stages}


def invalid(document: dict[str, Any]) -> list[SpecIssue]:
    with pytest.raises(SpecError) as info:
        validate_pipeline(document)
    return info.value.errors


# ---- the happy path -------------------------------------------------------------------------------------------


def test_interface_example_normalises_with_defaults_applied() -> None:
    spec = parse_pipeline(README_EXAMPLE, content_type="yaml")
    assert isinstance(spec, PipelineSpec)
    assert spec.name == "sales-sft" and spec.labels == {"team": "nlp"}
    assert list(spec.stages) == ["prep", "train", "eval", "cleanup"]
    train = spec.stages["train"]
    assert train.needs == ("prep",)
    assert train.retry == RetryPolicy(
        max_attempts=3,
        backoff="exponential",
        initial_delay_s=10.0,
        max_delay_s=600.0,
        jitter="full",
        retry_on=("infra", "preempted", "hang", "lost"),
    )
    assert train.timeout_s == 86_400.0
    assert (train.resources.gpus, train.resources.gpu_memory_gb) == (1, 24.0)
    assert train.params["lr"] == 1e-5 and train.params["algorithm"] == "sft"
    assert train.params["overrides"] == {"trainer.total_training_steps": 10}
    assert spec.stages["cleanup"].when == "always" and spec.stages["cleanup"].params == {"keep_last": 2}
    assert spec.stages["eval"].params == {}


def test_json_and_yaml_give_the_same_spec() -> None:
    import yaml

    as_json = json.dumps(yaml.safe_load(README_EXAMPLE))
    assert parse_pipeline(as_json, content_type="json") == parse_pipeline(README_EXAMPLE, content_type="yaml")
    assert parse_pipeline(as_json.encode(), content_type="json") == parse_pipeline(
        README_EXAMPLE.encode(), content_type="yaml"
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("10m", 600), ("24h", 86_400), ("1d", 86_400), ("1h30m", 5400), ("500ms", 0.5), (90, 90),
     ("2.5s", 2.5), ("1h 30m", 5400), ("45", 45)],
)  # fmt: skip
def test_durations(text: object, seconds: float) -> None:
    spec = validate_pipeline(doc(a={"kind": "noop", "timeout": text}))
    assert spec.stages["a"].timeout_s == seconds


def test_stage_values_override_defaults_key_by_key() -> None:
    spec = validate_pipeline(
        {
            "name": "p",
            "defaults": {
                "retry": {"max_attempts": 5, "jitter": "none"},
                "resources": {"gpus": 1, "labels": {"zone": "a", "gpu": "h100"}},
                "priority": 2,
                "timeout": "1h",
            },
            "stages": {
                "a": {"kind": "noop", "retry": {"max_attempts": 2}, "resources": {"labels": {"gpu": "a100"}}},
                "b": {"kind": "noop", "priority": -1, "timeout": "5m"},
            },
        }
    )
    a, b = spec.stages["a"], spec.stages["b"]
    assert (a.retry.max_attempts, a.retry.jitter) == (2, "none")
    assert a.resources.labels == {"zone": "a", "gpu": "a100"} and a.resources.gpus == 1
    assert (a.priority, a.timeout_s) == (2, 3600.0)
    assert (b.priority, b.timeout_s, b.retry.max_attempts) == (-1, 300.0, 5)


def test_needs_as_a_single_string_and_yaml_12_booleans() -> None:
    spec = parse_pipeline(
        "name: p\nstages:\n  on: {kind: noop}\n  yes: {kind: noop, needs: on}\n", content_type="yaml"
    )  # YAML 1.1 would read `on`/`yes` as booleans
    assert list(spec.stages) == ["on", "yes"] and spec.stages["yes"].needs == ("on",)


def test_unsatisfiable_resources_are_not_rejected() -> None:
    spec = validate_pipeline(doc(a={"kind": "noop", "resources": {"gpus": 512, "gpu_memory_gb": 1000}}))
    assert spec.stages["a"].resources.gpus == 512


def test_every_verl_estimator_is_a_valid_algorithm() -> None:
    for algorithm in ("sft", "grpo", "ppo", "rloo", "reinforce_plus_plus", "remax", "gae", "gdpo"):
        validate_pipeline(doc(t={"kind": "train", "with": {"model": "m", "algorithm": algorithm}}))


def test_unicode_is_fine_in_values_and_labels() -> None:
    spec = parse_pipeline(
        "name: p\nlabels: {owner: 'zoë'}\nstages:\n  a: {kind: command, with: {run: [echo, '日本語 ✓']}}\n",
        content_type="yaml",
    )
    assert spec.stages["a"].params["run"] == ["echo", "日本語 ✓"] and spec.labels == {"owner": "zoë"}


# ---- errors name the stage and field, YAML errors their line --------------------------------------------------


CASES: list[tuple[str, str, str, int]] = [
    # (stage yaml under `stages:`, expected path, message fragment, expected line)
    ("a: {kind: trian}", "stages.a.kind", "did you mean 'train'", 3),
    ("a: {kind: noop, needs: [zz]}", "stages.a.needs[0]", "unknown stage 'zz'", 3),
    ("a: {kind: noop, needs: [a]}", "stages.a.needs[0]", "stage 'a' needs itself", 3),
    ("a: {kind: noop, when: sometimes}", "stages.a.when", "on_success, on_failure, always", 3),
    ("a: {kind: noop, timeout: 10 minutes}", "stages.a.timeout", "is not a duration", 3),
    ("a: {kind: noop, timeout: 0}", "stages.a.timeout", "greater than 0", 3),
    ("a: {kind: noop, timeout: -5s}", "stages.a.timeout", "is not a duration", 3),
    ("a: {kind: noop, retry: {max_attempts: 0}}", "stages.a.retry.max_attempts", "between 1 and 100", 3),
    ("a: {kind: noop, retry: {max_attempts: 101}}", "stages.a.retry.max_attempts", "between 1 and 100", 3),
    ("a: {kind: noop, retry: {backoff: linear}}", "stages.a.retry.backoff", "fixed, exponential", 3),
    ("a: {kind: noop, retry: {jitter: half}}", "stages.a.retry.jitter", "none, full", 3),
    ("a: {kind: noop, retry: {retry_on: [infra, boom]}}", "stages.a.retry.retry_on[1]", "'boom' is not valid", 3),
    ("a: {kind: noop, retry: {initial_delay: 1h, max_delay: 1m}}", "stages.a.retry.initial_delay", "exceed", 3),
    ("a: {kind: noop, retry: {max_attempts: 2, tries: 3}}", "stages.a.retry.tries", "unknown key", 3),
    ("a: {kind: noop, resources: {gpus: -1}}", "stages.a.resources.gpus", "between 0 and", 3),
    ("a: {kind: noop, resources: {gpus: 1.5}}", "stages.a.resources.gpus", "must be an integer", 3),
    ("a: {kind: noop, resources: {gpus: true}}", "stages.a.resources.gpus", "not a boolean", 3),
    ("a: {kind: noop, resources: {gpu_memory_gb: -4}}", "stages.a.resources.gpu_memory_gb", ">= 0", 3),
    ("a: {kind: noop, resources: {cpu_slots: 0}}", "stages.a.resources.cpu_slots", "between 1 and", 3),
    ("a: {kind: noop, resources: {labels: [x]}}", "stages.a.resources.labels", "must be a mapping", 3),
    ("a: {kind: noop, resources: {labels: {'bad key': x}}}", 'stages.a.resources.labels["bad key"]', "label key", 3),
    ("a: {kind: noop, priority: high}", "stages.a.priority", "must be an integer", 3),
    ("a: {kind: noop, wiht: {}}", "stages.a.wiht", "did you mean 'with'", 3),
    ("a: {kind: noop, with: [1]}", "stages.a.with", "must be a mapping", 3),
    ("a: {kind: noop, with: {sleep_ms: -1}}", "stages.a.with.sleep_ms", "between 0 and", 3),
    ("a: {kind: noop, with: {sleep_ms: fast}}", "stages.a.with.sleep_ms", "must be an integer", 3),
    ("a: {kind: command}", "stages.a.with.run", "required", 3),
    ("a: {kind: command, with: {run: ls -l}}", "stages.a.with.run", "no shell", 3),
    ("a: {kind: command, with: {run: []}}", "stages.a.with.run", "non-empty list", 3),
    ("a: {kind: command, with: {run: [ls, 3]}}", "stages.a.with.run[1]", "must be strings", 3),
    ("a: {kind: train, with: {model: m, algorithm: dpo}}", "stages.a.with.algorithm", "'dpo' is not valid", 3),
    ("a: {kind: train, with: {algorithm: sft}}", "stages.a.with.model", "required", 3),
    ("a: {kind: train, with: {model: m, lr: -1}}", "stages.a.with.lr", "> 0", 3),
    ("a: {kind: train, with: {model: m, epochs: 0}}", "stages.a.with.epochs", ">= 1", 3),
    ("a: {kind: train, with: {model: m, lora: {rank: 0}}}", "stages.a.with.lora.rank", ">= 1", 3),
    ("a: {kind: train, with: {model: m, overrides: {'a b': 1}}}", 'stages.a.with.overrides["a b"]', "override", 3),
    ("a: {kind: preprocess}", "stages.a.with.dataset", "required", 3),
    ("a: {kind: preprocess, with: {dataset: ''}}", "stages.a.with.dataset", "must not be empty", 3),
    ("a: {kind: preprocess, with: {dataset: d, val_fraction: 2}}", "stages.a.with.val_fraction", "<= 0.99", 3),
    ("a: {kind: cleanup, with: {keep_last: -1}}", "stages.a.with.keep_last", ">= 0", 3),
    ("a: {kind: cleanup, with: {keep_last: 1.5}}", "stages.a.with.keep_last", "must be an integer", 3),
    (
        "a: {kind: train, with: {model: m, reward_fn: {path: /r.py}}}",
        "stages.a.with.reward_fn",
        "'reward_function'?",
        3,
    ),
    ("a: {kind: noop, with: {sleep: 5}}", "stages.a.with.sleep", "unknown key `with.sleep` for a noop stage", 3),
    ("a: {kind: export, with: {dataset: d}}", "stages.a.with.dataset", "known keys: checkpoint, watchdog", 3),
    ("a: {kind: preprocess, with: {dataset: d, tokenizer: ./tok}}", "stages.a.with.tokenizer", "absolute path", 3),
    ("a: {kind: preprocess, with: {dataset: d, tokenizer: ../tok}}", "stages.a.with.tokenizer", "absolute path", 3),
    ("a: {kind: preprocess, with: {dataset: d, tokenizer: Qwen/Qwen2.5}}", "stages.a.with.tokenizer", "hub ids", 3),
    ("a: {kind: preprocess, with: {dataset: d, tokenizer: /m/../etc}}", "stages.a.with.tokenizer", "`..`", 3),
    ("a: {kind: preprocess, with: {dataset: d, tokenizer: 7}}", "stages.a.with.tokenizer", "must be a string", 3),
    ("a: {needs: []}", "stages.a.kind", "required", 3),
    ("a:", "stages.a", "is empty", 3),
    ("a: [noop]", "stages.a", "must be a mapping", 3),
    ("Bad.Stage: {kind: noop}", 'stages["Bad.Stage"]', "not a valid stage name", 3),
    ("a b: {kind: noop}", 'stages["a b"]', "not a valid stage name", 3),
    ("_a: {kind: noop}", "stages._a", "not a valid stage name", 3),
    (f"{'a' * 64}: {{kind: noop}}", f"stages.{'a' * 64}", "not a valid stage name", 3),
]


@pytest.mark.parametrize(("stage", "path", "fragment", "line"), CASES, ids=[c[1] + ":" + c[2] for c in CASES])
def test_error_names_the_stage_field_and_line(stage: str, path: str, fragment: str, line: int) -> None:
    issue = one_error(f"name: p\nstages:\n  {stage}\n")
    assert issue.path == path
    assert fragment in issue.message
    assert issue.line == line


def test_an_unknown_with_key_names_the_stage_the_field_and_the_nearest_known_key() -> None:
    issue = one_error("name: p\nstages:\n  train: {kind: train, with: {model: m, reward_fn: {path: /r.py}}}\n")
    assert issue.path == "stages.train.with.reward_fn"
    assert issue.message.startswith("stage 'train': unknown key `with.reward_fn` for a train stage")
    assert issue.message.endswith("did you mean 'reward_function'?")


def test_every_kind_takes_exactly_its_known_with_keys() -> None:
    for kind, keys in WITH_KEYS.items():
        assert "watchdog" in keys, kind
        errors = errors_of(f"name: p\nstages:\n  a: {{kind: {kind}, with: {{not_a_key: 1}}}}\n")
        assert "stages.a.with.not_a_key" in [e.path for e in errors], kind


def test_with_keys_starting_x_dash_are_the_users_own_and_pass() -> None:
    spec = validate_pipeline(doc(a={"kind": "noop", "with": {"x-soak-poison": True, "x-owner": "me"}}))
    assert spec.stages["a"].params == {"x-soak-poison": True, "x-owner": "me"}


def test_a_tokenizer_folder_on_the_host_passes() -> None:
    for tokenizer in ("/models/Qwen2.5-0.5B-Instruct", None):
        with_ = {"dataset": "d", "tokenizer": tokenizer}
        assert validate_pipeline(doc(a={"kind": "preprocess", "with": with_})).stages["a"].params == with_


def test_lines_point_at_the_offending_field_in_block_yaml() -> None:
    errors = errors_of(
        """\
        name: p
        stages:
          prep:
            kind: preprocess
            with:
              dataset: d
          train:
            kind: train
            needs: [prep]
            retry:
              max_attempts: 0
            with:
              model: m
              lr: fast
        """
    )
    assert [(e.path, e.line) for e in errors] == [
        ("stages.train.retry.max_attempts", 11),
        ("stages.train.with.lr", 14),
    ]


@pytest.mark.parametrize(
    ("top", "path", "fragment"),
    [
        ("stages: {a: {kind: noop}}", "name", "required"),
        ("name: Sales SFT\nstages: {a: {kind: noop}}", "name", "not a valid pipeline name"),
        ("name: -x\nstages: {a: {kind: noop}}", "name", "not a valid pipeline name"),
        (f"name: {'x' * 64}\nstages: {{a: {{kind: noop}}}}", "name", "not a valid pipeline name"),
        ("name: 12\nstages: {a: {kind: noop}}", "name", "must be a string"),
        ("name: p", "stages", "required"),
        ("name: p\nstages: {}", "stages", "at least one stage"),
        ("name: p\nstages: [a]", "stages", "must be a mapping"),
        ("name: p\nstges: {}\nstages: {a: {kind: noop}}", "stges", "did you mean 'stages'"),
        ("name: p\nlabels: [x]\nstages: {a: {kind: noop}}", "labels", "must be a mapping"),
        ("name: p\nlabels: {a: [1]}\nstages: {a: {kind: noop}}", "labels.a", "must be strings"),
        ("name: p\ndefaults: {retry: {max_attempts: 0}}\nstages: {a: {kind: noop}}", "defaults.retry.max_attempts", ""),
        ("name: p\ndefaults: {timeout: soon}\nstages: {a: {kind: noop}}", "defaults.timeout", "not a duration"),
        ("name: p\ndefaults: {when: always}\nstages: {a: {kind: noop}}", "defaults.when", "unknown key"),
        ("name: p\npriority: 1.5\nstages: {a: {kind: noop}}", "priority", "must be an integer"),
    ],
)
def test_top_level_errors(top: str, path: str, fragment: str) -> None:
    issue = one_error(top + "\n")
    assert issue.path == path and fragment in issue.message
    assert issue.line is not None


def test_cycles_are_named() -> None:
    errors = errors_of(
        """\
        name: p
        stages:
          a: {kind: noop, needs: [c]}
          b: {kind: noop, needs: [a]}
          c: {kind: noop, needs: [b]}
          d: {kind: noop, needs: [e]}
          e: {kind: noop, needs: [d]}
          f: {kind: noop, needs: [a]}
        """
    )
    assert [(e.path, e.message, e.line) for e in errors] == [
        ("stages.a.needs", "dependency cycle: a -> c -> b -> a (a needs c, c needs b, b needs a)", 3),
        ("stages.d.needs", "dependency cycle: d -> e -> d (d needs e, e needs d)", 6),
    ]
    assert find_cycle({"a": ["b"], "b": []}) is None


def test_all_errors_are_reported_at_once() -> None:
    errors = invalid(
        {
            "name": "P",
            "stages": {"a": {"kind": "x"}, "b": {"kind": "noop", "needs": ["nope"]}, "c": {"kind": "train"}},
        }
    )
    assert [e.path for e in errors] == ["name", "stages.a.kind", "stages.c.with.model", "stages.b.needs[0]"]
    assert all(e.line is None for e in errors)  # no YAML source, no lines
    assert "stages.a.kind" in str(SpecError(errors))


def test_unknown_needs_is_reported_even_when_the_stage_has_other_errors() -> None:
    errors = invalid(doc(a={"kind": "noop", "when": "x", "needs": ["ghost"]}))
    assert [e.path for e in errors] == ["stages.a.when", "stages.a.needs[0]"]


# ---- duplicates and hostile input -----------------------------------------------------------------------------


def test_duplicate_stage_names_in_yaml_are_caught_with_both_lines() -> None:
    issue = one_error(
        """\
        name: p
        stages:
          train: {kind: noop}
          eval: {kind: noop}
          train: {kind: evaluate}
        """
    )
    assert issue.path == "stages.train" and issue.line == 5
    assert "first defined on line 3" in issue.message


def test_duplicate_keys_in_json_are_caught() -> None:
    issue = one_error('{"name": "p", "stages": {"a": {"kind": "noop"}, "a": {"kind": "train"}}}', "json")
    assert issue.path == "stages.a" and "duplicate" in issue.message


def test_alias_bomb_is_refused_quickly() -> None:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 10) + "]")
    issue = one_error("\n".join(lines) + "\n")
    assert "expands to" in issue.message and "limit" in issue.message


def test_recursive_alias_is_refused() -> None:
    assert "cycle" in one_error("name: &n [*n]\n").message


def test_small_aliases_and_merge_keys_are_allowed() -> None:
    spec = parse_pipeline(
        textwrap.dedent(
            """\
            name: p
            stages:
              a: &base {kind: noop, with: {sleep_ms: 5}}
              b:
                <<: *base
                needs: [a]
            """
        ),
        content_type="yaml",
    )
    assert spec.stages["b"].needs == ("a",) and spec.stages["b"].params == {"sleep_ms": 5}


@pytest.mark.parametrize("content_type", ["yaml", "json"])
def test_deep_nesting_is_refused_without_recursion_errors(content_type: str) -> None:
    text = "[" * 100_000 + "]" * 100_000
    issue = one_error(text, content_type)
    assert f"nested deeper than {MAX_DEPTH}" in issue.message


def test_block_nesting_just_past_the_limit_is_refused_with_its_line() -> None:
    text = "name: p\nstages:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(MAX_DEPTH + 5)) + "  " * 40 + "x\n"
    issue = one_error(text)
    assert issue.message == f"nested deeper than {MAX_DEPTH} levels"
    assert issue.line == MAX_DEPTH + 2


def test_moderate_nesting_inside_with_is_refused_past_the_limit() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH):
        deep = {"x": deep}
    issue = invalid(doc(a={"kind": "noop", "with": deep}))[0]
    assert issue.path.startswith("stages.a.with.x") and "nested deeper" in issue.message


@pytest.mark.parametrize("content_type", ["yaml", "json"])
def test_huge_documents_are_refused_before_parsing(content_type: str) -> None:
    with pytest.raises(SpecTooLarge) as info:
        parse_pipeline(b" " * (MAX_SPEC_BYTES + 1), content_type=content_type)  # type: ignore[arg-type]
    assert "1 MiB" in info.value.errors[0].message
    with pytest.raises(SpecTooLarge):
        parse_pipeline("é" * (MAX_SPEC_BYTES // 2 + 1), content_type=content_type)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: p\nstages:\n  ? [a, b]\n  : {kind: noop}\n", "plain strings"),
        ("name: p\nstages: {1: {kind: noop}}\n", "keys must be strings"),
        ("name: p\nstages: {a: {kind: noop, with: {when: 2024-01-01, blob: !!binary aGk=}}}\n", "bytes"),
        ("name: p\nstages: {a: {kind: noop, with: {x: !!set {a}}}}\n", "set"),
        ("name: p\nstages: {a: {kind: noop, with: {x: .inf}}}\n", "finite"),
        ("name: p\nstages: {a: {kind: noop, with: {x: !!python/object:os.system {}}}}\n", "invalid YAML"),
        ('name: p\nstages: {a: {kind: noop, with: {x: "nul\\0here"}}}\n', "NUL"),
        ("name: p\nstages: {a: {kind: noop}\n", "invalid YAML"),
        ("name: p\n---\nname: q\n", "invalid YAML"),
        ("", "empty"),
        ("- just\n- a list\n", "must be a mapping"),
        ("name: p\n\tstages: x\n", "invalid YAML"),
    ],
)
def test_hostile_or_broken_yaml(text: str, fragment: str) -> None:
    errors = errors_of(text)
    assert any(fragment in e.message for e in errors), errors


def test_yaml_syntax_errors_carry_the_line() -> None:
    issue = one_error("name: p\nstages:\n  a: {kind: noop\n  b: {kind: noop}\n")
    assert issue.line is not None and issue.line >= 3


def test_json_errors_carry_the_line() -> None:
    issue = one_error('{\n  "name": "p",\n  "stages": {,}\n}', "json")
    assert issue.line == 3 and issue.message.startswith("invalid JSON")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"name": "p", "stages": {"a": {"kind": "noop", "with": {"x": NaN}}}}', "finite"),
        (b"\xff\xfe\xfa", "UTF-8"),
        ('{"name": "p", "stages": {"a": {"kind": "noop", "with": {"x": "\\ud800"}}}}', "surrogate"),
        ('{"name": "p", "stages": {"a": {"kind": "noop", "with": {"x": "a\\u0000b"}}}}', "NUL"),
        ('{"name": "p", "stages": {"a": {"kind": "noop", "priority": ' + "9" * 5000 + "}}}", "invalid JSON"),
    ],
)
def test_hostile_json(raw: bytes | str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_pipeline(raw, content_type="json")
    assert any(fragment in e.message for e in info.value.errors), info.value.errors


def test_validate_pipeline_rejects_non_mappings_and_non_string_keys() -> None:
    assert invalid([])[0].message == "must be a mapping, not a list"  # type: ignore[arg-type]
    assert invalid(None)[0].message == "the document is empty"  # type: ignore[arg-type]
    assert "keys must be strings" in invalid({"name": "p", "stages": {1: {"kind": "noop"}}})[0].message


def test_unknown_content_type_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="content_type"):
        parse_pipeline("{}", content_type="toml")  # type: ignore[arg-type]
