"""Rollout: batched sampling of G completions per prompt with a KV cache.

`RolloutWorker` is an ordinary class (unit-testable without Ray); the engine makes it a Ray actor
where it builds the run (`ray.remote(...)(RolloutWorker)`). It holds one copy of the policy for
sampling, returns token ids, the sampling log-probs and finish reasons, and swaps in new weights
when the trainer publishes a new policy version.

Not covered here: scoring (grpo.rewards) and the policy update (grpo.learner).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from grpo.parallel import unpack_bucket
from grpo.sampling import Prompt, PromptFormat, Rollout, left_pad, position_ids, sample_token, stop_token_ids


class RolloutWorker:
    """Holds the policy for sampling; one per rollout actor."""

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        dtype: str = "float32",
        device: str | None = None,
        torch_threads: int = 1,
        max_prompt_tokens: int = 256,
        weight_board=None,
        chat_template: bool | None = None,
        lora: dict | None = None,
    ):
        """`lora` (GRPOConfig.lora_config()): the policy trains a LoRA adapter, so this copy carries the same
        adapter on the same base and `load_weights` receives only the adapter's tensors."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from grpo.storage import local_copy

        model, tokenizer = local_copy(model), local_copy(tokenizer) if tokenizer else None  # a URL: this node's copy
        torch.set_num_threads(torch_threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).to(self.device)
        self.lora = lora is not None
        if lora is not None:
            from grpo.lora import add_adapter

            self.model = add_adapter(self.model, lora)
        self.model.eval()
        # Prompts through the chat template where the tokenizer has one (chat_template None), and every stop
        # token the model lists (generation_config: e.g. <|im_end|> and <|endoftext|>), not only the tokenizer's.
        self.format = PromptFormat(self.tokenizer, chat_template)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
        self._stop = torch.tensor(self.stop_ids, device=self.device)
        self.eos_id = self.stop_ids[0]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.max_prompt_tokens = max_prompt_tokens
        self.version = 0
        # Where a restarted or lagging worker pulls the latest published weights (a WeightBoard actor).
        self.weight_board = weight_board

    # ---- weights ---------------------------------------------------------------------------------
    def load_weights(self, weights: dict[str, Tensor] | list, version: int) -> int:
        """Copy published weights into the sampling model in place; returns the version now held. `weights` is a
        state dict, or a list of object-store references to buckets of one (the trainer's publish), which are
        fetched and copied one at a time: this process never holds more than one bucket besides its model."""
        loaded: set[str] = set()
        unexpected: list[str] = []
        buckets = [weights] if isinstance(weights, dict) else weights
        for bucket in buckets:
            if not isinstance(bucket, dict):
                import ray

                bucket = ray.get(bucket)
            bucket = unpack_bucket(bucket)  # views of the object store's bytes, copied into the model here
            with torch.no_grad():
                result = self.model.load_state_dict(bucket, strict=False)
            unexpected += result.unexpected_keys
            loaded.update(bucket)
            del bucket
        # a tied weight arrives under one of its names: the others share its storage
        by_storage: dict[int, list[str]] = {}
        for k, v in self.model.state_dict().items():
            by_storage.setdefault(v.data_ptr(), []).append(k)
        missing = [k for names in by_storage.values() if not loaded.intersection(names) for k in names]
        # full weights must cover the model; an adapter (LoRA) must cover the adapter and leaves the base alone
        lacking = [k for k in missing if "rotary" not in k and (not self.lora or "lora_" in k)]
        if unexpected or lacking:
            raise ValueError(f"weights do not fit the rollout model: missing={lacking[:3]} unexpected={unexpected[:3]}")
        self.version = version
        return version

    def set_stop_ids(self, ids: list[int]) -> None:
        """The tokens that end a completion (default: every stop token the model lists); [] decodes every row
        to max_new_tokens (benchmarks)."""
        self.stop_ids = list(ids)
        self._stop = torch.tensor(self.stop_ids or [-1], device=self.device)  # -1: no token id matches

    def pull_weights(self, min_version: int) -> int:
        if self.weight_board is None:
            raise RuntimeError(f"rollout worker holds version {self.version}, {min_version} needed, no weight board")
        import ray

        version, refs = ray.get(self.weight_board.latest.remote())
        if version < min_version:
            raise RuntimeError(f"weight board has version {version}, {min_version} needed")
        return self.load_weights(refs, version)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def get_version(self) -> int:
        return self.version

    def ping(self) -> int:
        import os

        return os.getpid()

    # ---- multi-turn agents (grpo.agents.episodes) ------------------------------------------------------
    def generate_agent(self, samples: list, *, settings, group_size: int, temperature: float = 1.0,
                       top_p: float = 1.0, seed: int | None = None, min_version: int = 0,
                       forced: list[list[str]] | None = None):
        """Play `group_size` trajectories per sample against fresh environments, up to
        `settings.concurrency` at once, their turns generated as one batch. -> multiturn.AgentRollout.
        `forced` plays given actions instead of sampling (the supervised warm-up's demonstrations)."""
        import asyncio

        from grpo.agents import episodes as mt
        if min_version > self.version:
            self.pull_weights(min_version)
        t0 = time.perf_counter()
        if getattr(self, "_turns", None) is None:
            self._turns = mt.TurnGenerator(self.model, self.tokenizer, pad_id=self.pad_id, eos_ids=self.stop_ids,
                                           device=self.device)
        fmt = mt.TurnFormat(self.tokenizer, chat=settings.chat_template)
        with torch.inference_mode():
            trajs, gen_s = asyncio.run(mt.run_episodes(
                samples, group_size=group_size, make_env=settings.make_env, generate=self._turns,
                tokenizer=self.tokenizer, fmt=fmt, max_steps=settings.max_steps,
                max_new_tokens=settings.max_new_tokens, max_total_tokens=settings.max_total_tokens,
                max_prompt_tokens=self.max_prompt_tokens, temperature=temperature, top_p=top_p, seed=seed,
                concurrency=settings.concurrency, step_timeout_s=settings.step_timeout_s, shaping=settings.shaping,
                forced=forced,
            ))
        ro = mt.to_rollout(trajs, group_size=group_size, pad_id=self.pad_id, version=self.version,
                           gen_seconds=gen_s, tokenizer=self.tokenizer)
        ro.meta["wall_seconds"] = time.perf_counter() - t0
        return ro

    # ---- sampling --------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[Prompt]) -> list[list[int]]:
        """Prompts (text or messages) as input ids through `self.format`, cut to the last max_prompt_tokens."""
        return [self.format.ids(p)[-self.max_prompt_tokens :] for p in prompts]

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[Prompt] | None,
        *,
        group_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_version: int = 0,
        prompt_ids: list[list[int]] | None = None,
        compact: bool = True,
        sync_every: int | None = None,
    ) -> Rollout:
        """Sample `group_size` completions for each prompt (or each of `prompt_ids`, already tokenized).

        `min_version` lets a caller insist on a policy at least that new: a worker that holds an
        older one (it was restarted and came back with the initial weights, or missed a publish)
        pulls the latest from the weight board first.

        Rows that have stopped leave the decode batch (`compact`; their KV-cache rows are dropped) once an
        eighth of the batch has stopped, so the model runs on the rows still sampling. The loop reads the
        device's state (which rows are alive) once every `sync_every` tokens (default: every token on the CPU,
        where reading costs nothing, every 4 on an accelerator, where each read stalls the launch queue), and
        never between. What is sampled does not depend on either: tokens are drawn over the full batch's rows
        (a stopped row's draw is thrown away), so a seed gives the same completions compacted or not.
        """
        if min_version > self.version:
            self.pull_weights(min_version)
        t0 = time.perf_counter()
        gen = None
        if seed is not None and temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        if prompt_ids is None:
            prompt_ids = self.encode_prompts(prompts)
        else:
            prompt_ids = [list(p)[-self.max_prompt_tokens :] for p in prompt_ids]
        ids, mask = left_pad(prompt_ids, self.pad_id)  # (P, Lp)
        ids, mask = ids.to(self.device), mask.to(self.device)
        n = len(prompt_ids) * group_size

        # 1. prefill each prompt once, then copy its KV cache to the G members of its group
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        cache = out.past_key_values
        cache.batch_repeat_interleave(group_size)
        logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)  # (N, V)
        attn = mask.repeat_interleave(group_size, dim=0)  # (N, Lp)
        pos = position_ids(attn)[:, -1]  # (N,)

        # 2. decode one token a step. `rows` maps the decode batch to the full batch's rows: stopped rows feed pad
        # (masked out) until the next read of `alive` drops them from the batch and the cache.
        tokens = torch.full((n, max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)  # (N, L)
        logps = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=self.device)  # (N, L)
        alive = torch.ones(n, dtype=torch.bool, device=self.device)  # (N,)
        live = torch.zeros((n, max_new_tokens), dtype=torch.bool, device=self.device)  # (N, L)
        rows = torch.arange(n, device=self.device)  # (B,) full-batch row of each decode row, B <= N
        every = sync_every or (1 if self.device.type == "cpu" else 4)
        steps = 0
        for t in range(max_new_tokens):
            full = logits if len(rows) == n else logits.new_zeros((n, logits.shape[-1])).index_copy_(0, rows, logits)
            tok, lp = sample_token(full, temperature, top_p, gen)  # (N,), (N,) drawn over all N rows
            tok = torch.where(alive, tok, self.pad_id)
            tokens[:, t], logps[:, t], live[:, t] = tok, torch.where(alive, lp, 0.0), alive
            alive = alive & ~torch.isin(tok, self._stop)
            steps = t + 1
            if t == max_new_tokens - 1:
                break
            if (t + 1) % every == 0:  # the one read of the device's state in `every` tokens
                keep = alive[rows]  # (B,)
                still = int(keep.sum())
                if still == 0:
                    break
                if compact and len(rows) - still >= max(1, len(rows) // 8):
                    idx = keep.nonzero().squeeze(-1)  # (B',)
                    cache.batch_select_indices(idx)
                    rows, attn, pos = rows[idx], attn[idx], pos[idx]
            attn = torch.cat([attn, torch.ones((len(rows), 1), dtype=torch.bool, device=self.device)], dim=1)  # (B, T)
            pos = pos + 1
            out = self.model(
                input_ids=tok[rows][:, None], attention_mask=attn, position_ids=pos[:, None],
                past_key_values=cache, use_cache=True,
            )
            logits = out.logits[:, -1]  # (B, V)

        tokens, logps, live = tokens[:, :steps].cpu(), logps[:, :steps].cpu(), live[:, :steps].cpu()
        ended = (torch.isin(tokens, self._stop.cpu()) & live).any(dim=1)
        texts = self.tokenizer.batch_decode(tokens.masked_fill(~live, self.pad_id), skip_special_tokens=True)
        return Rollout(
            prompt_ids=prompt_ids,
            completion_ids=tokens,
            completion_mask=live,
            logprobs=logps,
            finish_reasons=["stop" if e else "length" for e in ended.tolist()],
            texts=texts,
            group_size=group_size,
            version=self.version,
            gen_seconds=time.perf_counter() - t0,
            meta={"pad_id": float(self.pad_id)},
        )
