"""The files of a Hugging Face model directory: `config.json` and safetensors weights.

Only safetensors are read or written (through the `safetensors` library): a
pickle checkpoint (`pytorch_model.bin`) can run arbitrary code when loaded, so
a directory that has only those is refused with the command that converts it.

Weights are one `model.safetensors`, or shards named by
`model.safetensors.index.json` (`{"weight_map": {tensor: shard file}}`), the
layout `transformers`' `save_pretrained` writes.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lm.core.errors import HFError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Weight files of other formats, named in the error when they are all a directory has.
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
OTHER_PATTERNS = ("tf_model.h5", "flax_model.msgpack")
# safetensors dtype codes this module reads (each converted to the model's parameter dtype).
SUPPORTED_DTYPES = ("F32", "F16", "BF16")
_CONVERT_COMMAND = (
    "python -c \"from transformers import AutoModelForCausalLM; "
    "AutoModelForCausalLM.from_pretrained('{src}').save_pretrained('{src}-safetensors', safe_serialization=True)\"")




def _first_line(error: BaseException) -> str:
  """An exception's message on one line, shortened (for an HFError's message)."""
  text = " ".join(str(error).split())
  return text if len(text) <= 160 else text[:157] + "..."


def check_directory(directory: str | os.PathLike) -> Path:
  """The directory as a Path; HFError if it is empty, does not exist or is not a directory."""
  if not str(directory).strip():  # Path("") would quietly mean the current directory
    raise HFError("hf: names no directory. Fix: --config.init_from=hf:PATH, the folder holding config.json and "
                  "*.safetensors.")
  path = Path(directory).expanduser()  # hf:~/models/x reaches us unexpanded (the shell expands only a leading ~)
  if not path.exists():
    raise HFError(f"Hugging Face directory {str(path)!r} does not exist. Fix: point hf:DIR at a local folder "
                  "holding config.json and *.safetensors (e.g. one written by save_pretrained); lm never downloads.")
  if not path.is_dir():
    raise HFError(f"{str(path)!r} is a file, not a Hugging Face model directory. Fix: point hf:DIR at the folder "
                  "that holds config.json and the .safetensors weights.")
  return path


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
  """`DIR/config.json` as a dict; HFError if the directory or file is missing or not a JSON object."""
  path = check_directory(directory) / CONFIG_FILE
  if not path.is_file():
    raise HFError(f"{path} does not exist: a Hugging Face model directory needs its config.json. Fix: copy the "
                  "model's config.json beside its weights (save_pretrained writes both).")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, RecursionError) as error:  # also UTF-8 and JSON errors, huge integers, deep nesting
    raise HFError(f"{path} is not valid JSON ({_first_line(error)}). Fix: restore the model's original "
                  "config.json.") from None
  if not isinstance(config, dict):
    raise HFError(f"{path} holds a {type(config).__name__}, not a JSON object. Fix: restore the model's config.json.")
  return config


def _weight_files(directory: Path) -> tuple[dict[str, Path] | None, list[Path], Path]:
  """(tensor -> file from the index, or None; the weight files; the file errors should name)."""
  index_path = directory / INDEX_FILE
  if index_path.is_file():
    try:
      weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
      if not isinstance(weight_map, dict):
        raise TypeError("weight_map is not an object")
    except (ValueError, RecursionError, KeyError, TypeError) as error:  # ValueError: also UTF-8 and JSON errors
      raise HFError(f"{index_path} is not a safetensors index ({_first_line(error)}). Fix: restore the index "
                    "save_pretrained wrote, or delete it if the weights are one model.safetensors.") from None
    shards = {name: directory / str(shard) for name, shard in weight_map.items()}
    files = sorted(set(shards.values()))
    for file in files:
      if not file.is_file():
        raise HFError(f"{index_path} names the shard {file.name!r}, which is not in {directory}. Fix: copy every "
                      f"shard the index lists ({len(files)} files) into the directory.")
    return shards, files, index_path
  single = directory / SINGLE_FILE
  if single.is_file():
    return None, [single], single
  pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern)})
  if pickles:
    raise HFError(
        f"{directory} has only pickle weights ({', '.join(pickles)}); lm reads safetensors only, because loading "
        "a pickle can run arbitrary code. Fix: convert them once, in an environment you trust, with "
        + _CONVERT_COMMAND.format(src=directory) + ", and point hf: at the new folder.")
  others = sorted({p.name for pattern in OTHER_PATTERNS for p in directory.glob(pattern)})
  found = f" (found {', '.join(others)}: TensorFlow/Flax weights are not read)" if others else ""
  raise HFError(f"{directory} has no {SINGLE_FILE} and no {INDEX_FILE}{found}. Fix: save the model with "
                "save_pretrained(DIR, safe_serialization=True), or copy its .safetensors files here.")


class WeightFiles:
  """The tensors of a model directory, read lazily, one at a time, through safetensors.

  Use as a context manager (it keeps the files open):

    with WeightFiles(directory) as files:
      array = files.read("model.norm.weight")  # numpy, the file's dtype
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = check_directory(directory)
    shards, files, self.source = _weight_files(self.directory)
    self._stack = contextlib.ExitStack()
    self._handles = {}
    self._file_of: dict[str, Path] = {}
    try:
      for file in files:
        try:
          handle = self._stack.enter_context(safe_open(str(file), framework="np"))
        except Exception as error:  # safetensors raises its own error types for a corrupt header
          raise HFError(f"{file} is not a readable safetensors file ({_first_line(error)}). Fix: re-download or "
                        "re-save the weights.") from None
        self._handles[file] = handle
        for name in handle.keys():
          if shards is None or shards.get(name) == file:
            self._file_of[name] = file
      if shards is not None:
        for name, file in shards.items():
          if name not in self._file_of:
            raise HFError(f"{self.source} says tensor {name!r} is in {file.name}, but that file does not hold "
                          "it. Fix: the shards and the index are from different saves; save the model again.")
    except BaseException:
      self._stack.close()
      raise

  def __enter__(self) -> WeightFiles:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    self._stack.close()

  @property
  def names(self) -> list[str]:
    return sorted(self._file_of)

  def file_of(self, name: str) -> Path:
    return self._file_of[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self._file_of[name]].get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """The safetensors dtype code ("F32", "BF16", ...)."""
    return self._handles[self._file_of[name]].get_slice(name).get_dtype()

  def read(self, name: str) -> np.ndarray:
    """The tensor as a numpy array in its file's dtype (bfloat16 via ml_dtypes)."""
    return self._handles[self._file_of[name]].get_tensor(name)


def write_weights(tensors: dict[str, np.ndarray], directory: Path, max_shard_size: int = 0) -> list[str]:
  """Writes `tensors` as model.safetensors, or shards + index when they pass `max_shard_size` bytes.

  Shards are filled in name order; a tensor larger than `max_shard_size` gets a
  shard of its own. Returns the file names written.
  """
  metadata = {"format": "pt"}  # transformers checks this key before loading a file
  total = sum(array.nbytes for array in tensors.values())
  if max_shard_size <= 0 or total <= max_shard_size:
    save_file({name: np.ascontiguousarray(array) for name, array in tensors.items()}, str(directory / SINGLE_FILE),
              metadata=metadata)
    return [SINGLE_FILE]
  groups: list[list[str]] = [[]]
  size = 0
  for name in sorted(tensors):
    if groups[-1] and size + tensors[name].nbytes > max_shard_size:
      groups.append([])
      size = 0
    groups[-1].append(name)
    size += tensors[name].nbytes
  written, weight_map = [], {}
  for number, names in enumerate(groups, start=1):
    file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
    save_file({name: np.ascontiguousarray(tensors[name]) for name in names}, str(directory / file), metadata=metadata)
    weight_map.update(dict.fromkeys(names, file))
    written.append(file)
  index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
  (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
  return written + [INDEX_FILE]


def write_json(path: Path, value: dict[str, Any]) -> None:
  path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def first_of(values: Iterable[Any]) -> Any:
  """The first value that is not None (None if there is none)."""
  return next((value for value in values if value is not None), None)


class DequantizedFiles:
  """An int8 export's weight files (`export.quantize=int8`) read as float: each int8 tensor NAME comes back as
  NAME x NAME + `suffix` (its per-channel float32 scales, broadcast), and the scale tensors are not listed.

  It has WeightFiles' reading interface (names, shape, dtype, file_of, read, source), so the importers read
  an int8 folder as they read a float one, and get the values the int8 model computes with.
  """

  def __init__(self, files: WeightFiles, suffix: str):
    self.files, self.suffix, self.source = files, suffix, files.source
    present = set(files.names)
    self._scaled = {name for name in present if name + suffix in present}
    self._scales = {name + suffix for name in self._scaled}
    for name in sorted(self._scaled):
      if files.dtype(name) != "I8":
        raise HFError(f"{files.file_of(name)}: {name!r} has scales ({name + suffix!r}) but is {files.dtype(name)}, "
                      "not int8. Fix: export the model again with --config.export.quantize=int8.")

  @property
  def names(self) -> list[str]:
    return [name for name in self.files.names if name not in self._scales]

  def file_of(self, name: str) -> Path:
    return self.files.file_of(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.files.shape(name)

  def dtype(self, name: str) -> str:
    return "F32" if name in self._scaled else self.files.dtype(name)

  def read(self, name: str) -> np.ndarray:
    if name not in self._scaled:
      return self.files.read(name)
    values, scale = self.files.read(name), self.files.read(name + self.suffix)
    try:
      return values.astype(np.float32) * scale.astype(np.float32)
    except ValueError:
      raise HFError(f"{self.files.file_of(name)}: the scales {name + self.suffix!r} {list(scale.shape)} do not "
                    f"broadcast over {name!r} {list(values.shape)}. Fix: export the model again.") from None
