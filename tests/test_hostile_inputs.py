"""Hostile and broken recipes through `sdbuild plan`, in process: a fixed catalogue of the known
cases and property-based mutations of a valid recipe. Every one must end with exit 0 or 2, no
traceback, a located error with a fix for every 2, within a generous time bound, and read nothing
outside the workspace."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hostile import VALID, Case, catalogue, plan, write_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Far above what a bad recipe takes to refuse (milliseconds); a hang or an expansion blows past it.
BOUND_SECONDS = 10.0


@pytest.fixture(scope="module")
def hostile_workspace(tmp_path_factory) -> tuple[Path, list[Case]]:
    root = tmp_path_factory.mktemp("hostile")
    workspace = root / "ws"
    cases = catalogue(workspace, root / "outside")
    return workspace, cases


def test_every_catalogued_case_is_one_located_error(hostile_workspace):
    workspace, cases = hostile_workspace
    failures = []
    for case in cases:
        recipe = write_case(workspace, case)
        outcome = plan(workspace, recipe)
        problems = []
        if outcome.code != 2:
            problems.append(f"exit {outcome.code}")
        if outcome.traceback:
            problems.append("traceback")
        if not outcome.located(case.where or recipe, line=case.line):
            problems.append("not located")
        if case.needle not in " ".join(outcome.output.split()):
            problems.append(f"does not mention {case.needle!r}")
        if outcome.output.count("error:") > 21:
            problems.append(f"{outcome.output.count('error:')} error blocks")
        if outcome.seconds > BOUND_SECONDS:
            problems.append(f"took {outcome.seconds:.1f} s")
        if problems:
            failures.append(f"{case.name}: {', '.join(problems)}\n{outcome.output[:400]}")
    assert not failures, "\n\n".join(failures)
    assert len(cases) >= 35


def test_a_flood_of_unknown_keys_is_one_block_with_a_count(hostile_workspace):
    workspace, _ = hostile_workspace
    recipe = write_case(workspace, Case("flood", VALID + "".join(f"k{i}: 1\n" for i in range(1_500)), ""))
    outcome = plan(workspace, recipe)
    assert outcome.code == 2
    assert outcome.output.count("error:") == 1 and "1500 unknown fields" in outcome.output
    assert len(outcome.output.splitlines()) < 10


def test_the_valid_recipe_plans(hostile_workspace):
    workspace, _ = hostile_workspace
    outcome = plan(workspace, write_case(workspace, Case("valid", VALID, "")))
    assert outcome.code == 0, outcome.output


# --- property-based mutations of the valid recipe ---------------------------------------------

_LINES = VALID.splitlines()
_SCALARS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(
        [
            "true",
            "null",
            "~",
            "''",
            "1e999",
            ".nan",
            "-.inf",
            "0x10",
            "0o17",
            "2024-13-45",
            "9" * 5000,
            "*undefined",
            "&a [*a]",
            "!!binary AAAA",
            "!!python/name:os.system",
            "[" * 50,
            "{a: {b: {c: {d: {e: {f: {g: {h: {i: {j: {k: {l: {m: {n: {o: {p: {q: 1}}}}}}}}}}}}}}}}}",
            "../" * 30 + "etc",
            "/etc/passwd",
            "x" * 300,
            "SPLIT_EINSUM_V2",
            "[100000, 100000]",
            "[8, 4096]",
            "{preset: tiny-sdxl}",
            "{local: {path: ''}}",
            "{mode: mixed, recipe: ../../../x.yaml}",
        ]
    ),
    st.text(alphabet=string.printable, max_size=40),
)


@st.composite
def mutated_recipes(draw) -> str:
    """The valid recipe with a few lines replaced, values swapped, lines dropped, duplicated or added."""
    lines = list(_LINES)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        index = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        action = draw(st.sampled_from(["value", "drop", "duplicate", "insert", "indent", "truncate"]))
        line = lines[index]
        if action == "value" and ":" in line:
            key = line.split(":", 1)[0]
            lines[index] = f"{key}: {draw(_SCALARS)}"
        elif action == "drop" and len(lines) > 1:
            del lines[index]
        elif action == "duplicate":
            lines.insert(index, line)
        elif action == "insert":
            key = draw(st.sampled_from(["extends", "seed", "latent_size", "image_size", "chunk_unet", "zz", "<<"]))
            lines.insert(index, f"{'  ' * draw(st.integers(0, 3))}{key}: {draw(_SCALARS)}")
        elif action == "indent":
            lines[index] = "  " + line
        elif action == "truncate":
            lines[index] = line[: draw(st.integers(min_value=0, max_value=len(line)))]
    return "\n".join(lines) + "\n"


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=mutated_recipes())
def test_mutated_recipes_exit_0_or_2_with_a_located_error(hostile_workspace, text):
    workspace, _ = hostile_workspace
    recipe = "recipes/fuzz.yaml"
    (workspace / recipe).write_text(text)
    outcome = plan(workspace, recipe)
    assert not outcome.traceback, f"{outcome.code}\n{outcome.output}\n--- recipe:\n{text}"
    assert outcome.code in (0, 2), outcome.output
    if outcome.code == 2:
        assert outcome.located(recipe), f"{outcome.output}\n--- recipe:\n{text}"
    assert outcome.seconds < BOUND_SECONDS
    assert "secret" not in outcome.output


def test_a_size_the_machine_cannot_hold_is_refused_before_any_stage(hostile_workspace, monkeypatch):
    """tiny-sd at its largest size: ORIGINAL attention's scores alone take about 100 GB."""
    from builder.stages import preflight

    monkeypatch.setattr(preflight, "machine_memory_bytes", lambda: 16 << 30)
    workspace, _ = hostile_workspace
    recipe = write_case(workspace, Case("largest", VALID.replace("[16, 16]", "[192, 192]"), ""))
    outcome = plan(workspace, recipe)
    assert outcome.code == 2 and outcome.located(recipe), outcome.output
    message = " ".join(outcome.output.split())
    assert "latent_size" in message and "this machine has 16.0 GiB" in message and "--force" in message
    assert plan(workspace, recipe, "--force").code == 0
    smaller = write_case(workspace, Case("smaller", VALID.replace("[16, 16]", "[64, 64]"), ""))
    assert plan(workspace, smaller).code == 0
