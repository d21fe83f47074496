"""Train state, its sharded initialisation, and the jit-compiled train step."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, PartitionSpec as P

from smartclip_jax import flops as flops_lib, losses, memory, optim, sharding
from smartclip_jax.models.vit import PATCH_DROPOUT_RNG

Batch = dict[str, jax.Array]
log = logging.getLogger("smartclip_jax")


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes. Steps with a non-finite loss, gradient or update are counted,
  not applied: `skipped` in all, `skip_streak` in a row now, `max_skip_streak` the longest run."""

  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array
  skip_streak: jax.Array
  max_skip_streak: jax.Array


def dummy_batch(config: ml_collections.ConfigDict, size: int = 1) -> Batch:
  s, length = config.model.vision.image_size, config.model.text.context_length
  return {
    "image": jnp.zeros((size, s, s, 3), jnp.float32),
    "tokens": jnp.zeros((size, length), jnp.int32),
  }


def abstract_params(model: nn.Module, config: ml_collections.ConfigDict) -> Any:
  """Parameter shapes with their logical axis names (flax Partitioned boxes), nothing computed."""
  batch = dummy_batch(config)
  return jax.eval_shape(
    lambda rng: model.init(rng, batch["image"], batch["tokens"])["params"], jax.random.key(0)
  )


def _boxed_state(
  model: nn.Module, tx: optax.GradientTransformation, config: ml_collections.ConfigDict
) -> Callable[[jax.Array], TrainState]:
  """rng -> a fresh state whose parameters, and the optimizer moments `tx.init` makes from
  them, are flax Partitioned boxes carrying their logical axis names (MaxText's way)."""
  batch = dummy_batch(config)

  def create(rng: jax.Array) -> TrainState:
    params = model.init(rng, batch["image"], batch["tokens"])["params"]
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
      step=zero,
      params=params,
      opt_state=tx.init(params),
      skipped=zero,
      skip_streak=zero,
      max_skip_streak=zero,
    )

  return create


def abstract_state(
  model: nn.Module, tx: optax.GradientTransformation, config: ml_collections.ConfigDict, mesh: Mesh
) -> tuple[TrainState, TrainState]:
  """The state as it will live on `mesh`, nothing computed or allocated: (ShapeDtypeStructs
  carrying their shardings, the target of a restore or an ahead-of-time lower; the
  NamedShardings alone). One boxed `eval_shape` gives both: parameters and the moments that
  follow them shard by their logical axes (`sharding.RULES`), counts are replicated."""
  boxed = jax.eval_shape(_boxed_state(model, tx, config), jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    nn.meta.unbox(boxed),
    shardings,
  )
  return abstract, shardings


def state_initializer(
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  shardings: TrainState,
) -> Callable[[int], TrainState]:
  """seed -> random-initialised state, each leaf created directly in its sharding; compiled
  once, for callers that start many runs of one model."""
  boxed = _boxed_state(model, tx, config)
  create = jax.jit(lambda rng: nn.meta.unbox(boxed(rng)), out_shardings=shardings)

  def init(seed: int) -> TrainState:
    with sharding.activate(mesh):
      return create(jax.random.key(seed))

  return init


def init_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  shardings: TrainState,
) -> TrainState:
  """Random-initialised state from `config.seed`, each leaf created directly in its sharding."""
  return state_initializer(model, tx, config, mesh, shardings)(config.seed)


def step_rng(config: ml_collections.ConfigDict, step: jax.Array) -> jax.Array:
  """The randomness of a step's forward pass (patch dropout): a function of the seed and the
  step alone, so a resumed run draws what the killed one would have."""
  return jax.random.fold_in(jax.random.key(config.seed), step)


def forward(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None) -> dict:
  """The towers (and mask net) as the train step runs them: with patch dropout drawn from
  `rng` when the model has it (`model.patch_dropout`)."""
  rngs = {} if rng is None else {PATCH_DROPOUT_RNG: rng}
  return model.apply({"params": params}, batch["image"], batch["tokens"], train=True, rngs=rngs)


def compute_loss(
  model: nn.Module, loss_fn: losses.LossFn, params: Any, batch: Batch, rng: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Forward both towers (and the mask net), then the loss over the global batch."""
  return loss_fn(forward(model, params, batch, rng))


def _split(tree: Any, k: int, groups: int) -> Any:
  """[B, ...] -> [k, B/k, ...], micro-batch i taking the i-th k-th of every device's rows, so
  no example changes device (the batch is split into `groups` contiguous device blocks)."""

  def split(x):
    x = x.reshape(groups, k, x.shape[0] // (groups * k), *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
      x.reshape(k, -1, *x.shape[3:]), P(None, sharding.BATCH_AXES)
    )

  return jax.tree.map(split, tree)


def _merge(tree: Any, groups: int) -> Any:
  """The inverse of `_split`: [k, B/k, ...] -> [B, ...] in the batch's own order."""

  def merge(x):
    k = x.shape[0]
    x = x.reshape(k, groups, -1, *x.shape[2:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x.reshape(-1, *x.shape[3:]), P(sharding.BATCH_AXES))

  return jax.tree.map(merge, tree)


def accumulated_loss_and_grads(
  model: nn.Module,
  loss_fn: losses.LossFn,
  params: Any,
  batch: Batch,
  k: int,
  groups: int,
  trainable: Callable[[Any], Any] = lambda p: p,
  rng: jax.Array | None = None,
):
  """The loss over the whole batch and its exact gradients, at one micro-batch's activations.

  A contrastive loss couples every pair, so summing micro-batch losses would change it. Instead
  (a feature cache): embed all `config.accum_steps` micro-batches without keeping activations,
  take the loss and its gradient with respect to the embeddings over the full batch, then run
  each micro-batch again and pull its slice of that gradient back to the parameters.
  `trainable` marks what takes no gradient (`optim.stop_frozen`); micro-batch i draws its
  patch dropout from `rng` folded with i, the same in both passes.
  """

  def embed(p, mb, i):
    return forward(model, trainable(p), mb, None if rng is None else jax.random.fold_in(rng, i))

  micro = _split(batch, k, groups)
  outs = jax.lax.map(lambda xs: embed(params, *xs), (micro, jnp.arange(k)))
  per_example = {key: v for key, v in outs.items() if v.ndim > 1}
  full = {**{key: v[0] for key, v in outs.items() if v.ndim == 1}, **_merge(per_example, groups)}
  (loss, metrics), d_full = jax.value_and_grad(loss_fn, has_aux=True)(full)
  d_micro = _split({key: d_full[key] for key in per_example}, k, groups)
  d_scalars = {key: v for key, v in d_full.items() if key not in per_example}

  def pull(grads, xs):
    i, mb, d_mb = xs
    _, back = jax.vjp(lambda p: embed(p, mb, i), params)
    # Scale and bias enter the loss once: their cotangent goes with the first micro-batch.
    scalars = jax.tree.map(lambda d: jnp.where(i == 0, d, jnp.zeros_like(d)), d_scalars)
    (g,) = back({**d_mb, **scalars})
    return jax.tree.map(jnp.add, grads, g), None

  grads, _ = jax.lax.scan(
    pull, jax.tree.map(jnp.zeros_like, params), (jnp.arange(k), micro, d_micro)
  )
  return (loss, metrics), grads


def keep_if_finite(
  finite: jax.Array,
  update: Callable[[Any], tuple[Any, jax.Array]],
  state: Any,
  *,
  select: bool,
) -> tuple[Any, jax.Array]:
  """(`update(state)`'s new state, True) when `finite` and the update reports itself finite,
  else (`state` as it was, False): how a non-finite step is skipped. `update` returns the new
  state and whether what it applied was finite (a finite gradient can still give a non-finite
  update, e.g. an optimizer dividing by a second moment of zero).

  `select=True` picks leaf by leaf with `where`, which TPU and GPU XLA fuse into the optimizer's
  elementwise update, where a `cond` costs a parameter-sized buffer. XLA:CPU does not fuse the
  select, and its extra pass over the state costs more than the AdamW update itself, so on CPU
  `select=False` runs one branch of a `cond` instead. Neither is smaller everywhere on TPUs
  (`aot.skip_hint`), hence `config.skip_nonfinite`; the measurements are in
  benchmarks/README.md.
  """
  if select:
    new, ok = update(state)
    take = finite & ok
    return jax.tree.map(lambda a, b: jnp.where(take, a, b), new, state), take

  def checked(old: Any) -> tuple[Any, jax.Array]:
    new, ok = update(old)
    return jax.lax.cond(ok, lambda: new, lambda: old), ok

  return jax.lax.cond(finite, checked, lambda old: (old, jnp.bool_(False)), state)


def jit_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  shardings: TrainState,
):
  """One jit: loss, gradients, update. The state is donated; metrics come back replicated.

  Trace, lower or call it inside `sharding.activate(mesh)` (`make_train_step` does that).
  """
  lrs, loss_fn = optim.schedules(config), losses.make(config)
  groups = sharding.data_parallel_size(mesh)
  select = {"where": True, "cond": False, "auto": mesh.devices.flat[0].platform != "cpu"}[
    config.skip_nonfinite
  ]

  def train_step(state: TrainState, batch: Batch):
    # Frozen parameters (optim.frozen) take no gradient and keep their values bit for bit.
    trainable = lambda p: optim.stop_frozen(p, config)
    rng = step_rng(config, state.step)
    if config.accum_steps > 1:
      (loss, metrics), grads = accumulated_loss_and_grads(
        model, loss_fn, state.params, batch, config.accum_steps, groups, trainable, rng
      )
    else:
      grad_fn = jax.value_and_grad(
        lambda p: compute_loss(model, loss_fn, trainable(p), batch, rng), has_aux=True
      )
      (loss, metrics), grads = grad_fn(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(params_and_opt_state):
      params, opt_state = params_and_opt_state
      updates, opt_state = tx.update(grads, opt_state, params)
      new_params = optim.keep_frozen(optax.apply_updates(params, updates), params, config)
      applied = (new_params, opt_state)
      return applied, jnp.isfinite(optax.global_norm(updates))

    (params, opt_state), finite = keep_if_finite(
      finite, update, (state.params, state.opt_state), select=select
    )
    streak = jnp.where(finite, 0, state.skip_streak + 1)
    new_state = TrainState(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      skipped=state.skipped + (~finite).astype(jnp.int32),
      skip_streak=streak,
      max_skip_streak=jnp.maximum(state.max_skip_streak, streak),
    )
    metrics = {
      **metrics,
      "grad_norm": grad_norm,
      "lr": lrs[optim.TOWER_GROUP](state.step),
      "lr_mask_net": lrs[optim.MASK_GROUP](state.step),
      "skipped_steps": new_state.skipped,
      "max_skip_streak": new_state.max_skip_streak,
    }
    return new_state, metrics

  return jax.jit(
    train_step,
    donate_argnums=0,
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
  )


class CompiledStep:
  """The train step (state, batch) -> (state, metrics), compiled once per batch shape (a cut
  of text padding changes the shape), with XLA's FLOPs per device of the last shape it ran
  (`flops`), for the throughput the trainer logs (flops.py). A program that cannot fit the
  devices' memory stops before it runs (`memory.check_fits`)."""

  def __init__(
    self,
    jitted: Any,
    mesh: Mesh,
    config: ml_collections.ConfigDict,
    compiling: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
  ):
    """`compiling`: a context for the compiles (the trainer's watchdog pauses in it)."""
    self._jitted, self._mesh, self._config = jitted, mesh, config
    self._compiling = compiling
    self._compiled: dict[Any, tuple[jax.stages.Compiled, float]] = {}
    self.flops = 0.0

  def __call__(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    shape = tuple((k, v.shape) for k, v in sorted(batch.items()))
    if shape not in self._compiled:
      log.info("compiling the train step for batch %s", dict(shape))
      start = time.perf_counter()
      with self._compiling(), sharding.activate(self._mesh):
        compiled = self._jitted.lower(state, batch).compile()
      log.info(
        "compiled the train step in %.1f s: %.2f GB per device",
        time.perf_counter() - start,
        memory.step_bytes(compiled)["total"] / memory.GB,
      )
      memory.check_fits(compiled, sharding.local_device(self._mesh), self._config)
      self._compiled[shape] = compiled, flops_lib.compiled_flops(compiled)
    compiled, self.flops = self._compiled[shape]
    return compiled(state, batch)


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  shardings: TrainState,
  compiling: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> CompiledStep:
  """The train step as a callable of (state, batch) -> (state, metrics)."""
  return CompiledStep(jit_train_step(model, tx, config, mesh, shardings), mesh, config, compiling)
