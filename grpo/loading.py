"""A sharded model that never exists whole: its structure on the meta device, each rank's shards read from
the safetensors files by byte range.

Loading a 7B policy the plain way (`from_pretrained`, then `fully_shard`) puts the whole fp32 model, 28 GB,
in the host memory of every rank before any of it is sharded. Here:

- `empty_model(path, dtype)`: the Hugging Face model built from its config.json with every parameter on the
  meta device (no memory, no random init); buffers (the rotary frequencies) are computed for real, since
  they are small and not in the checkpoint.
- `SafetensorsIndex.of(path)`: which file holds each tensor and at which byte offset (the format is an
  8-byte header length, a JSON header, then raw little-endian tensors), or None where the directory has
  no safetensors covering the model (then the caller loads the plain way).
- `sharded(path, dtype, shard, device)`: the three together, as the trainer's policy, its KL reference and a
  session's workers load: empty, sharded, then read; the whole model first only where the directory's
  safetensors do not cover it.
- `materialize(model, device, source)`: after `fully_shard`, allocates this rank's shards on `device`,
  puts the buffers back, and fills each shard from `source` by reading only its own rows (FSDP2 shards
  dimension 0): one slice in host memory at a time, no memory map (mapped pages would count against the
  rank's resident memory until the file closes). Without a source the shards stay uninitialised, for a
  resume that loads its sharded checkpoint over them.

Not here: the sharding itself (grpo.parallel), which strategy to use (grpo.memplan).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """absolute byte offset of the tensor's first element in `file`"""

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dimension 0 (the whole tensor for a scalar), read into a new tensor."""
        if not self.shape:
            start, stop, rest = 0, 1, ()
        else:
            rest = self.shape[1:]
        row = math.prod(rest) * torch.empty((), dtype=self.dtype).element_size()
        n = max(0, stop - start)
        if n == 0 or row == 0:
            return torch.empty((n, *rest) if self.shape else (), dtype=self.dtype)
        buf = bytearray(n * row)
        with open(self.file, "rb") as f:
            f.seek(self.offset + start * row)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{self.file}: truncated tensor data")
        t = torch.frombuffer(buf, dtype=self.dtype)
        return t.reshape((n, *rest)) if self.shape else t.reshape(())


class SafetensorsIndex(dict):
    """{tensor name: Entry} over a Hugging Face directory's `model.safetensors` or its sharded files."""

    @classmethod
    def of(cls, path: Path) -> SafetensorsIndex | None:
        path = Path(path)
        index_file = path / "model.safetensors.index.json"
        if index_file.is_file():
            files = sorted({path / f for f in json.loads(index_file.read_text())["weight_map"].values()})
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            return None
        out = cls()
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if meta["dtype"] not in _DTYPES:
                    return None
                out[name] = Entry(f, _DTYPES[meta["dtype"]], tuple(meta["shape"]), 8 + n + meta["data_offsets"][0])
        return out

    def covers(self, model: nn.Module) -> bool:
        """Every parameter of `model` (a tied one once, under its first name) has a tensor of its shape here."""
        return all(name in self and self[name].shape == tuple(p.shape) for name, p in model.named_parameters())


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is registered; buffers stay real.
    (A layer allocates its weight with torch.empty, which touches no pages, then initialises it: on meta,
    that costs nothing.)"""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_model(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of the Hugging Face directory `path`, parameters on the meta device, in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _rows(p: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """This rank's local tensor of parameter `p` and the rows [start, stop) of the full tensor it holds.
    FSDP2 shards dimension 0 as torch.chunk does: ceil(n / world) rows each, the last ranks fewer or none."""
    if not hasattr(p, "to_local"):
        return p.data, 0, p.shape[0] if p.dim() else 1
    from torch.distributed.tensor import Replicate, Shard

    local = p.to_local()
    (placement,) = p.placements
    if isinstance(placement, Replicate):
        return local, 0, p.shape[0]
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise ValueError(f"unsupported placement {placement} (FSDP2 shards dimension 0)")
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-p.shape[0] // world)
    start = min(rank * chunk, p.shape[0])
    stop = min(start + chunk, p.shape[0])
    if local.shape[0] != stop - start:
        raise ValueError(f"local shard of {tuple(p.shape)} has {local.shape[0]} rows, expected {stop - start}")
    return local, start, stop


def base_name(name: str) -> str:
    """The name a parameter of a PEFT (LoRA) model has in its base model's files: PEFT nests the model under
    `base_model.model.` and keeps each adapted layer's own weight under `base_layer.`."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".")


def _init_adapter(name: str, local: torch.Tensor, shape: tuple[int, ...], start: int, stop: int) -> None:
    """This rank's rows of a fresh LoRA tensor, as PEFT initialises one: B zero (the adapter computes nothing
    yet), A Kaiming-uniform. A is drawn whole from a generator seeded by its name, so the ranks' rows are
    rows of one tensor (A is rank x in_features: small)."""
    import math
    import zlib

    if ".lora_B." in name:
        local.zero_()
        return
    full = torch.empty(shape, dtype=local.dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(shape[1]) if len(shape) > 1 else 1.0  # kaiming_uniform_ with a = sqrt(5)
    full.uniform_(-bound, bound, generator=gen)
    local.copy_(full[start:stop])


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, source: SafetensorsIndex | None) -> None:
    """Allocate the meta parameters of `model` (sharded or not) on `device` and fill them from `source`. A PEFT
    model's base weights are read under their names in the base's files; its LoRA tensors, which no file
    holds, start as PEFT starts them."""
    from grpo.lora import is_adapter_key

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    for name, b in model.named_buffers():  # to_empty replaced them with uninitialised memory too
        if source is not None and base_name(name) in source:
            b.copy_(source[base_name(name)].read_rows(0, b.shape[0] if b.dim() else 1))
        else:
            b.copy_(buffers[name])
    if source is None:
        return
    for name, p in model.named_parameters():
        local, start, stop = _rows(p)
        if not local.numel():
            continue
        if is_adapter_key(name):
            _init_adapter(name, local, tuple(p.shape), start, stop)
        else:
            local.copy_(source[base_name(name)].read_rows(start, stop))


def sharded(path: str | Path, dtype: torch.dtype, shard: Callable[[nn.Module], nn.Module], device: torch.device,
            *, read: bool = True) -> nn.Module:
    """`shard(model)` of the Hugging Face model at `path` in `dtype`, never whole on a rank: built on the meta
    device, sharded, then each rank reads its rows (`read=False`: left uninitialised, for a resume that loads
    its sharded checkpoint over them). A directory whose safetensors do not cover the model
    (pytorch_model.bin, renamed keys, a Hub id) loads whole first, then shards, with a warning."""
    model = empty_model(path, dtype)
    source = SafetensorsIndex.of(Path(path))
    if source is None or not source.covers(model):
        from transformers import AutoModelForCausalLM

        log.warning("%s: no safetensors covering the model; each rank loads it whole before sharding", path)
        return shard(AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype))
    model = shard(model)
    materialize(model, device, source if read else None)
    return model
