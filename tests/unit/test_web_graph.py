"""The flow page's graph: what flow.dag.yaml declares, laid out in layers."""

from __future__ import annotations

from pathlib import Path

from flowsession.web import graph

FLOWS = Path(__file__).resolve().parents[1] / "flows"


def edges(g: graph.Graph) -> set[tuple[str, str, bool]]:
    return {(e.src, e.dst, e.dashed) for e in g.edges}


def test_conditional_nodes_have_dashed_edges_from_their_condition():
    g = graph.build((FLOWS / "conditional" / "flow.dag.yaml").read_text())
    assert not g.error
    names = {b.id for b in g.boxes}
    assert {"inputs", "outputs"} <= names
    dashed = {(s, d) for s, d, dash in edges(g) if dash}
    assert dashed and all(s == "inputs" or s in names for s, _ in dashed)
    activated = [b for b in g.boxes if b.activate]
    assert activated and all(b.activate.startswith("when ") for b in activated)


def test_the_aggregation_node_is_marked_and_below_what_it_reads():
    g = graph.build((FLOWS / "aggregate" / "flow.dag.yaml").read_text())
    boxes = {b.id: b for b in g.boxes}
    agg = [b for b in g.boxes if b.aggregation]
    assert len(agg) == 1
    for src, dst, _ in edges(g):
        assert boxes[src].y < boxes[dst].y  # every edge points down
    assert g.inputs["answer"]["type"] == "string"


def test_a_flex_flow_shows_its_entry():
    g = graph.build("entry: func:run\n", flex=True)
    entry = next(b for b in g.boxes if b.kind == "entry")
    assert entry.detail == "func:run"
    assert ("inputs", "entry", False) in edges(g) and ("entry", "outputs", False) in edges(g)


def test_bad_yaml_is_an_error_not_a_crash_and_a_cycle_still_draws():
    assert "not valid YAML" in graph.build("nodes: [").error
    cyc = graph.build("nodes:\n- {name: a, type: python, inputs: {x: '${b.output}'}}\n"
                      "- {name: b, type: python, inputs: {x: '${a.output}'}}\n")
    assert not cyc.error and {b.id for b in cyc.boxes} >= {"a", "b"}
