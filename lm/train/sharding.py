"""Device mesh and logical-axis sharding.

The mesh has three named axes: `data` (pure data parallel), `fsdp` (data
parallel with parameters and optimizer state sharded, ZeRO-3 style) and
`tensor` (Megatron-style model parallel). Which mesh axes each logical axis of
a parameter or activation lands on is a list of rules from the config, e.g.
`("embed", "fsdp")`: the first rule whose mesh axes are still free wins, so
an activation's `embed` axis stays unsharded when `batch` already took `fsdp`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]


class MeshError(ValueError):
  """The configured mesh does not fit the devices."""


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


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of a [batch, length] input batch."""
  spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
