"""Reverse-mode autodiff as a graph transform.

``grad(g, of)`` walks the forward nodes in reverse topological order and appends, for every
differentiable input of every node on a path to ``of``, one ``vjp`` node computing that input's
share of the gradient; nodes read by several consumers get an ``add_n`` node summing the shares
in a fixed order. Forward nodes are untouched, so the backward nodes are ordinary nodes that
levels, partitioners and executors handle like any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._util import gc_paused
from .errors import DistgraphError, GraphError, SpecError
from .graph import Graph
from .infer import inferred_dtype
from .ops import LEAF_OPS, VJP_NAME, get_op
from .spec import GraphSpec, NodeSpec, make_node


def _grad_mask(
    masks: dict[tuple[str, int], tuple[bool, ...]], op: str, n_inputs: int
) -> tuple[bool, ...]:
    """Which of an ``op`` node's ``n_inputs`` inputs take a gradient, looked up once per op and
    input count in ``masks`` rather than asked of the op for every input of every node."""
    mask = masks.get((op, n_inputs))
    if mask is None:
        spec = get_op(op)
        mask = masks[op, n_inputs] = tuple(spec.has_vjp(i) for i in range(n_inputs))
    return mask


def grad_name(node: str) -> str:
    """Name of the node holding the total gradient of ``node`` (when shares are summed)."""
    return f"grad:{node}"


@gc_paused
def grad(graph: Graph, of: str, wrt: Sequence[str] | None = None) -> Graph:
    """Return a copy of ``graph`` with backward nodes for d(``of``)/d(``wrt``) appended.

    ``wrt`` defaults to every floating-point input and param. A non-scalar ``of`` is seeded
    with ones (the gradient of its sum). The result's ``grads`` maps each name in ``wrt`` to the
    node holding its gradient.
    """
    if graph.grad_of is not None:
        raise GraphError(f"graph already holds the backward pass of {graph.grad_of!r}")
    if of not in graph:
        raise GraphError(f"cannot differentiate {of!r}: no such node")
    of = graph[of].name
    nodes = graph.node_map  # name -> record, in topological (insertion) order
    if np.dtype(nodes[of].dtype or "float64").kind != "f":
        raise GraphError(
            f"cannot differentiate {of!r}: its dtype {nodes[of].dtype} is not floating"
        )

    leaves = [n.name for n in nodes.values() if n.op in ("input", "param")]
    if wrt is None:
        wrt = [n for n in leaves if np.dtype(nodes[n].dtype or "float64").kind == "f"]
    else:
        for n in wrt:
            if n not in graph:
                raise GraphError(f"cannot take a gradient with respect to {n!r}: no such node")
        wrt = [graph[n].name for n in wrt]
        for n in wrt:
            if nodes[n].op not in ("input", "param"):
                raise GraphError(
                    f"can only take gradients with respect to inputs and params, not {n!r}"
                )
            if np.dtype(nodes[n].dtype or "float64").kind != "f":
                # A vjp would return a value of the wrong shape or meaning (e.g. for labels).
                raise GraphError(
                    f"cannot take a gradient with respect to {n!r}: its dtype "
                    f"{nodes[n].dtype} is not floating"
                )
    targets = set(wrt)
    backwards = list(nodes)[::-1]

    # Nodes that lie on a path from a target leaf to `of`.
    ancestors = {of}
    for name in backwards:
        if name in ancestors:
            ancestors.update(nodes[name].inputs)
    # Of those, the nodes a gradient flows through: target leaves and ops with a
    # differentiable input that needs one.
    needs: set[str] = set()
    masks: dict[tuple[str, int], tuple[bool, ...]] = {}
    for name, node in nodes.items():
        if name not in ancestors:
            continue
        if node.op in LEAF_OPS:
            if name in targets:
                needs.add(name)
            continue
        mask = _grad_mask(masks, node.op, len(node.inputs))
        if any(m and s in needs for m, s in zip(mask, node.inputs)):
            needs.add(name)

    added: dict[str, NodeSpec] = {}

    def add(name: str, op: str, inputs: list[str], attrs: dict, like: NodeSpec, origin: str) -> str:
        # Generated names hold ':', which user names cannot, so only a second grad() clashes.
        if name in nodes or name in added:
            raise GraphError(f"cannot add gradient node {name!r}: the name is taken")
        added[name] = make_node(name, op, inputs, attrs, like.shape, like.dtype, "backward", origin)
        return name

    shares: dict[str, list[str]] = {}
    grad_node: dict[str, str] = {}
    vjp_attrs: dict[tuple[str, int, int], dict] = {}
    for name in backwards:
        if name not in needs:
            continue
        node = nodes[name]
        mine = shares.get(name)
        if name == of:
            g = add(grad_name(of), "ones_like", [of], {}, node, of)
        elif mine and len(mine) == 1:
            g = mine[0]
        elif mine:
            g = add(grad_name(name), "add_n", mine, {}, node, name)
        else:
            continue
        grad_node[name] = g
        if node.op in LEAF_OPS:
            continue
        inputs = node.inputs
        op = get_op(node.op)
        head = [g, name] if op.uses_out else [g]
        # e.g. concat: each share is a slice of g, not a node reading all N inputs (O(N^2)).
        as_ops = (
            op.vjp_as_op(
                [nodes[s].shape for s in inputs],
                # An undeclared input is provisionally float64, as in inference: slicing the
                # cotangent is then right whenever the fed dtypes agree (the usual case).
                [inferred_dtype(nodes[s]) for s in inputs],
                node.dtype,
                node.attrs,
            )
            if op.vjp_as_op is not None
            else None
        )
        for i, (flows, src) in enumerate(zip(_grad_mask(masks, node.op, len(inputs)), inputs)):
            if not (flows and src in needs):
                continue
            if as_ops is not None:
                rule = as_ops[i]
                if rule is not None:
                    share = add(f"vjp:{name}:{i}", rule[0], [g], rule[1], nodes[src], name)
                    shares.setdefault(src, []).append(share)
                    continue
            # Equal vjp attrs share one dict (node records are never modified in place).
            key = (node.op, i, id(node.attrs))
            attrs = vjp_attrs.get(key)
            if attrs is None:
                attrs = vjp_attrs[key] = {"op": node.op, "argnum": i, "attrs": node.attrs}
            share = add(f"vjp:{name}:{i}", VJP_NAME, head + inputs, attrs, nodes[src], name)
            mine = shares.get(src)
            if mine is None:
                shares[src] = [share]
            else:
                mine.append(share)

    grads: dict[str, str] = {}
    for leaf in wrt:
        if leaf in grad_node:
            grads[leaf] = grad_node[leaf]
        else:  # no path to `of`: the gradient is zero, still a node so every executor agrees
            grads[leaf] = add(grad_name(leaf), "zeros_like", [leaf], {}, nodes[leaf], leaf)
    out = graph.copy()
    out.attach_backward(list(added.values()), grads, of)
    return out


def forward_part(graph: Graph) -> Graph:
    """A copy of ``graph`` without its backward pass: backward nodes, nodes computed from them
    and the ``grads``/``grad_of`` record are dropped (outputs among them too)."""
    return graph.without_backward()


def check_backward_pass(g: Graph, spec: GraphSpec) -> None:
    """Refuse a spec whose backward pass is not the one :func:`distgraph.grad` builds for its
    ``grad_of``: ``grads`` naming another node, or backward nodes edited, would make a run
    return (and a Trainer apply) values that are not the gradients they are named as."""
    backward = {n.name: n for n in spec.nodes if n.phase == "backward"}
    if spec.grad_of is None:
        if spec.grads or backward:
            raise SpecError(
                "grad_of: null, but the spec holds a backward pass (grads or backward nodes); "
                "a backward pass is only read together with the output it differentiates"
            )
        return
    try:
        want = grad(forward_part(g), of=spec.grad_of, wrt=list(spec.grads))
    except DistgraphError as e:
        raise SpecError(f"grad_of: {e}") from None
    if want.grads != dict(spec.grads):
        raise SpecError(
            f"grads: {dict(spec.grads)} is not where the gradients of {spec.grad_of!r} are "
            f"({want.grads}); re-create the graph with dg.grad(graph, of={spec.grad_of!r})"
        )
    made = {n.name: n for n in want.node_map.values() if n.phase == "backward"}
    for name in sorted(set(made) | set(backward)):
        a, b = made.get(name), backward.get(name)
        if a is None or b is None:
            what = (
                f"a backward node that dg.grad does not build for {spec.grad_of!r}"
                if a is None
                else f"missing: dg.grad builds this backward node for {spec.grad_of!r}"
            )
        else:
            fields = [
                f
                for f, mine, theirs in (
                    ("op", a.op, b.op),
                    ("inputs", list(a.inputs), b.inputs),
                    ("attrs", a.attrs, b.attrs),
                )
                if mine != theirs
            ]
            if not fields:
                continue
            what = (
                f"its {' and '.join(fields)} differ from what dg.grad builds for "
                f"{spec.grad_of!r} (were a forward node's attrs edited?)"
            )
        raise SpecError(
            f"nodes.{name}: {what}; re-create the graph with dg.grad(graph, of={spec.grad_of!r})"
        )
