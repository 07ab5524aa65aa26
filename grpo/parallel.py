"""How a policy worker's model is distributed: DDP or FSDP2, mixed precision, collectives, sharded checkpoints.

Everything here runs under plain `torch.distributed` (Ray Train only creates the process group), so the
GPU check (bench/gpu_check.py) and the CPU tests (gloo) use the same code as a Ray run:

- `Collectives`: every cross-rank reduction of counts and metrics goes through it, with the tensor on the
  worker's device. NCCL, the backend Ray Train picks on GPUs, reduces only CUDA tensors: a CPU tensor in
  an all_reduce fails a GPU run at its first step.
- `wrap_policy`: fp32 master weights always; activation checkpointing per decoder layer when asked. DDP computes under bf16 autocast when `dtype` is bfloat16;
  FSDP2 shards every decoder layer and the root (`fully_shard`) and computes in bf16 with fp32
  gradient reduction (`MixedPrecisionPolicy`), so AdamW's state and the update stay fp32 and an lr of
  1e-6 does not round away. FSDP2 gradients stay sharded through accumulation (`no_grad_sync`).
- `shard`: FSDP2 units per decoder layer and the root, for the policy and the frozen KL reference.
- `full_state_dict`: the unsharded weights on rank 0 (the Hugging Face export).
- `weight_buckets`: the weights for the rollout side, gathered one tensor at a time into bounded buckets;
  `save_hf` writes them as a checkpoint's Hugging Face safetensors, one file at a time.
- `save_sharded` / `load_sharded`: model and optimizer with `torch.distributed.checkpoint`, each rank
  writing its own shard; the same files load into any world size.

Not here: the loss, the update's micro-batching (grpo.learner), Ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

SHARDS_DIR = "dcp"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Collectives:
    """Sums and maxima across the policy workers, with every tensor on `device` (the worker's)."""

    def __init__(self, device: torch.device):
        self.device = device

    def _reduce(self, values: list[float], op: Any) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # (K,)
        if _distributed():
            dist.all_reduce(t, op=op)
        return t.cpu().tolist()

    def sum(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        return self._reduce(values, dist.ReduceOp.MAX)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one (HF causal LMs keep them at `model.layers`; a PEFT model
    keeps the HF model under it, with the adapter's modules inside its layers)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers at .model.layers to shard")
    return list(layers)


def wrap_policy(model: nn.Module, *, strategy: str, dtype: str, device: torch.device,
                activation_checkpointing: bool = False) -> nn.Module:
    """The trainable policy on `device`, fp32, wrapped for `strategy` ("ddp" or "fsdp"). With
    `activation_checkpointing` each decoder layer keeps only its input for the backward and recomputes the
    rest (non-reentrant, so it composes with DDP, FSDP2 and PEFT)."""
    model = model.to(dtype=torch.float32)  # master weights; bf16 is only the compute dtype
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    world = dist.get_world_size() if _distributed() else 1
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16" \
            else MixedPrecisionPolicy()
        return shard(model, device=device, mp_policy=mp)
    model = model.to(device)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def shard(model: nn.Module, *, device: torch.device, mp_policy: Any = None) -> nn.Module:
    """FSDP2 over all ranks: every decoder layer its own unit (each gathers only its own weights, so the
    working set is a layer or two), then the root (embeddings, final norm, head). fully_shard moves each layer
    to the device as it shards it, so the device never holds the whole model; a model on the meta device
    (grpo.loading) stays there, sharded, until `loading.materialize` allocates the shards. The frozen KL
    reference goes through here too, without a mixed-precision policy (it is stored in the compute dtype)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size() if _distributed() else 1
    mesh = init_device_mesh(device.type, (world,))
    kw = {"mesh": mesh} | ({"mp_policy": mp_policy} if mp_policy is not None else {})
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """HF's per-layer activation checkpointing, non-reentrant (transformers 5 renamed the method)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def activation_checkpointing_on(model: nn.Module) -> bool:
    model = unwrap(model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def compute_context(model: nn.Module, *, dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 compute for a DDP (or single) policy: autocast. FSDP2 casts by its own policy, so nothing."""
    if dtype != "bfloat16" or is_fsdp(model):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model under a DDP wrapper (FSDP2 has none: the model is its own root)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient reduction of this backward (all but the last micro-batch of a step) under DDP.
    FSDP2 reduce-scatters every micro-batch instead: skipping it would keep the unsharded fp32 gradient of the
    whole model on every rank until the step ends (4 bytes a parameter: 28 GB at 7B), where reducing keeps
    only this rank's shard. The cost is one reduce-scatter per micro-batch, which overlaps the backward."""
    if not enabled or is_fsdp(model):
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip by the global gradient norm and return it (0 turns clipping off, the norm is still measured).
    Under DDP the gradients are already all-reduced, so the local norm is the global one; under FSDP2 they
    are DTensor shards and the norm is reduced across ranks."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: nn.Module, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The full, unsharded weights on the CPU of rank 0 (every rank must call this: FSDP2 gathers; the others
    take part in each gather and keep nothing). `dtype` casts floating tensors, e.g. bf16 copies."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=_distributed()))
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()
    return out


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """`src`'s weights into `dst` (the KL reference after a warm-up), shard by shard: both have the same
    structure and sharding, so nothing is gathered; cast to `dst`'s dtype."""
    for m in (*unwrap(dst).modules(), *unwrap(src).modules()):
        if is_fsdp(m):  # the root stays unsharded after a forward without backward: shards again first
            m.reshard()
    pairs = zip(unwrap(dst).named_parameters(), unwrap(src).named_parameters(), strict=True)
    for (n, d), (m, s) in pairs:
        if n != m:
            raise ValueError(f"copy_weights: {n} is not {m}")
        (d.to_local() if hasattr(d, "to_local") else d).copy_(s.to_local() if hasattr(s, "to_local") else s)


def weight_buckets(model: nn.Module, *, dtype: torch.dtype, bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """The model's full weights on the CPU in `dtype`, in buckets of about `bucket_bytes` (a tensor larger
    than that travels alone). Under FSDP2 every rank must run the iterator to its end: each tensor is gathered
    from the shards when its turn comes, so no rank ever holds more than one full tensor and (rank 0) one
    bucket; the other ranks take part in the gathers and yield nothing. Under DDP rank 0 reads its own copy.
    A tied weight goes once (the receiver's copy is tied the same way)."""
    rank = dist.get_rank() if _distributed() else 0
    if rank != 0 and not is_fsdp(model):
        return
    bucket: dict[str, torch.Tensor] = {}
    size, seen = 0, set()
    for name, t in unwrap(model).state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tied weight (the head is the input embedding): sent once, under its first name
            continue
        seen.add(id(t))
        t = t.detach()
        gathered = hasattr(t, "full_tensor")
        if gathered:  # a DTensor shard: all ranks gather it together, into a new tensor
            t = t.full_tensor()
        if rank != 0:
            continue
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)  # cast where it lives (halves a device-to-host copy to bf16): a new tensor
        elif not gathered and t.device.type == "cpu":
            t = t.clone()  # a snapshot, not a view of the live weights
        t = t.cpu()
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = t
        size += nbytes
    if bucket:
        yield bucket


def save_hf(model: nn.Module, path: Path | None, *, dtype: torch.dtype = torch.float32,
            shard_bytes: int = 2 << 30) -> None:
    """The model as a Hugging Face directory at `path` (rank 0; the other ranks pass None): config.json,
    generation_config.json and safetensors files of at most about `shard_bytes` each, written one at a time as
    `weight_buckets` gathers them, so rank 0 holds one file's tensors, never the whole model (the plain
    `save_pretrained(state_dict=...)` needs the whole fp32 state dict in rank 0's memory: 28 GiB at 7B).
    Several files get HF's names (model-00001-of-00003.safetensors) and an index. Every rank must call this
    under FSDP2 (the gathers)."""
    import json

    from safetensors.torch import save_file

    files: list[tuple[Path, list[str]]] = []
    total = 0
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    for i, bucket in enumerate(weight_buckets(model, dtype=dtype, bucket_bytes=shard_bytes)):
        if path is None:  # weight_buckets yields nothing on ranks > 0; they only take part in the gathers
            continue
        f = path / f"part-{i:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in bucket.items()}, str(f), metadata={"format": "pt"})
        files.append((f, list(bucket)))
        total += sum(v.numel() * v.element_size() for v in bucket.values())
        del bucket
    if path is None:
        return
    hf = unwrap(model)
    hf.config.save_pretrained(path)
    if getattr(hf, "generation_config", None) is not None and hf.can_generate():
        hf.generation_config.save_pretrained(path)
    if len(files) == 1:
        files[0][0].rename(path / "model.safetensors")
        return
    weight_map = {}
    for i, (f, names) in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        f.rename(path / name)
        weight_map |= dict.fromkeys(names, name)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def pack_bucket(bucket: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """A bucket as raw bytes for the object store: {name: (uint8 array, dtype name, shape)}. Ray stores numpy
    arrays out of band, so the board re-puts and the rollout actors read them without unpickling a copy (a
    torch tensor would be pickled, copied at every hop); bf16 has no numpy dtype, hence the bytes."""
    out = {}
    for k, t in bucket.items():
        t = t.detach().contiguous()
        out[k] = (t.view(torch.uint8).reshape(-1).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))
    return out


def unpack_bucket(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of `pack_bucket`'s output, as views of its (read-only) buffers: copy them before writing."""
    import warnings

    out = {}
    for k, v in packed.items():
        if isinstance(v, torch.Tensor):  # an unpacked state dict passes through
            out[k] = v
            continue
        raw, dtype, shape = v
        with warnings.catch_warnings():  # the object store's buffer is read-only; load_state_dict only reads it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(raw)
        out[k] = t.view(getattr(torch, dtype)).reshape(shape)
    return out


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Model and optimizer, each rank its own shard under `path/dcp` (rank 0 adds the metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path / SHARDS_DIR))


def has_shards(path: Path) -> bool:
    return (path / SHARDS_DIR / ".metadata").is_file()


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restore what `save_sharded` wrote into an already wrapped model and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path / SHARDS_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def read_sharded(path: Path) -> dict[str, Any]:
    """A sharded checkpoint as one plain state dict {"model": ..., "optim": ...}, in one process without
    a process group (inspection and tests)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(path / SHARDS_DIR), f"{tmp}/full.pt")
        return torch.load(f"{tmp}/full.pt", weights_only=False)
