"""Tests of hscl_jax.losses: golden parity, properties, blocked and multi-device equivalence."""

import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hscl_jax import losses
from hscl_jax.losses import _dense as dense_path

# A copy kept in the repository (tests/golden/README.md says where it comes from): a fresh clone
# has nothing beside it.
GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "reference_losses.npz"
BETAS = {"b0p5": 0.5, "b1p0": 1.0, "b5p0": 5.0}


def _golden_cases():
    """(golden key, loss name, options) for every loss variant in the golden file."""
    cases = [
        ("scl_all", "scl", {}),
        ("scl_aug", "scl", {"positives": "partner"}),
        ("ucl", "ucl", {}),
    ]
    for tag, beta in BETAS.items():
        cases += [
            (f"hscl_all_{tag}_grad_through", "hscl", {"beta": beta}),
            (f"hscl_all_{tag}_detached", "hscl", {"beta": beta, "detach_weights": True}),
            (
                f"hscl_aug_{tag}_detached",
                "hscl",
                {"beta": beta, "positives": "partner", "detach_weights": True},
            ),
            (f"hucl_{tag}", "hucl", {"beta": beta}),
            (f"hucl_{tag}_tau0p1", "hucl", {"beta": beta, "tau_plus": 0.1}),
        ]
    return cases


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.fail(f"golden file missing: {GOLDEN}")
    return dict(np.load(GOLDEN))


def _value_and_grads(name, z1, z2, labels, **options):
    fn = lambda a, b: losses.compute(name, a, b, labels, **options)  # noqa: E731
    return jax.value_and_grad(fn, argnums=(0, 1))(z1, z2)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _random_batch(seed, batch, dim, num_classes, dtype=np.float32):
    rng = np.random.default_rng(seed)
    z1 = _unit(rng.normal(size=(batch, dim)))
    z2 = _unit(z1 + 0.5 * rng.normal(size=(batch, dim)))
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    return jnp.asarray(z1, dtype), jnp.asarray(z2, dtype), jnp.asarray(labels)


@functools.cache
def _jitted_value_and_grads(name, option_items):
    options = dict(option_items)

    @jax.jit
    def run(z1, z2, labels, hyper):
        opts = dict(options)
        # The traced hyper-parameters take the place of the Python ones inside the jit.
        fn = lambda a, b: getattr(losses, name)(  # noqa: E731
            a, b, *(() if name in ("ucl", "hucl") else (labels,)), **opts, **hyper
        )
        return jax.value_and_grad(fn, argnums=(0, 1))(z1, z2)

    return run


def _loss_and_grads(name, z1, z2, labels, **options):
    """value and grads; beta/temperature go through as traced values (no recompile per value)."""
    hyper = {k: options.pop(k) for k in ("beta", "temperature") if k in options}
    return _jitted_value_and_grads(name, tuple(sorted(options.items())))(z1, z2, labels, hyper)


# ----------------------------------------------------------------------------- golden parity


@pytest.mark.parametrize("case", ["c0", "c1", "c2"])
@pytest.mark.parametrize("key,name,options", _golden_cases(), ids=[c[0] for c in _golden_cases()])
def test_golden_parity_float64(golden, case, key, name, options):
    with jax.enable_x64(True):
        z1, z2 = jnp.asarray(golden[f"{case}_z1"]), jnp.asarray(golden[f"{case}_z2"])
        labels = jnp.asarray(golden[f"{case}_labels"])
        value, (g1, g2) = _loss_and_grads(name, z1, z2, labels, **options)
        assert value.dtype == jnp.float64
        np.testing.assert_allclose(value, golden[f"{case}_{key}_value"], rtol=1e-6)
        # Gradient entries near zero make a per-entry relative test meaningless; scale by the
        # largest entry of the reference gradient instead.
        for got, ref in (
            (g1, golden[f"{case}_{key}_grad_z1"]),
            (g2, golden[f"{case}_{key}_grad_z2"]),
        ):
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("case", ["c0", "c2"])
@pytest.mark.parametrize("key,name,options", _golden_cases(), ids=[c[0] for c in _golden_cases()])
def test_golden_parity_float32(golden, case, key, name, options):
    z1 = jnp.asarray(golden[f"{case}_z1"], jnp.float32)
    z2 = jnp.asarray(golden[f"{case}_z2"], jnp.float32)
    labels = jnp.asarray(golden[f"{case}_labels"], jnp.int32)
    value, (g1, g2) = _loss_and_grads(name, z1, z2, labels, **options)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, golden[f"{case}_{key}_value"], rtol=1e-4)
    for got, ref in ((g1, golden[f"{case}_{key}_grad_z1"]), (g2, golden[f"{case}_{key}_grad_z2"])):
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_detached_and_grad_through_differ_only_in_gradient(golden):
    z1, z2 = jnp.asarray(golden["c0_z1"]), jnp.asarray(golden["c0_z2"])
    labels = jnp.asarray(golden["c0_labels"])
    v_through, g_through = _value_and_grads("hscl", z1, z2, labels, beta=5.0)
    v_detached, g_detached = _value_and_grads("hscl", z1, z2, labels, beta=5.0, detach_weights=True)
    np.testing.assert_allclose(v_through, v_detached, rtol=1e-6)
    assert np.abs(np.asarray(g_through[0]) - np.asarray(g_detached[0])).max() > 1e-3


# ----------------------------------------------------------------------------- properties

_ALL_LOSSES = (
    ("ucl", {}),
    ("scl", {}),
    ("scl", {"positives": "partner"}),
    ("hucl", {"beta": 1.0}),
    ("hscl", {"beta": 1.0}),
    ("hscl", {"beta": 1.0, "positives": "partner", "detach_weights": True}),
    ("supcon", {}),
    ("hucl", {"beta": 1.0, "tau_plus": 0.1, "clamp": True}),
)


batches = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        # Few shapes: each new shape compiles every loss once more.
        "batch": st.sampled_from([1, 3, 8]),
        "dim": st.just(4),
        "classes": st.sampled_from(["one", "few", "distinct"]),
        "dtype": st.sampled_from([jnp.float32, jnp.bfloat16]),
        "temperature": st.floats(0.05, 1.0),
        "beta": st.floats(0.0, 50.0),
    }
)


def _make(example):
    num_classes = {"one": 1, "few": 3, "distinct": 10**6}[example["classes"]]
    z1, z2, labels = _random_batch(
        example["seed"], example["batch"], example["dim"], num_classes, example["dtype"]
    )
    if example["classes"] == "distinct":
        labels = jnp.arange(example["batch"], dtype=jnp.int32)
    return z1, z2, labels


_PROPERTY_LOSSES = _ALL_LOSSES + (
    ("hscl", {"beta": 1.0, "positives": "partner"}),
    ("hscl_beta0", {"beta": 0.0}),  # the tilted code path at beta = 0 (beta is traced)
    ("hscl_beta0", {"beta": 0.0, "positives": "partner"}),
)


@jax.jit
def _all_losses_and_grads(z1, z2, labels, temperature, beta):
    """Every variant's value and gradients in one program: one compile per shape and dtype."""
    out = []
    for name, options in _PROPERTY_LOSSES:
        options = dict(options, temperature=temperature)
        if "beta" in options:
            options["beta"] = 0.0 * beta if name == "hscl_beta0" else beta
        name = name.removesuffix("_beta0")
        args = () if name in ("ucl", "hucl") else (labels,)

        def fn(a, b, name=name, args=args, options=options):
            return getattr(losses, name)(a, b, *args, **options)

        out.append(jax.value_and_grad(fn, argnums=(0, 1))(z1, z2))
    return out


@settings(
    max_examples=210,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(batches)
def test_kernel_properties(example):
    """Finite values and gradients, permutation invariance, and the order the tilt implies."""
    z1, z2, labels = _make(example)
    t, beta = example["temperature"], example["beta"]
    perm = np.random.default_rng(example["seed"] + 1).permutation(z1.shape[0])
    results = jax.device_get(_all_losses_and_grads(z1, z2, labels, t, beta))
    permuted = jax.device_get(
        _all_losses_and_grads(
            *(jnp.asarray(np.asarray(x)[perm]) for x in (z1, z2, labels)), t, beta
        )
    )
    values = {}
    for (name, options), (value, grads), (p_value, p_grads) in zip(
        _PROPERTY_LOSSES, results, permuted, strict=True
    ):
        key = (name, options.get("positives", "all"), options.get("detach_weights", False))
        values.setdefault(key, value)
        assert value.shape == () and value.dtype == np.float32, (name, value.dtype)
        chex.assert_trees_all_equal_shapes_and_dtypes(grads, (z1, z2))
        assert np.isfinite(value), (name, options)
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g, np.float32))), (name, options)
        assert value >= 0.0 or name == "supcon"

        np.testing.assert_allclose(p_value, value, rtol=2e-5, atol=1e-6, err_msg=name)
        for got, want in zip(p_grads, grads, strict=True):
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)[perm]
            scale = max(np.abs(want).max(), 1e-6)
            tol = 2e-2 if z1.dtype == jnp.bfloat16 else 2e-3  # relative to the largest entry
            np.testing.assert_allclose(got, want, atol=tol * scale, err_msg=name)

    # beta = 0 through the tilted code path gives SCL exactly; a tilt raises the weighted mean
    # of exp(s) over the negatives, hence the loss.
    for positives in ("all", "partner"):
        scl = values["scl", positives, False]
        np.testing.assert_allclose(values["hscl_beta0", positives, False], scl, rtol=1e-6)
        hscl = values["hscl", positives, False]
        assert hscl >= scl * (1 - 1e-5) - 1e-6, (positives, hscl, scl)
    hucl, ucl = values["hucl", "all", False], values["ucl", "all", False]
    assert hucl >= ucl * (1 - 1e-5) - 1e-6, (hucl, ucl)


# ----------------------------------------------------------------------------- edge cases


def test_batch_without_valid_anchor_returns_zero_and_says_so():
    z1, z2, _ = _random_batch(0, 6, 4, 1)
    one_class = jnp.zeros((6,), jnp.int32)
    loss, aux = losses.hscl(z1, z2, one_class, beta=1.0, return_aux=True)
    assert float(loss) == 0.0
    assert float(aux.num_anchors) == 0.0 and float(aux.num_pairs) == 0.0
    grads = jax.grad(lambda a: losses.hscl(a, z2, one_class, beta=1.0))(z1)
    np.testing.assert_array_equal(grads, 0.0)
    loss, aux = losses.ucl(z1[:1], z2[:1], return_aux=True)  # one image: no negatives
    assert float(loss) == 0.0 and float(aux.num_anchors) == 0.0


@pytest.mark.parametrize("positives", ["all", "partner"])
@pytest.mark.parametrize("beta", [0.0, 0.7, 3.0])
def test_hscl_matches_a_direct_numpy_implementation(beta, positives):
    """Written from docs/losses.md with explicit loops, at a temperature the golden file lacks."""
    z1, z2, labels = _random_batch(3, 10, 6, 3)
    t = 0.3
    z = np.concatenate([z1, z2]).astype(np.float64)
    y = np.concatenate([labels, labels])
    s = z @ z.T / t
    n, q = len(z), len(z) - 2
    terms = []
    for i in range(n):
        neg = y != y[i]
        w = np.exp(beta * s[i][neg])
        mu = (w * np.exp(s[i][neg])).sum() / w.sum()
        if positives == "all":
            pos = np.flatnonzero((y == y[i]) & (np.arange(n) != i))
        else:
            pos = [(i + n // 2) % n]
        terms += [np.log1p(q * mu * np.exp(-s[i, j])) for j in pos]
    got = losses.hscl(z1, z2, labels, beta=beta, temperature=t, positives=positives)
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


def test_aux_statistics_match_direct_computation():
    z1, z2, labels = _random_batch(5, 10, 4, 3)
    loss, aux = losses.hscl(z1, z2, labels, beta=2.0, temperature=0.5, return_aux=True)
    np.testing.assert_allclose(loss, losses.hscl(z1, z2, labels, beta=2.0), rtol=1e-6)
    z = np.concatenate([z1, z2]).astype(np.float64)
    y = np.concatenate([labels, labels])
    cos = z @ z.T
    n = len(z)
    same = y[:, None] == y[None, :]
    pos = same & ~np.eye(n, dtype=bool)
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    np.testing.assert_allclose(aux.num_anchors, valid.sum())
    np.testing.assert_allclose(aux.num_pairs, pos[valid].sum())
    np.testing.assert_allclose(aux.mean_pos_cos, cos[valid][pos[valid]].mean(), rtol=1e-5)
    np.testing.assert_allclose(aux.mean_neg_cos, cos[valid][neg[valid]].mean(), rtol=1e-5)
    ess = []
    for i in np.flatnonzero(valid):
        w = np.exp(2.0 * cos[i][neg[i]] / 0.5)
        ess.append(w.sum() ** 2 / (w**2).sum())
    np.testing.assert_allclose(aux.effective_negatives, np.mean(ess), rtol=1e-5)


def test_supcon_matches_a_direct_numpy_implementation():
    z1, z2, labels = _random_batch(11, 12, 5, 4)
    t = 0.1
    z = np.concatenate([z1, z2]).astype(np.float64)
    y = np.concatenate([labels, labels])
    s = z @ z.T / t
    n = len(z)
    per_anchor = []
    for i in range(n):
        others = np.arange(n) != i
        pos = (y == y[i]) & others
        lse = np.log(np.exp(s[i][others]).sum())
        per_anchor.append(-(s[i][pos] - lse).mean())
    np.testing.assert_allclose(
        losses.supcon(z1, z2, labels, temperature=t), np.mean(per_anchor), rtol=1e-5
    )


def test_hucl_clamp_floors_the_negative_term():
    z1, z2, _ = _random_batch(2, 16, 8, 1)
    t = 0.5
    unclamped = losses.hucl(z1, z2, beta=1.0, tau_plus=0.9, temperature=t)
    clamped = losses.hucl(z1, z2, beta=1.0, tau_plus=0.9, temperature=t, clamp=True)
    assert float(clamped) >= float(unclamped)
    # With tau_plus this large the debiased estimate goes non-positive for some anchors: it is
    # floored at 0 (never NaN), the clamp floors it at Q exp(-1/t) instead.
    assert np.isfinite(float(unclamped))


def test_bfloat16_inputs_accumulate_in_float32():
    z1, z2, labels = _random_batch(4, 32, 16, 4, np.float32)
    ref = losses.hscl(z1, z2, labels, beta=1.0)
    low = losses.hscl(z1.astype(jnp.bfloat16), z2.astype(jnp.bfloat16), labels, beta=1.0)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, rtol=1e-2)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda z, y: losses.hscl(z, z[:3], y, beta=1.0), r"z1 and z2 must both have shape"),
        (lambda z, y: losses.hscl(z, z, y[:2], beta=1.0), r"labels must have shape \(4,\)"),
        (lambda z, y: losses.hscl(z, z, y.astype(jnp.float32), beta=1.0), r"labels must be int"),
        (lambda z, y: losses.hscl(z, z, y, beta=-0.5), r"beta must be .*>= 0.*-0.5"),
        (lambda z, y: losses.hscl(z, z, y, beta=float("nan")), r"beta must be a finite"),
        (lambda z, y: losses.scl(z, z, y, temperature=0.0), r"temperature must be .*> 0.*0.0"),
        (lambda z, y: losses.ucl(z, z, temperature=-1), r"temperature must be"),
        (lambda z, y: losses.hucl(z, z, beta=1.0, tau_plus=1.0), r"tau_plus .*< 1.*1.0"),
        (lambda z, y: losses.hucl(z, z, beta=1.0, tau_plus=-0.1), r"tau_plus .*>= 0"),
        (lambda z, y: losses.scl(z, z, y, positives="some"), r"positives must be one of"),
        (lambda z, y: losses.scl(z, z, y, block_size=0), r"block_size must be None or a pos"),
        (lambda z, y: losses.compute("nce", z, z, y), r"unknown loss 'nce'; allowed"),
        (lambda z, y: losses.compute("ucl", z, z, y, beta=1.0), r"does not take option.*beta"),
        (lambda z, y: losses.compute("scl", z, z), r"needs labels"),
        # hardening
        (lambda z, y: losses.hscl(z, z, y), r"beta is required with hardening='exp', got None"),
        (lambda z, y: losses.hscl(z, z, y, hardening="poly"), r"beta is required.*'poly'"),
        (
            lambda z, y: losses.hscl(z, z, y, beta=1.0, hardening=lambda s: s),
            r"beta is not used with hardening=a callable, got beta=1.0",
        ),
        (
            lambda z, y: losses.hucl(z, z, beta=1.0, hardening="topk", top_k=2),
            r"beta is not used with hardening='topk'",
        ),
        (lambda z, y: losses.hscl(z, z, y, hardening="topk"), r"top_k must be a positive int"),
        (
            lambda z, y: losses.hscl(z, z, y, hardening="topk", top_k=0),
            r"top_k must be .* got 0",
        ),
        (lambda z, y: losses.hscl(z, z, y, beta=1.0, top_k=3), r"top_k is used with hard"),
        (lambda z, y: losses.hscl(z, z, y, beta=1.0, hardening="cubic"), r"hardening must be"),
    ],
)
def test_bad_input_raises_one_clear_error(call, match):
    z = jnp.asarray(_unit(np.eye(4, 3) + 0.1), jnp.float32)
    y = jnp.arange(4, dtype=jnp.int32)
    with pytest.raises(ValueError, match=match):
        call(z, y)


# ----------------------------------------------------------------------------- blocked


_BLOCK_LOSSES = (
    ("ucl", {}),
    ("scl", {}),
    ("hucl", {"beta": 2.0, "tau_plus": 0.1, "clamp": True}),
    ("hscl", {"beta": 2.0}),
    ("hscl", {"beta": 2.0, "positives": "partner", "detach_weights": True}),
    ("supcon", {}),
)


def _largest_intermediate(closed_jaxpr) -> int:
    """The number of entries of the largest value computed anywhere in a jaxpr, nested ones too."""
    biggest = 0

    def visit(jpr):
        nonlocal biggest
        for eqn in jpr.eqns:
            for var in eqn.outvars:
                biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
            for param in eqn.params.values():
                for inner in param if isinstance(param, tuple | list) else (param,):
                    inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
                    if hasattr(inner, "eqns"):
                        visit(inner)

    visit(closed_jaxpr.jaxpr)
    return biggest


def test_blocked_never_materialises_the_similarity_matrix():
    """No intermediate of the blocked loss+grad holds more than a (block x block)-ish tile."""
    z1, z2, labels = _random_batch(8, 64, 4, 4)  # 2B = 128, full matrix = 16384 entries
    block = 16

    def fn(a, b):
        return losses.hscl(a, b, labels, beta=1.0, block_size=block)

    biggest_blocked = _largest_intermediate(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(z1, z2))
    assert biggest_blocked < 128 * 128 // 4, biggest_blocked
    dense = jax.make_jaxpr(jax.grad(lambda a, b: losses.hscl(a, b, labels, beta=1.0)))(z1, z2)
    assert _largest_intermediate(dense) >= 128 * 128 > biggest_blocked


# ----------------------------------------------------------------------------- dense path

_DENSE_LOSSES = _BLOCK_LOSSES + (("hscl", {"beta": 0.5, "detach_weights": True}),)
# The backward pass that recomputes the similarities, for the two variants whose weights touch
# most of it (the tilt with tau_plus and the clamp; partner positives with detached weights).
_RECOMPUTED_LOSSES = (_BLOCK_LOSSES[2], _BLOCK_LOSSES[4])
_DENSE_CASES = [("similarities_kept", n, o) for n, o in _DENSE_LOSSES] + [
    ("similarities_recomputed", n, o) for n, o in _RECOMPUTED_LOSSES
]


@pytest.fixture(params=["similarities_kept", "similarities_recomputed"])
def dense_chunks_of_3(monkeypatch, request):
    """Makes the dense path walk 2B = 40 views in chunks of 3 anchors, the last one padded; its
    backward pass gets the similarities from the forward pass or recomputes them."""
    monkeypatch.setattr(dense_path, "CPU_CHUNK_SIMILARITIES", 3 * 40)
    monkeypatch.setattr(dense_path, "MIN_CHUNK_ROWS", 1)
    if request.param == "similarities_recomputed":
        monkeypatch.setattr(dense_path, "MAX_SAVED_SIMILARITIES", 0)
    jax.clear_caches()  # the chunk size is read when a loss is traced
    yield
    jax.clear_caches()


@pytest.mark.parametrize(
    "dense_chunks_of_3,name,options",
    _DENSE_CASES,
    indirect=["dense_chunks_of_3"],
    ids=[f"{c}-{n}-{o}" for c, n, o in _DENSE_CASES],
)
def test_dense_equals_blocked_and_its_backward_equals_autodiff(name, options, dense_chunks_of_3):
    """The dense path, walked in chunks of anchors, equals the blocked path at a block size
    that does not divide 2B = 40, one that does and one that exceeds it: the loss, and the
    gradients of the embeddings and of every traced hyper-parameter (the dense path's backward
    is hand-written, the blocked one is autodiff)."""
    z1, z2, labels = _random_batch(7, 20, 8, 4)  # 2B = 40
    hyper = {k: v for k, v in options.items() if isinstance(v, float)} | {"temperature": 0.3}
    fixed = {k: v for k, v in options.items() if k not in hyper}

    def fn(a, b, h, block_size):
        return losses.compute(name, a, b, labels, block_size=block_size, **fixed, **h)

    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)), static_argnums=3)
    dense, dense_grads = grad(z1, z2, hyper, None)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(dense_grads)), dense_grads
    for block_size in (7, 8, 64):
        blocked, blocked_grads = grad(z1, z2, hyper, block_size)
        np.testing.assert_allclose(dense, blocked, rtol=1e-5, err_msg=f"block_size={block_size}")
        chex.assert_trees_all_close(dense_grads, blocked_grads, atol=1e-6, rtol=1e-4)

    # Concrete hyper-parameters take the static code path; still the same loss and gradients.
    concrete = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b, hyper, None), argnums=(0, 1)))(
        z1, z2
    )
    np.testing.assert_allclose(concrete[0], blocked, rtol=1e-5)
    chex.assert_trees_all_close(concrete[1], blocked_grads[:2], atol=1e-6, rtol=1e-4)

    if dense_path.MAX_SAVED_SIMILARITIES == 0:  # then no value holds a (2B)^2 matrix
        grad_z = jax.grad(lambda a, b: fn(a, b, hyper, None), argnums=(0, 1))
        assert _largest_intermediate(jax.make_jaxpr(grad_z)(z1, z2)) < 40 * 40


def test_dense_chunks_under_pmap_equal_one_device(dense_chunks_of_3):
    z1, z2, labels = _random_batch(9, 40, 6, 4)  # 2B = 80 global, 10 anchors per device
    value, (g1, g2) = _value_and_grads("hscl", z1, z2, labels, beta=2.0)

    def per_device(a, b, y):
        fn = lambda a_, b_: losses.hscl(a_, b_, y, beta=2.0, axis_name="batch")  # noqa: E731
        return jax.value_and_grad(fn, argnums=(0, 1))(a, b)

    shard = lambda x: x.reshape((8, 5) + x.shape[1:])  # noqa: E731
    values, (p1, p2) = jax.pmap(per_device, axis_name="batch")(shard(z1), shard(z2), shard(labels))
    np.testing.assert_allclose(values, np.full(8, value), rtol=1e-5)
    np.testing.assert_allclose(p1.reshape(z1.shape), g1, atol=1e-6, rtol=1e-4)
    np.testing.assert_allclose(p2.reshape(z2.shape), g2, atol=1e-6, rtol=1e-4)


def test_dense_second_order_derivatives_equal_autodiff():
    """Hessians differentiate the hand-written backward pass itself (forward over reverse)."""
    z1, z2, labels = _random_batch(12, 4, 3, 2)
    z = jnp.concatenate([z1, z2])

    def hessian(block_size):
        def fn(x):
            return losses.hscl(x[:4], x[4:], labels, beta=1.5, block_size=block_size)

        return jax.hessian(fn)(z)

    np.testing.assert_allclose(hessian(None), hessian(3), atol=1e-5, rtol=1e-4)


def test_dense_vmap_over_beta_equals_one_beta_at_a_time():
    z1, z2, labels = _random_batch(11, 12, 6, 3)
    betas = jnp.asarray([0.0, 0.5, 4.0])

    def fn(beta):
        return jax.value_and_grad(
            lambda a, b: losses.hscl(a, b, labels, beta=beta), argnums=(0, 1)
        )(z1, z2)

    swept = jax.vmap(fn)(betas)
    for i, beta in enumerate([0.0, 0.5, 4.0]):
        one_beta = jax.tree.map(lambda x, i=i: x[i], swept)
        chex.assert_trees_all_close(one_beta, fn(beta), atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- multi-device


def test_pmap_aux_is_global():
    z1, z2, labels = _random_batch(10, 16, 6, 3)
    _, aux = losses.hscl(z1, z2, labels, beta=1.0, return_aux=True)

    def per_device(a, b, y):
        return losses.hscl(a, b, y, beta=1.0, axis_name="i", return_aux=True)[1]

    shard = lambda x: x.reshape((8, 2) + x.shape[1:])  # noqa: E731
    paux = jax.pmap(per_device, axis_name="i")(shard(z1), shard(z2), shard(labels))
    for got, want in zip(paux, aux, strict=True):
        np.testing.assert_allclose(got, np.full(8, want), rtol=1e-5)
