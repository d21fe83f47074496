"""Contrastive statistics over the global batch by a ring: no device holds B_local x B_global.

Each device keeps its images. The text side (embeddings, and SmartCLIP's masks) travels around
the batch axes of the mesh with `ppermute`, one block per step; every step scores the local
images against the block it holds. Row statistics (per image) accumulate where the image is;
column statistics (per caption) travel with their block and arrive home after a full turn.
Log-sum-exps are accumulated online, and a held block is scored `chunk` captions at a time.
The backward pass runs the ring again and recomputes each chunk (a custom VJP), so per-device
memory is O(B_local * (D + chunk)) at any global batch.

`softmax_stats` and `sigmoid_stats` return what `losses.softmax_stats`/`sigmoid_stats` return
for the full logits matrix, as [B] arrays sharded like the batch; the losses are assembled
from those in `losses.py` either way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from smartclip_jax import sharding

# (local images [b, D], a text block (pytree of [b, ...]), theta) -> logits [b, b]
LogitsFn = Callable[[jax.Array, Any, Any], jax.Array]
Stats = dict[str, jax.Array]
CHUNK = 1024  # captions scored at once: temporaries are O(B_local * CHUNK) per device


def _ring_size() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise ValueError("loss_impl='ring' needs an active mesh (trace inside sharding.activate)")
  return math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)


def _shift(tree: Any, size: int) -> Any:
  """Every device sends to the next one on the batch axes: after k shifts device p holds p-k's."""
  perm = [(i, (i + 1) % size) for i in range(size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, sharding.BATCH_AXES, perm), tree)


def _vary(tree: Any) -> Any:
  """Marks starting values as device-varying, as the loop carries they start will be."""

  def cast(x):
    varying = jax.typeof(x).manual_axis_type.varying
    missing = tuple(a for a in sharding.BATCH_AXES if a not in varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def _better(value, index, best_value, best_index):
  """The first maximum (lowest global index on ties), as argmax over the whole row picks it."""
  take = (value > best_value) | ((value == best_value) & (index < best_index))
  return jnp.where(take, value, best_value), jnp.where(take, index, best_index)


def _chunk_size(b: int, chunk: int) -> int:
  """The largest divisor of the block size that is at most `chunk`."""
  return next(c for c in range(min(chunk, b), 0, -1) if b % c == 0)


def _signs(first_block: jax.Array, b: int, c: int, j: jax.Array) -> jax.Array:
  """+1 for the matching pairs (only in the device's own block, k = 0), -1 elsewhere."""
  pos = jnp.arange(b)[:, None] == j * c + jnp.arange(c)[None, :]
  return jnp.where(first_block & pos, 1.0, -1.0)


def _take(tree: Any, start: jax.Array, c: int) -> Any:
  return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, c), tree)


def _put(tree: Any, part: Any, start: jax.Array) -> Any:
  return jax.tree.map(lambda a, p: jax.lax.dynamic_update_slice_in_dim(a, p, start, 0), tree, part)


def _forward(fn: LogitsFn, size: int, chunk: int, sigmoid: bool, img, txt, theta):
  """One turn of the ring, each held block scored `chunk` captions at a time: per image the
  log-sum-exp (or summed sigmoid loss) and argmax; per caption the same, travelling."""
  b = img.shape[0]
  c = _chunk_size(b, chunk)
  me = jax.lax.axis_index(sharding.BATCH_AXES)
  neg_inf = jnp.full((b,), -jnp.inf, jnp.float32)
  first = {"best": neg_inf, "arg": jnp.full((b,), jnp.iinfo(jnp.int32).max, jnp.int32)}
  stats = (
    {"acc": jnp.zeros((b,), jnp.float32)}
    if sigmoid
    else {"max": neg_inf, "sum": jnp.zeros((b,), jnp.float32)}
  )

  def score(k, block, j, rows, cols):
    logits = fn(img, _take(block, j * c, c), theta)  # [b, c]
    part = _take(cols, j * c, c)
    source = (me - k) % size  # whose captions `block` holds
    r_best = _better(
      logits.max(1), logits.argmax(1) + source * b + j * c, rows["best"], rows["arg"]
    )
    c_best = _better(logits.max(0), logits.argmax(0) + me * b, part["best"], part["arg"])
    if sigmoid:
      signs = _signs(k == 0, b, c, j)
      rows = {"acc": rows["acc"] - jax.nn.log_sigmoid(signs * logits).sum(1)}
      part = {}
    else:
      rows, part = _online_lse(rows, logits, 1), _online_lse(part, logits, 0)
    return (
      {**rows, "best": r_best[0], "arg": r_best[1]},
      _put(cols, {**part, "best": c_best[0], "arg": c_best[1]}, j * c),
    )

  def step(k, carry):
    rows, (block, cols) = carry
    upcoming = _shift(block, size)  # in flight while this block is scored
    rows, cols = jax.lax.fori_loop(0, b // c, lambda j, rc: score(k, block, j, *rc), (rows, cols))
    return rows, (upcoming, _shift(cols, size))

  start = (_vary({**first, **stats}), (txt, _vary({**first, **({} if sigmoid else stats)})))
  rows, (_, cols) = jax.lax.fori_loop(0, size, step, start)
  if sigmoid:
    return rows["acc"], jnp.zeros_like(rows["acc"]), rows["arg"], cols["arg"]
  lse = lambda s: s["max"] + jnp.log(s["sum"])
  return lse(rows), lse(cols), rows["arg"], cols["arg"]


def _online_lse(state: dict, logits: jax.Array, axis: int) -> dict:
  new_max = jnp.maximum(state["max"], logits.max(axis))
  expand = (lambda v: v[:, None]) if axis == 1 else (lambda v: v[None, :])
  total = state["sum"] * jnp.exp(state["max"] - new_max) + jnp.exp(logits - expand(new_max)).sum(
    axis
  )
  return {"max": new_max, "sum": total}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _ring(fn, size, chunk, sigmoid, img, txt, theta):
  return _forward(fn, size, chunk, sigmoid, img, txt, theta)


def _ring_fwd(fn, size, chunk, sigmoid, img, txt, theta):
  out = _forward(fn, size, chunk, sigmoid, img, txt, theta)
  return out, (img, txt, theta, out[0], out[1])


def _ring_bwd(fn, size, chunk, sigmoid, residuals, cotangents):
  """The ring again: each chunk's logits recomputed, their cotangent pulled back through `fn`;
  the caption-side gradients travel with their block and are home after the turn."""
  img, txt, theta, row_out, col_out = residuals
  g_row, g_col = cotangents[0], cotangents[1]
  b = img.shape[0]
  c = _chunk_size(b, chunk)

  def pull(k, j, carry):
    d_img, d_theta, (block, d_block, col_lse, g_c) = carry
    logits, back = jax.vjp(fn, img, _take(block, j * c, c), theta)
    if sigmoid:
      signs = _signs(k == 0, b, c, j)
      d_logits = g_row[:, None] * (-signs * jax.nn.sigmoid(-signs * logits))
    else:
      lse_c, g_cc = _take((col_lse, g_c), j * c, c)
      d_logits = g_row[:, None] * jnp.exp(logits - row_out[:, None]) + g_cc[None, :] * jnp.exp(
        logits - lse_c[None, :]
      )
    di, db, dt = back(d_logits)
    d_part = jax.tree.map(jnp.add, _take(d_block, j * c, c), db)
    return (
      d_img + di,
      jax.tree.map(jnp.add, d_theta, dt),
      (block, _put(d_block, d_part, j * c), col_lse, g_c),
    )

  def step(k, carry):
    d_img, d_theta, travel = jax.lax.fori_loop(0, b // c, lambda j, cr: pull(k, j, cr), carry)
    return d_img, d_theta, _shift(travel, size)

  start = _vary(
    (
      jnp.zeros_like(img),
      jax.tree.map(jnp.zeros_like, theta),
      (txt, jax.tree.map(jnp.zeros_like, txt), col_out, g_col),
    )
  )
  d_img, d_theta, (_, d_txt, _, _) = jax.lax.fori_loop(0, size, step, start)
  return d_img, d_txt, d_theta


_ring.defvjp(_ring_fwd, _ring_bwd)


def _run(fn: LogitsFn, img: jax.Array, txt: Any, theta: Any, chunk: int, sigmoid: bool):
  size = _ring_size()
  rows = P(sharding.BATCH_AXES)

  def local(img, txt, theta):
    # theta is the same on every device; its gradient is the sum of every device's part.
    return _ring(fn, size, chunk, sigmoid, img, txt, _vary(theta))

  mapped = jax.shard_map(
    local,
    in_specs=(rows, jax.tree.map(lambda _: rows, txt), jax.tree.map(lambda _: P(), theta)),
    out_specs=(rows,) * 4,
  )
  row_out, col_out, row_arg, col_arg = mapped(img, txt, theta)
  labels = jnp.arange(img.shape[0])
  return row_out, col_out, {"i2t_correct": row_arg == labels, "t2i_correct": col_arg == labels}


def softmax_stats(fn: LogitsFn, img: jax.Array, txt: Any, theta: Any, chunk: int = CHUNK) -> Stats:
  """Row and column log-sum-exps, the diagonal, and top-1 hits of logits fn(img, txt, theta)."""
  row_lse, col_lse, hits = _run(fn, img, txt, theta, chunk, sigmoid=False)
  pair = lambda i, t: fn(i[None], jax.tree.map(lambda a: a[None], t), theta)[0, 0]
  return {"row_lse": row_lse, "col_lse": col_lse, "diag": jax.vmap(pair)(img, txt), **hits}


def sigmoid_stats(fn: LogitsFn, img: jax.Array, txt: Any, theta: Any, chunk: int = CHUNK) -> Stats:
  """Per image, the SigLIP loss summed over every caption, and top-1 hits."""
  row_loss, _, hits = _run(fn, img, txt, theta, chunk, sigmoid=True)
  return {"row_loss": row_loss, **hits}
