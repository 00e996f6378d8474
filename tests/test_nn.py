"""distgraph.nn layer helpers: names, shapes, seeded init, the maths (against plain numpy),
gradients (finite differences), refusals that leave the graph untouched, and Ray == local."""

from __future__ import annotations

import math

import numpy as np
import pytest

import distgraph as dg
from distgraph import nn
from distgraph.testing import check_grads


def tiny_block_graph(
    seed: int = 0, width: int = 8, heads: int = 2, context: int = 5, dtype: str = "float64"
) -> dg.Graph:
    """x (batch, context, width) -> one transformer block -> sum of squares as a scalar loss."""
    g = dg.Graph()
    x = g.input("x", shape=(None, context, width), dtype=dtype)
    h = nn.transformer_block(x, heads, name="block0", mlp_ratio=2, seed=seed)
    g.output("out", h)
    g.output("loss", (h * h).mean())
    return g


def block_feeds(batch: int = 3, context: int = 5, width: int = 8) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).standard_normal((batch, context, width))}


# --- names and shapes --------------------------------------------------------------------------


def test_transformer_block_param_names_say_where_they_live():
    g = tiny_block_graph()
    assert sorted(g.params) == sorted(
        [
            "block0.ln1.w",
            "block0.ln1.b",
            "block0.attn.wq",
            "block0.attn.wk",
            "block0.attn.wv",
            "block0.attn.wo",
            "block0.ln2.w",
            "block0.ln2.b",
            "block0.mlp.fc1.w",
            "block0.mlp.fc1.b",
            "block0.mlp.fc2.w",
            "block0.mlp.fc2.b",
        ]
    )
    for node in ("block0", "block0.attn", "block0.attn.scores", "block0.attn.probs", "block0.mlp"):
        assert node in g, node
    shapes = {k: v.shape for k, v in g.params.items()}
    assert shapes["block0.attn.wq"] == (8, 2, 4) and shapes["block0.attn.wo"] == (2, 4, 8)
    assert shapes["block0.mlp.fc1.w"] == (8, 16) and shapes["block0.mlp.fc2.w"] == (16, 8)
    assert shapes["block0.ln1.w"] == (8,)
    assert g["block0"].shape == (None, 5, 8)
    assert g["block0.attn.probs"].shape == (None, 2, 5, 5)


def test_every_node_a_block_adds_lives_in_its_namespace():
    g = dg.Graph()
    x = g.input("x", shape=(None, 5, 8))
    nn.transformer_block(x, 2, name="block0", dropout=0.1)
    computed = [n.name for n in g.nodes if n.op not in ("input", "param", "const")]
    assert len(computed) == 20  # ln, 9 attention, drop, residual, ln, 5 mlp, drop, sum
    outside = [n for n in computed if n != "block0" and not n.startswith("block0.")]
    assert outside == []


def test_layer_shapes_and_initial_values():
    g = dg.Graph()
    img = g.input("img", shape=(None, 3, 8, 8), dtype="float32")
    c = nn.conv2d(img, 6, (3, 5), padding=(1, 2), name="conv1")
    assert c.shape == (None, 6, 8, 8) and c.dtype == np.float32
    assert g.params["conv1.w"].shape == (6, 3, 3, 5) and g.params["conv1.w"].dtype == np.float32
    assert np.array_equal(g.params["conv1.b"], np.zeros((6, 1, 1), np.float32))
    flat = c.reshape(-1, 6 * 8 * 8)
    y = nn.linear(flat, 10, name="fc", bias=False)
    assert y.shape == (None, 10) and "fc.b" not in g.params and y.name == "fc"
    assert nn.layer_norm(y, name="ln").shape == (None, 10)
    assert np.array_equal(g.params["ln.w"], np.ones(10, np.float32))
    assert np.array_equal(g.params["ln.b"], np.zeros(10, np.float32))
    ids = g.input("ids", shape=(None, 4), dtype="int64")
    e = nn.embedding(ids, 50, 16, name="tok")
    assert e.shape == (None, 4, 16) and g.params["tok.table"].shape == (50, 16)


def test_init_scales_follow_the_documented_schemes():
    g = dg.Graph()
    x = g.input("x", shape=(None, 400))
    nn.linear(x, 300, name="he")
    nn.linear(x, 300, name="glorot", init="glorot")
    he, glorot = g.params["he.w"], g.params["glorot.w"]
    assert abs(he.std() - math.sqrt(2 / 400)) < 0.02 * math.sqrt(2 / 400)
    limit = math.sqrt(6 / 700)
    assert np.abs(glorot).max() <= limit and np.abs(glorot).max() > 0.99 * limit


# --- initialisation is a function of (seed, name) ----------------------------------------------


def test_same_seed_same_values_other_seed_other_values():
    a, b, c = tiny_block_graph(seed=3), tiny_block_graph(seed=3), tiny_block_graph(seed=4)
    assert a.params.keys() == b.params.keys() == c.params.keys()
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    random = [k for k in a.params if k.split(".")[-1] in ("w", "wq", "wk", "wv", "wo")]
    random = [k for k in random if ".ln" not in k]  # layer-norm gains start at one
    assert len(random) == 6
    for k in random:
        assert not np.array_equal(a.params[k], c.params[k]), k


def test_init_does_not_depend_on_what_was_built_before():
    alone = dg.Graph()
    nn.linear(alone.input("x", shape=(None, 6)), 4, name="head", seed=1)
    crowded = dg.Graph()
    x = crowded.input("x", shape=(None, 6))
    nn.linear(nn.linear(x, 6, name="body", seed=1), 4, name="head", seed=1)
    assert np.array_equal(alone.params["head.w"], crowded.params["head.w"])
    # ... while two layers of one seed still differ (the name enters the stream).
    assert not np.array_equal(crowded.params["body.w"][:, :4], crowded.params["head.w"])
    assert np.array_equal(nn.init_rng(5, "a.w").random(3), nn.init_rng(5, "a.w").random(3))


def test_init_is_the_same_in_another_process():
    import subprocess
    import sys

    code = (
        "import numpy as np; from distgraph import nn; "
        "print(repr(nn.init_rng(2, 'block0.attn.wq').standard_normal(3).tolist()))"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    here = repr(nn.init_rng(2, "block0.attn.wq").standard_normal(3).tolist())
    assert other == here


# --- the maths -----------------------------------------------------------------------------


def _numpy_attention(x, wq, wk, wv, wo, causal=True):
    b, t, d = x.shape
    h, hd = wq.shape[1], wq.shape[2]
    q = (x @ wq.reshape(d, h * hd)).reshape(b, t, h, hd).transpose(0, 2, 1, 3)
    k = (x @ wk.reshape(d, h * hd)).reshape(b, t, h, hd).transpose(0, 2, 1, 3)
    v = (x @ wv.reshape(d, h * hd)).reshape(b, t, h, hd).transpose(0, 2, 1, 3)
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    if causal:
        s = np.where(np.tril(np.ones((t, t), bool)), s, -1e9)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ctx = (p @ v).transpose(0, 2, 1, 3).reshape(b, t, h * hd)
    return ctx @ wo.reshape(h * hd, d)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_a_numpy_reference(causal):
    g = dg.Graph()
    x = g.input("x", shape=(None, 5, 8))
    g.output("y", nn.multi_head_attention(x, 2, name="attn", causal=causal, seed=1))
    feeds = block_feeds()
    got = dg.LocalExecutor().run(g, feeds).values["y"]
    p = g.params
    want = _numpy_attention(
        feeds["x"], p["attn.wq"], p["attn.wk"], p["attn.wv"], p["attn.wo"], causal
    )
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_causal_attention_does_not_look_ahead():
    g = tiny_block_graph()
    feeds = block_feeds()
    later = {"x": feeds["x"].copy()}
    later["x"][:, 3:, :] += 10.0  # change positions 3 and 4 only
    ex = dg.LocalExecutor()
    a, b = ex.run(g, feeds).values["out"], ex.run(g, later).values["out"]
    assert not np.allclose(a[:, 3:], b[:, 3:])  # the change is visible where it happened ...
    assert np.array_equal(a[:, :3], b[:, :3])  # ... and nowhere before it


def test_transformer_block_is_pre_norm_residual():
    g = tiny_block_graph()
    rng = np.random.default_rng(3)
    for k, v in g.params.items():  # biases and gains off zero and one, so they are exercised
        g.params[k] = v + 0.1 * rng.standard_normal(v.shape)
    feeds = block_feeds()
    p = g.params

    def ln(v, w, b):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * w + b

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))

    x = feeds["x"]
    h = x + _numpy_attention(
        ln(x, p["block0.ln1.w"], p["block0.ln1.b"]),
        p["block0.attn.wq"],
        p["block0.attn.wk"],
        p["block0.attn.wv"],
        p["block0.attn.wo"],
    )
    m = gelu(
        ln(h, p["block0.ln2.w"], p["block0.ln2.b"]) @ p["block0.mlp.fc1.w"] + p["block0.mlp.fc1.b"]
    )
    want = h + m @ p["block0.mlp.fc2.w"] + p["block0.mlp.fc2.b"]
    got = dg.LocalExecutor().run(g, feeds).values["out"]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_transformer_block_gradients_match_finite_differences():
    g = tiny_block_graph(width=4, heads=2, context=3)
    feeds = block_feeds(batch=2, context=3, width=4)
    # Move the zero-initialised biases and unit gains off their special values first.
    rng = np.random.default_rng(0)
    for k, v in g.params.items():
        g.params[k] = v + 0.1 * rng.standard_normal(v.shape)
    res = dg.LocalExecutor().run(g, feeds, grad="loss")
    assert set(res.grads) == {"x", *g.params}
    assert all(np.abs(v).max() > 0 for v in res.grads.values())
    check_grads(g, feeds, of="loss", rtol=1e-4, atol=1e-8)


def test_conv_and_linear_gradients_match_finite_differences():
    g = dg.Graph()
    x = g.input("x", shape=(None, 2, 5, 5))
    h = dg.relu(nn.conv2d(x, 3, 3, stride=2, padding=1, name="conv", seed=2))
    h = nn.linear(h.reshape(-1, 3 * 3 * 3), 4, name="fc", seed=2)
    g.output("loss", (h * h).mean())
    g.params["conv.b"] = g.params["conv.b"] + 0.05
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 2, 5, 5))}
    check_grads(g, feeds, of="loss", rtol=1e-4, atol=1e-8)


# --- refusals ------------------------------------------------------------------------------


def test_a_taken_namespace_is_refused_before_anything_is_added():
    g = tiny_block_graph()
    before = (len(g), sorted(g.params))
    x = g["block0"]
    for build in (
        lambda: nn.transformer_block(x, 2, name="block0"),
        lambda: nn.linear(x, 3, name="block0.attn"),
        lambda: nn.layer_norm(x, name="block0.mlp.fc1"),
        lambda: nn.multi_head_attention(x, 2, name="x"),
    ):
        with pytest.raises(dg.GraphError, match="already has"):
            build()
        assert (len(g), sorted(g.params)) == before


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda x: nn.multi_head_attention(x, 3, name="a"), "does not divide into 3 heads"),
        (lambda x: nn.transformer_block(x, 3, name="b"), "does not divide into 3 heads"),
        (lambda x: nn.linear(x, 0, name="c"), "out_features must be an int >= 1"),
        (lambda x: nn.linear(x, 2, name="d", init="xavier"), "init must be one of he, glorot"),
        (lambda x: nn.conv2d(x, 2, 3, name="e"), "expected a 4-D"),
        (lambda x: nn.mlp_block(x, 4, name="f", activation="swish"), "activation must be"),
    ],
)
def test_bad_arguments_name_the_layer_and_add_nothing(build, match):
    g = dg.Graph()
    x = g.input("x", shape=(None, 5, 8))
    before = len(g)
    with pytest.raises(dg.DistgraphError, match=match):
        build(x)
    assert len(g) == before and not g.params


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda x: nn.conv2d(x, 2, 9, name="c"), "a 9x9 kernel with dilation"),
        (lambda x: nn.conv2d(x, 2, 3, stride=0, name="c"), "stride"),
        (lambda x: nn.conv2d(x, 2, 3, dilation=4, name="c"), "does not fit"),
        (lambda x: nn.conv2d(x.astype("int64"), 2, 3, name="c"), "dtype int64"),
        (lambda x: nn.layer_norm(x, eps=-1.0, name="n"), "eps must be a number >= 0"),
    ],
)
def test_refused_convolutions_and_norms_add_no_param(build, match):
    g = dg.Graph()
    x = g.input("x", shape=(None, 1, 8, 8), dtype="float32")
    with pytest.raises(dg.DistgraphError, match=match):
        build(x)
    assert not g.params and all(n.op in ("input", "cast") for n in g.nodes)


def test_a_width_that_is_a_batch_dimension_is_refused():
    g = dg.Graph()
    x = g.input("x", shape=(None, None))
    with pytest.raises(dg.ShapeError, match=r"linear 'fc': input 'x' has shape \(None, None\)"):
        nn.linear(x, 3, name="fc")


def test_embedding_ids_must_be_integers():
    g = dg.Graph()
    ids = g.input("ids", shape=(None, 4), dtype="float64")
    with pytest.raises(dg.GraphError, match="ids 'ids' have dtype float64"):
        nn.embedding(ids, 10, 4, name="tok")
    assert not g.params


# --- the graph stays plain data, on every executor ----------------------------------------


def test_a_built_graph_round_trips_through_json():
    g = tiny_block_graph()
    again = dg.Graph.from_json(g.to_json())
    feeds = block_feeds()
    ex = dg.LocalExecutor()
    assert np.array_equal(ex.run(g, feeds).values["out"], ex.run(again, feeds).values["out"])


@pytest.fixture(scope="module")
def ray_executor():
    from raysupport import ensure_ray

    ensure_ray()
    with dg.RayExecutor(num_workers=2, strategy="round_robin") as ex:
        yield ex


def test_ray_matches_local_on_a_transformer_block(ray_executor):
    g = tiny_block_graph(dtype="float32")
    feeds = {"x": block_feeds()["x"].astype(np.float32)}
    local = dg.LocalExecutor().run(g, feeds, grad="loss")
    remote = ray_executor.run(g, feeds, grad="loss")
    # Meaningful only when the block really is spread over both workers.
    assert len(set(remote.placement.values())) == 2
    assert local.values.keys() == remote.values.keys() and local.grads.keys() == remote.grads.keys()
    for k in local.values:
        assert np.array_equal(local.values[k], remote.values[k]), k
    for k in local.grads:
        assert np.array_equal(local.grads[k], remote.grads[k]), k


def dropout_block_graph(p: float) -> dg.Graph:
    g = dg.Graph()
    x = g.input("x", shape=(None, 5, 8))
    h = nn.transformer_block(x, 2, name="block0", mlp_ratio=2, dropout=p, seed=1)
    g.output("loss", (h * h).mean())
    return g


def test_block_dropout_is_identity_outside_training_and_named_after_the_block():
    with_drop, without = dropout_block_graph(0.5), dropout_block_graph(0.0)
    assert "block0.attn.drop" in with_drop and "block0.mlp.drop" in with_drop
    assert "block0.attn.drop" not in without
    feeds = block_feeds()
    ex = dg.LocalExecutor()
    a = ex.run(with_drop, feeds, grad="loss")
    b = ex.run(without, feeds, grad="loss")
    assert np.array_equal(a.values["loss"], b.values["loss"])
    with pytest.raises(dg.GraphError, match="dropout must be a probability"):
        dropout_block_graph(1.0)


def _train(g: dg.Graph, executor: object, steps: int = 3) -> dict[str, np.ndarray]:
    feeds = {"x": np.random.default_rng(2).standard_normal((8, 5, 8))}
    trainer = dg.Trainer(g, loss="loss", optimizer=dg.SGD(lr=0.1), executor=executor)
    trainer.fit(feeds, epochs=steps, batch_size=8)
    return trainer.params


def test_block_dropout_changes_training_steps():
    trained = _train(dropout_block_graph(0.5), dg.LocalExecutor())
    plain = _train(dropout_block_graph(0.0), dg.LocalExecutor())
    assert not np.array_equal(trained["block0.attn.wq"], plain["block0.attn.wq"])
    again = _train(dropout_block_graph(0.5), dg.LocalExecutor())
    assert all(np.array_equal(trained[k], again[k]) for k in trained)


def test_ray_trains_a_dropout_block_to_the_same_params_as_local(ray_executor):
    local = _train(dropout_block_graph(0.5), dg.LocalExecutor())
    remote = _train(dropout_block_graph(0.5), ray_executor)
    assert local.keys() == remote.keys()
    for k in local:
        assert np.array_equal(local[k], remote[k]), k
