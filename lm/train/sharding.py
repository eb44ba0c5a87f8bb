"""Device mesh and logical-axis sharding.

The mesh has three named axes: `data` (pure data parallel), `fsdp` (data
parallel with parameters and optimizer state sharded, ZeRO-3 style) and
`tensor` (Megatron-style model parallel). Which mesh axes each logical axis of
a parameter or activation lands on is a list of rules from the config, e.g.
`("embed", "fsdp")`: the first rule whose mesh axes are still free wins, so
an activation's `embed` axis stays unsharded when `batch` already took `fsdp`.

Presets (`mesh.preset`) name the three usual strategies; each is nothing but
mesh sizes and rules:
  * `dp`      - data parallel: every device holds all parameters and
                optimizer state; the batch is split over all devices.
  * `fsdp`    - fully sharded data parallel (ZeRO-3): parameters and optimizer
                state are split over all devices along `embed`; XLA gathers
                each layer's weights when it needs them.
  * `fsdp_tp` - FSDP times Megatron-style tensor parallelism: attention
                heads and MLP hidden units are split over `tensor` (column-
                parallel in-projections, row-parallel out-projections), the
                rest as FSDP. `mesh.tensor` sets the tensor-parallel size
                (2 when left at 1).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm.core.errors import MeshError

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]

# Small axes every preset keeps whole: key/value head dims, positions, the layer stack, a VAE's latent
# vector, a classifier's output layer.
_REPLICATED_MODEL_AXES = (("kv", None), ("length", None), ("layers", None), ("latent", None), ("classes", None))


def _rules(embed: str | None, tensor: str | None) -> Rules:
  """Data parallel over data+fsdp; `embed` of every parameter on `embed`; heads, MLP units and vocab on `tensor`."""
  return (("batch", ("data", "fsdp")), ("embed", embed), ("heads", tensor), ("mlp", tensor), ("vocab", tensor)
          ) + _REPLICATED_MODEL_AXES


# config.mesh.rules' default: every mesh axis may shard what it can (fsdp_tp's rules), so the sizes alone
# choose the strategy.
DEFAULT_RULES = _rules("fsdp", "tensor")
PRESETS: dict[str, tuple[dict[str, int], Rules]] = {
    "dp": ({"data": -1, "fsdp": 1, "tensor": 1}, _rules(None, None)),
    "fsdp": ({"data": 1, "fsdp": -1, "tensor": 1}, _rules("fsdp", None)),
    "fsdp_tp": ({"data": 1, "fsdp": -1, "tensor": 2}, DEFAULT_RULES),
}


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Mesh axis sizes from the config; one axis may be -1 ("all remaining devices")."""
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  wildcards = [axis for axis, size in zip(MESH_AXES, sizes) if size == -1]
  bad = [f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes) if size == 0 or size < -1]
  if bad or len(wildcards) > 1:
    raise MeshError(
        f"mesh sizes {dict(zip(MESH_AXES, sizes))} are invalid: each of mesh.data, mesh.fsdp, mesh.tensor "
        "must be a positive integer, and at most one may be -1 (all remaining devices).")
  fixed = math.prod(size for size in sizes if size != -1)
  if wildcards:
    if num_devices % fixed:
      raise MeshError(
          f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} devices: the fixed axes "
          f"multiply to {fixed}. Choose sizes whose product divides {num_devices}.")
    sizes = [num_devices // fixed if size == -1 else size for size in sizes]
  if math.prod(sizes) != num_devices:
    raise MeshError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {num_devices} are "
        f"available ({jax.devices()[0].platform}). Set the sizes so their product is {num_devices}, "
        "or set one of them to -1.")
  return tuple(sizes)  # type: ignore[return-value]


def mesh_settings(mesh_config: Mapping[str, Any]) -> tuple[dict[str, int], Rules]:
  """(mesh sizes, rules) of a `config.mesh`: its preset's, or its own fields when `preset` is empty."""
  preset = mesh_config.get("preset") or ""
  if not preset:
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    return sizes, normalize_rules(mesh_config["rules"])
  if preset not in PRESETS:
    raise MeshError(f"mesh.preset={preset!r} is not one of {sorted(PRESETS)} (or empty for mesh.data/fsdp/"
                    "tensor/rules as set).")
  sizes, rules = PRESETS[preset]
  sizes = dict(sizes)
  if preset == "fsdp_tp" and int(mesh_config.get("tensor", 1)) > 1:
    sizes["tensor"] = int(mesh_config["tensor"])
  return sizes, rules


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` over all devices (or `devices`) with axes ('data', 'fsdp', 'tensor')."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(mesh_config, len(devices))
  try:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Topology-aware placement is only defined for some platforms and shapes;
    # a plain reshape is correct everywhere, just not always optimal.
    device_array = np.asarray(devices).reshape(shape)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(device_array, MESH_AXES, axis_types=auto)


def normalize_rules(rules: Iterable[Sequence[Any]]) -> Rules:
  """Config rules (lists from ConfigDict/CLI) -> hashable tuple of (logical, mesh) pairs."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"mesh.rules entry {rule!r} must be a (logical_axis, mesh_axes) pair.")
    logical, mesh_axes = rule
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    for axis in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"mesh.rules maps {logical!r} to unknown mesh axis {axis!r}; use one of {MESH_AXES}.")
    out.append((logical, mesh_axes))
  return tuple(out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a pytree whose leaves carry logical axis names (flax boxes)."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules, rank: int = 2) -> NamedSharding:
  """Sharding of a [batch, length] input batch (rank 1: [batch]; more: [batch, length, ...] replicated beyond)."""
  names = ("batch", "length")[:rank] + (None,) * max(rank - 2, 0)
  spec = nn.logical_to_mesh_axes(names, rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# What to change when a logical axis does not divide over its mesh axes.
_EVEN_FIXES = {
    "vocab": "set model.vocab_multiple to a multiple of {n} (pads the vocabulary)",
    "heads": "choose model.num_heads (and model.num_kv_heads) divisible by {n}",
    "mlp": "choose model.mlp_dim divisible by {n}",
    "embed": "choose model.width divisible by {n}",
}


def check_even(abstract_params: Any, mesh: Mesh, rules: Rules) -> None:
  """Raises MeshError if a parameter axis does not split evenly over its mesh axes.

  XLA would pad such an axis (wasting memory) and Orbax cannot restore it, so
  it is stopped here with the field to change.
  """
  problems = {}
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    if not isinstance(leaf, nn.Partitioned):
      continue
    mesh_axes = nn.logical_to_mesh_axes(leaf.names, rules)
    for logical, size, axes in zip(leaf.names, leaf.value.shape, mesh_axes):
      axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      count = math.prod(mesh.shape[axis] for axis in axes)
      if count > 1 and size % count:
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        problems.setdefault(logical, (name, size, axes, count))
  if problems:
    details = "; ".join(
        f"{name} axis {logical!r} has {size}, not divisible by {count} ({' x '.join(axes)}): "
        + _EVEN_FIXES.get(logical, "change the mesh sizes or mesh.rules").format(n=count)
        for logical, (name, size, axes, count) in problems.items())
    raise MeshError(f"The parameters do not split evenly over mesh {dict(mesh.shape)}: {details}.")
