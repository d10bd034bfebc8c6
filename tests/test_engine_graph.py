"""Graph validation and ordering."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from builder.engine import Graph, StageSpec
from builder.errors import UserError


def stage(id: str, **inputs: str) -> StageSpec:
    return StageSpec(id=id, stage="s", version="1", function="m:f", inputs=inputs)


def test_order_is_topological_and_stable():
    graph = Graph([stage("join", a="a", b="b"), stage("b"), stage("a"), stage("c", x="b")])
    assert [s.id for s in graph.order()] == ["b", "a", "join", "c"]


def test_duplicate_ids_unknown_inputs_and_cycles_are_user_errors():
    with pytest.raises(UserError, match="duplicate stage id 'a'"):
        Graph([stage("a"), stage("a")])
    with pytest.raises(UserError, match="input 'x' refers to unknown stage 'missing'"):
        Graph([stage("a", x="missing")]).order()
    with pytest.raises(UserError, match="cycle blocks these stages: a, b"):
        Graph([stage("a", x="b"), stage("b", x="a"), stage("c")]).order()
    with pytest.raises(UserError, match="unknown stage 'nope'"):
        Graph([stage("a")])["nope"]


def test_spec_rejects_an_input_name_used_twice_and_is_frozen(tmp_path):
    with pytest.raises(ValidationError, match="both as stage and external inputs: x"):
        StageSpec(id="a", stage="s", version="1", function="m:f", inputs={"x": "b"}, external_inputs={"x": tmp_path})
    with pytest.raises(ValidationError):
        stage("a").version = "2"
