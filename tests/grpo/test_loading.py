"""A sharded policy that never exists whole (grpo.loading): built on the meta device, each rank reading
only its rows of the safetensors files, equal to the model `from_pretrained` loads."""

from __future__ import annotations

import pytest
import torch
from dist_helpers import run_ranks, sharded_load
from transformers import AutoModelForCausalLM

from grpo import loading


def test_the_index_reads_any_rows_of_any_tensor_as_the_file_holds_them(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="200KB")  # several files and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    index = loading.SafetensorsIndex.of(tmp_path)
    assert len({e.file for e in index.values()}) > 1
    assert index.covers(model)
    for name, p in model.named_parameters():
        e = index[name]
        assert e.dtype == torch.bfloat16 and e.shape == tuple(p.shape)
        n = p.shape[0]
        for start, stop in ((0, n), (n // 3, n // 2), (n - 1, n), (n, n)):
            torch.testing.assert_close(e.read_rows(start, stop), p.detach()[start:stop].to(torch.bfloat16),
                                       atol=0, rtol=0, msg=name)


def test_an_index_that_does_not_cover_the_model_is_refused(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert loading.SafetensorsIndex.of(tmp_path) is None  # no safetensors at all
    sd = {k: v for k, v in model.state_dict().items() if "layers.1." not in k}
    model.save_pretrained(tmp_path, state_dict=sd)
    assert not loading.SafetensorsIndex.of(tmp_path).covers(model)


def test_an_empty_model_holds_no_weights_but_real_buffers(tiny_model_dir):
    empty = loading.empty_model(tiny_model_dir, torch.float32)
    assert all(p.device.type == "meta" for p in empty.parameters())
    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    buffers = dict(real.named_buffers())
    assert buffers, "the tiny model has rotary buffers"
    for name, b in empty.named_buffers():
        torch.testing.assert_close(b, buffers[name], msg=name)


@pytest.mark.parametrize("file_dtype", ["float32", "bfloat16"])
def test_two_fsdp_ranks_read_half_the_model_each_and_equal_from_pretrained(tiny_model_dir, tmp_path, file_dtype):
    src = tmp_path / "model"
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, file_dtype))
    plain.save_pretrained(src, max_shard_size="300KB")
    out = tmp_path / "out"
    out.mkdir()
    zero, one = run_ranks(sharded_load, out, str(src), "float32")

    expected = {k: v.float() for k, v in plain.state_dict().items()}
    assert sorted(zero["full"]) == sorted(expected)
    for k, v in expected.items():  # what the ranks hold, gathered, is the checkpoint exactly (cast to fp32)
        torch.testing.assert_close(zero["full"][k], v, atol=0, rtol=0, msg=k)
    total = sum(p.numel() * 4 for p in plain.parameters())
    for r in (zero, one):  # each rank materialised its half, not the whole
        assert abs(r["local_bytes"] - total / 2) <= 0.02 * total
        for name, b in plain.float().named_buffers():
            torch.testing.assert_close(r["buffers"][name], b, msg=name)
    with torch.no_grad():
        want = plain.float()(input_ids=torch.arange(1, 13).reshape(2, 6)).logits
    for r in (zero, one):
        torch.testing.assert_close(r["logits"], want, atol=1e-5, rtol=1e-5)

    # The sharded KL reference: each rank's rows of the checkpoint in bf16; after the warm-up copy it is the
    # moved policy (gathered on rank 0), with nothing gathered to copy it.
    for rank, r in enumerate((zero, one)):
        for name, local in r["ref_before"].items():
            full = expected[name].to(torch.bfloat16)
            chunk = -(-full.shape[0] // 2)
            torch.testing.assert_close(local, full[rank * chunk:(rank + 1) * chunk], atol=0, rtol=0, msg=name)
    for k, v in expected.items():
        if k == "lm_head.weight" and k not in zero["ref_full_after"]:
            continue
        torch.testing.assert_close(zero["ref_full_after"][k], (v + 0.5).to(torch.bfloat16), atol=0, rtol=0, msg=k)


def test_a_lora_policy_under_fsdp2_reads_its_base_by_rows_and_starts_with_a_zero_adapter(tiny_model_dir, tmp_path):
    """LoRA on FSDP2 never holds the whole base on a rank: the adapter goes on the meta model and each rank reads
    its rows of the base under PEFT's names. Gathered, the base is the checkpoint exactly; B is zero and A one
    tensor across the ranks, so the policy computes what the base computes."""
    pytest.importorskip("peft")
    from dist_helpers import lora_sharded_load

    out = tmp_path / "out"
    out.mkdir()
    zero, one = run_ranks(lora_sharded_load, out, tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = plain.state_dict()
    from grpo.loading import base_name

    adapter = {k: v for k, v in zero["full"].items() if "lora_" in k}
    base = {base_name(k): v for k, v in zero["full"].items() if "lora_" not in k}
    assert sorted(base) == sorted(expected)
    for k, v in expected.items():
        torch.testing.assert_close(base[k], v, atol=0, rtol=0, msg=k)
    assert adapter and zero["trainable"] == sorted(k for k in one["trainable"]) and len(zero["trainable"]) == len(adapter)
    assert all(float(v.abs().max()) == 0 for k, v in adapter.items() if "lora_B" in k)
    assert all(float(v.abs().max()) > 0 and v.std() > 0 for k, v in adapter.items() if "lora_A" in k)
    total = sum(v.numel() * 4 for v in zero["full"].values())
    for r in (zero, one):  # each rank materialised about half
        assert abs(r["local_bytes"] - total / 2) <= 0.02 * total
    with torch.no_grad():
        want = plain(input_ids=torch.arange(1, 13).reshape(2, 6)).logits
    for r in (zero, one):
        torch.testing.assert_close(r["logits"], want, atol=1e-5, rtol=1e-5)
