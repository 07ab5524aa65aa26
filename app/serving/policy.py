"""Serving trained policies: an OpenAI-compatible Ray Serve application per deployed checkpoint.

`PolicyEngine` is an ordinary class (unit-testable without Ray): it holds one HF causal LM and
answers a batch of generation requests with a KV cache, each row with its own `max_tokens`,
`temperature`, `top_p` and stop strings, streaming text deltas through a callback as it decodes.
`PolicyServer` makes it a Serve deployment with dynamic batching (`@serve.batch`, switchable off for
the benchmark), and `PolicyRouter` is the HTTP ingress of one deployed application: `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions` (server-sent events with `"stream": true`), routing
each request to one of its variants by weight (an A/B comparison of two checkpoints) or by the
variant named in `model`.

`build_policy_app` assembles the application; `app.serving.deployments` starts and stops it (models.deploy).
Requests may carry `seed` (each of the n completions its own seeded stream, so batch-mates change nothing),
`logprobs` (completions: the number of alternatives; chat: `logprobs` and `top_logprobs`; not on streams) and
`stop`; chat without `max_tokens` may use the rest of the model's context. Text is detokenised incrementally.
Chat takes `tools` (rendered by the model's template; a reply that ends with a call comes back as
`tool_calls`, non-streaming). Not covered: penalties.
"""


import asyncio
import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from torch import Tensor

log = logging.getLogger("app.serving.policy")

STREAM_ERROR = "\x00error "
"""first item of a PolicyServer stream that could not start: the router turns it into an HTTP error"""
MAX_BATCH_SIZE = 16
"""rows (requests x n) decoded together when batching is on"""
BATCH_WAIT_S = 0.01
"""how long a batch waits for more requests once the first has arrived"""


# ---- the OpenAI request shapes --------------------------------------------------------------------

class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (penalties: 0)
    model: str | None = Field(None, max_length=256)
    """the deployment's name (weighted choice of a variant) or one variant's name"""
    max_tokens: int | None = Field(None, ge=1, le=32_768)
    """completions: 16 when left out (OpenAI's default); chat: the rest of the model's context"""
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, validate_default=True)
    """up to 4 strings that end a completion (not included in it)"""
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    """the same seed, prompt and settings give the same completions (each of the n its own stream)"""

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("at most 4 non-empty stop strings of at most 256 characters")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    """the sampled tokens' log-probs and this many most likely alternatives at each position"""

    @property
    def top_k_logprobs(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = Field(None, max_length=1_000_000)
    """None only on an assistant turn that called tools"""
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=256)

    def turn(self) -> dict[str, Any]:
        """The message as a chat template takes it (tool calls' arguments as objects, as templates expect)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.tool_calls:
            calls = []
            for c in self.tool_calls:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                calls.append({**c, "function": fn})
            out["tool_calls"] = calls
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=32_768)
    """the newer name of max_tokens; wins when both are sent"""
    logprobs: bool = False
    """the sampled tokens' log-probs"""
    tools: list[dict[str, Any]] | None = Field(None, min_length=1, max_length=128)
    """OpenAI function specs, rendered by the model's chat template; a reply that calls one comes back as
    `message.tool_calls` with `finish_reason: "tool_calls"`"""
    tool_choice: str | dict[str, Any] | None = None
    """accepted for compatibility: the model decides (only "auto" behaviour)"""
    top_logprobs: int | None = Field(None, ge=0, le=20)
    """with logprobs: this many most likely alternatives at each position"""

    @property
    def top_k_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs: needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class BadRequest(Exception):
    """A request the policy cannot answer: an OpenAI-style 400 with the field named."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param,
                          "code": self.code}}


def parse_request(kind: str, body: Any) -> CompletionRequest | ChatRequest:
    model = CompletionRequest if kind == "completion" else ChatRequest
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False)[0]
        name = ".".join(str(p) for p in first["loc"]) or "body"
        raise BadRequest(f"{name}: {first['msg']}", param=name) from None


# ---- generation ---------------------------------------------------------------------------------

@dataclass
class GenRequest:
    """One prompt's generation: `n` rows sampled with the same settings."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    n: int = 1
    stop: list[str] = field(default_factory=list)
    on_delta: Callable[[int, str, str | None], None] | None = None
    """called from the generating thread with (choice index, new text, finish reason or None)"""
    seed: int | None = None
    """row j of the request samples from its own generator seeded with (seed, j): batch-mates change nothing"""
    logprobs: int | None = None
    """None: no log-probs; k: each sampled token's log-prob and the k most likely alternatives"""


TokenLogprob = tuple[int, float, list[tuple[int, float]]]
"""(token id, its log-prob, [(alternative id, log-prob)] most likely first)"""


@dataclass
class GenResult:
    texts: list[str]  # n completions
    finish_reasons: list[str]  # n of "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[list[TokenLogprob]] | None = None
    """per completion, per sampled token (the stop token included), when the request asked for them"""


class IncrementalDecoder:
    """Text of a growing token list without decoding it all again at every token: only the tokens since the
    last emitted text are decoded (with a few before them as context, which byte-level and SentencePiece
    tokenizers need to place spaces), and text that ends in a partial UTF-8 character waits for its rest.
    `text` always equals decoding every token pushed so far (once `finish` is called)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self._prefix = self._read = 0  # ids[_prefix:_read] is context already in `text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Add a token; returns the text it completes ("" while a character is still partial)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            delta = now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def finish(self) -> str:
        """Flush what is still held back (a partial character decodes as U+FFFD, as a full decode would)."""
        rest = self._decode(self.ids[self._prefix :])[len(self._decode(self.ids[self._prefix : self._read])) :]
        self._prefix = self._read = len(self.ids)
        self.text += rest
        return rest


def sample_rows(logits: Tensor, temperature: Tensor, top_p: Tensor,
                generators: list[torch.Generator | None] | None = None) -> tuple[Tensor, Tensor]:
    """The engine's one sampling step (grpo.sampling.sample) with each row's own temperature (0: greedy),
    nucleus and seeded generator: tokens (N,) and the tempered log-probs before the nucleus cut (N, V), which
    are what OpenAI's logprobs report."""
    from grpo.sampling import sample

    token, _, logp = sample(logits, temperature, top_p, row_generators=generators)
    return token, logp


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the parameter names and bytes: equal digests mean equal weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class PolicyEngine:
    """One HF causal LM answering batches of generation requests (no Ray here)."""

    def __init__(self, path: str, *, device: str | None = None, torch_threads: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if torch_threads:
            torch.set_num_threads(torch_threads)
        from grpo.storage import local_copy

        self.path = path
        path = local_copy(path)  # a checkpoint at the storage URL: this node's copy
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        from grpo.sampling import stop_token_ids

        # every stop token the model lists (generation_config: e.g. <|im_end|> and <|endoftext|>), not only the
        # tokenizer's eos: an Instruct model ends its turn with a token the tokenizer may not call eos
        self.stop_ids = frozenset(stop_token_ids(self.tokenizer, self.model.generation_config))
        self.eos_id = stop_token_ids(self.tokenizer, self.model.generation_config)[0]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.digest = weights_digest(self.model)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None) -> str:
        """The tokenizer's chat template when it has one (with `tools` where given); otherwise `role: content`
        lines, and tools are refused (nothing would tell the model about them)."""
        turns = [m.turn() for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True,
                                                      **({"tools": tools} if tools else {}))
        if tools:
            raise BadRequest("tools: this model has no chat template to present tools with", param="tools")
        return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"

    def check_fits(self, prompt_ids: list[int], max_tokens: int, param: str) -> None:
        if len(prompt_ids) + max_tokens > self.max_context:
            raise BadRequest(f"{param}: {len(prompt_ids)} prompt tokens + max_tokens {max_tokens} exceed the "
                             f"model's context of {self.max_context} tokens", param=param)

    @torch.inference_mode()
    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        """Decode every row of every request together; a row stops at EOS, a stop string, or its limit."""
        from transformers import DynamicCache

        from grpo.sampling import left_pad, position_ids

        rows = [(r, j) for r in reqs for j in range(r.n)]  # N rows
        n = len(rows)
        dev = self.device
        ids, mask = left_pad([r.prompt_ids or [self.eos_id] for r, _ in rows], self.pad_id)  # (N, Lp)
        ids, mask = ids.to(dev), mask.to(dev)
        temperature = torch.tensor([r.temperature for r, _ in rows], device=dev)  # (N,)
        top_p = torch.tensor([r.top_p for r, _ in rows], device=dev)  # (N,)
        limit = [r.max_tokens for r, _ in rows]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                         past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1]  # (N, V)
        attn, pos = mask, position_ids(mask)[:, -1]  # (N, Lp), (N,)

        # choice j of a seeded request: seed + j * 1000003, so choice 0 draws what the rollout sampler draws
        # for the same seed (grpo.sampling.sampling_generator)
        generators = [None if r.seed is None else
                      torch.Generator(device=dev).manual_seed((r.seed + 1_000_003 * j) % 2**64) for r, j in rows]
        decoders = [IncrementalDecoder(self.tokenizer) for _ in range(n)]
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        sampled = [0] * n  # tokens sampled per row, the EOS included (the usage count)
        texts, sent = [""] * n, [0] * n  # decoded so far; characters already passed to on_delta
        finish: list[str | None] = [None] * n
        for _ in range(max(limit)):
            picked, logp = sample_rows(logits, temperature, top_p, generators)  # (N,), (N, V)
            tok = picked.tolist()
            want = [i for i, (r, _) in enumerate(rows) if r.logprobs is not None and finish[i] is None]
            if want:  # one gather and one top-k for the rows that asked
                k = max(rows[i][0].logprobs for i in want)
                chosen = logp[want].gather(-1, picked[want][:, None]).squeeze(-1).tolist()
                top = logp[want].topk(k, dim=-1) if k else None
                for m, i in enumerate(want):
                    alts = [] if top is None else list(zip(top.indices[m].tolist(), top.values[m].tolist(),
                                                           strict=True))[: rows[i][0].logprobs]
                    logprobs[i].append((tok[i], chosen[m], alts))
            for i, (req, j) in enumerate(rows):
                if finish[i] is not None:
                    continue
                sampled[i] += 1
                dec = decoders[i]
                if tok[i] in self.stop_ids:
                    finish[i] = "stop"
                else:
                    dec.push(tok[i])
                    if len(dec.ids) >= limit[i]:
                        finish[i] = "length"
                if finish[i] is not None:
                    dec.finish()  # a character still partial at the end decodes as a full decode would
                texts[i] = dec.text
                cut = min((texts[i].find(s) for s in req.stop if s in texts[i]), default=-1)
                if cut >= 0:
                    texts[i], finish[i] = texts[i][:cut], "stop"
                self._emit(req, j, i, texts, sent, finish[i])
            if all(f is not None for f in finish):
                break
            # finished rows keep decoding a pad token (cheaper than reshaping the cache), ignored above
            step = torch.tensor([self.pad_id if finish[i] else tok[i] for i in range(n)], device=dev)  # (N,)
            attn = torch.cat([attn, torch.ones((n, 1), dtype=torch.bool, device=dev)], dim=1)  # (N, Lp+step)
            pos = pos + 1
            out = self.model(input_ids=step[:, None], attention_mask=attn, position_ids=pos[:, None],
                             past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]  # (N, V)

        results, i = [], 0
        for req in reqs:
            span = range(i, i + req.n)
            results.append(GenResult(texts=[texts[k] for k in span], finish_reasons=[finish[k] or "length" for k in span],
                                     prompt_tokens=len(req.prompt_ids),
                                     completion_tokens=sum(sampled[k] for k in span),
                                     logprobs=None if req.logprobs is None else [logprobs[k] for k in span]))
            i += req.n
        return results

    @staticmethod
    def _emit(req: GenRequest, j: int, i: int, texts: list[str], sent: list[int], finish: str | None) -> None:
        """Pass on the text that can no longer change: hold back what might begin a stop string, and a
        trailing replacement character (a multi-byte character whose remaining bytes are still to come)."""
        if req.on_delta is None:
            return
        text = texts[i]
        safe = len(text)
        if finish is None:
            hold = max((len(s) - 1 for s in req.stop), default=0)
            safe = max(sent[i], len(text) - hold - (1 if text.endswith("\ufffd") else 0))
        if safe > sent[i] or finish is not None:
            req.on_delta(j, text[sent[i]:safe], finish)
            sent[i] = safe


# ---- the Serve deployments ------------------------------------------------------------------------

def _logprobs(kind: str, tokens: list[TokenLogprob] | None, decode: Callable[[int], str]) -> dict | None:
    """OpenAI's logprobs object: completions' {tokens, token_logprobs, top_logprobs, text_offset}, chat's
    {content: [{token, logprob, bytes, top_logprobs}]}."""
    if tokens is None:
        return None
    if kind == "completion":
        texts = [decode(t) for t, _, _ in tokens]
        offsets = [sum(len(x) for x in texts[:i]) for i in range(len(texts))]
        tops = []
        for _, _, alts in tokens:  # keyed by text, as OpenAI's are: two ids with one text keep the likelier
            top: dict[str, float] = {}
            for a, alp in alts:
                top.setdefault(decode(a), alp)
            tops.append(top)
        return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in tokens], "top_logprobs": tops,
                "text_offset": offsets}

    def entry(t: int, lp: float) -> dict:
        text = decode(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
                        for t, lp, alts in tokens]}


def _tool_call(text: str) -> dict[str, Any] | None:
    """An assistant message with OpenAI `tool_calls` when the text ends with a well-formed call (the tags a
    tool-taking template teaches, `<tool_call>{...}</tool_call>`, or ours); None otherwise."""
    from grpo.agents.environments import TOOL_TAGS, ToolCallError, parse_tool_call

    try:
        call = parse_tool_call(text)
    except ToolCallError:
        return None
    if call is None:
        return None
    before = min(text.index(o) for o, _ in TOOL_TAGS if o in text)
    return {"role": "assistant", "content": text[:before].strip() or None,
            "tool_calls": [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}]}


def _completion_reply(kind: str, rid: str, model: str, results: list[GenResult],
                      decode: Callable[[int], str] = str, tools: bool = False) -> dict:
    choices, index = [], 0
    for res in results:
        for k, (text, reason) in enumerate(zip(res.texts, res.finish_reasons, strict=True)):
            lps = _logprobs(kind, res.logprobs[k] if res.logprobs is not None else None, decode)
            if kind == "completion":
                choices.append({"index": index, "text": text, "logprobs": lps, "finish_reason": reason})
            else:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if tools and (call := _tool_call(text)) is not None:
                    message, reason = call, "tool_calls"
                choices.append({"index": index, "message": message, "logprobs": lps, "finish_reason": reason})
            index += 1
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, ray_actor_options={"num_cpus": 1})
class PolicyServer:
    """One variant of a deployed policy: a model replica with dynamic batching."""

    def __init__(self, name: str, path: str, *, batching: bool = True, max_batch_size: int = MAX_BATCH_SIZE,
                 torch_threads: int | None = None, session_id: str | None = None, lora: dict | None = None):
        self.name, self.batching = name, batching
        self.engine = PolicyEngine(path, torch_threads=torch_threads)
        if lora is not None:  # a LoRA session's adapter, on the base model, updated from the session
            from grpo.lora import add_adapter

            self.engine.model = add_adapter(self.engine.model, lora).eval()
        self._batched.set_max_batch_size(max_batch_size)
        # One generation at a time on the model; with batching on, one generation serves many requests.
        self._lock = asyncio.Lock()
        # Following a training session (grpo.session): before a generation, the session's newest weights.
        self.session_id, self.weights_generation, self._host = session_id, 0, None

    def info(self) -> dict:
        e = self.engine
        if e.digest is None:
            e.digest = weights_digest(e.model)
        return {"name": self.name, "path": e.path, "weights_sha256": e.digest, "device": str(e.device),
                "num_parameters": e.num_parameters, "max_context": e.max_context, "batching": self.batching,
                **({"session_id": self.session_id, "weights_generation": self.weights_generation}
                   if self.session_id else {})}

    async def _follow(self) -> None:
        """Load the session's weights when they changed since the last generation. A session that has ended
        leaves the replica serving the weights it last had."""
        from grpo.session import get_host

        try:
            if self._host is None:
                self._host = get_host(self.session_id)
            if self._host is None:
                return
            generation = (await self._host.status.remote())["generation"]
            if generation == self.weights_generation:
                return
            generation, ref = await self._host.weights_ref.remote()
            state = await ref
        except Exception as e:  # the session closed or its host restarted: keep serving what we have
            self._host = None
            log.warning("policy %s: session %s not reachable (%s); serving the weights of generation %d",
                     self.name, self.session_id, type(e).__name__, self.weights_generation)
            return
        missing, unexpected = await asyncio.to_thread(self.engine.model.load_state_dict, state, strict=False)
        if unexpected:
            raise RuntimeError(f"session weights do not fit the served model: {unexpected[:3]}")
        self.weights_generation, self.engine.digest = generation, None

    async def _run(self, reqs: list[GenRequest]) -> list[GenResult]:
        async with self._lock:
            if self.session_id:
                await self._follow()
            return await asyncio.to_thread(self.engine.generate, reqs)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, reqs: list[GenRequest]) -> list[GenResult]:
        return await self._run(reqs)

    async def _submit(self, req: GenRequest) -> GenResult:
        return await self._batched(req) if self.batching else (await self._run([req]))[0]

    def _requests(self, kind: str, p: CompletionRequest | ChatRequest) -> list[GenRequest]:
        if isinstance(p, ChatRequest):
            prompts, max_tokens = [self.engine.chat_prompt(p.messages, p.tools)], p.max_completion_tokens or p.max_tokens
        else:
            prompts, max_tokens = [p.prompt] if isinstance(p.prompt, str) else p.prompt, p.max_tokens or 16
        top_k = p.top_k_logprobs
        if top_k is not None and p.stream:
            raise BadRequest("logprobs: not available on a stream; ask without stream", param="logprobs")
        reqs = []
        for k, text in enumerate(prompts):
            ids = self.engine.encode(text)
            # chat without a limit: the rest of the model's context, as OpenAI's chat does
            limit = max_tokens or max(1, self.engine.max_context - len(ids))
            self.engine.check_fits(ids, limit, "messages" if kind == "chat" else f"prompt.{k}")
            reqs.append(GenRequest(ids, limit, p.temperature, p.top_p, p.n, p.stop, seed=p.seed, logprobs=top_k))
        return reqs

    async def complete(self, kind: str, body: dict) -> tuple[int, dict]:
        """(HTTP status, OpenAI reply or error) for a non-streaming request."""
        try:
            p = parse_request(kind, body)
            reqs = self._requests(kind, p)
        except BadRequest as e:
            return e.status, e.body()
        results = await asyncio.gather(*(self._submit(r) for r in reqs))
        return 200, _completion_reply(kind, f"cmpl-{uuid.uuid4().hex}", self.name, list(results),
                                      decode=self.engine.token_text, tools=bool(getattr(p, "tools", None)))

    async def stream(self, kind: str, body: dict) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text delta, a final chunk per choice, then `[DONE]`."""
        try:
            p = parse_request(kind, body)
            reqs = self._requests(kind, p)
        except BadRequest as e:  # the router answers it as an HTTP error: the stream never starts
            yield STREAM_ERROR + json.dumps({"status": e.status, "body": e.body()})
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        for k, req in enumerate(reqs):
            base = k * p.n
            req.on_delta = lambda j, text, reason, base=base: loop.call_soon_threadsafe(
                events.put_nowait, (base + j, text, reason))
        rid, created, obj = f"cmpl-{uuid.uuid4().hex}", int(time.time()), (
            "text_completion" if kind == "completion" else "chat.completion.chunk")
        tasks = [asyncio.ensure_future(self._submit(r)) for r in reqs]
        open_choices, started = len(reqs) * p.n, set()
        while open_choices:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait([getter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                failed = [t for t in tasks if t.done() and t.exception() is not None]
                if failed:
                    raise failed[0].exception()
                continue
            index, text, reason = getter.result()
            if kind == "completion":
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
            else:
                delta = {"content": text} if text or reason is None else {}
                if index not in started:
                    delta = {"role": "assistant", **delta}
                    started.add(index)
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": self.name,
                                         "choices": [choice]}) + "\n\n"
            open_choices -= reason is not None
        results = [await t for t in tasks]
        if (p.stream_options or {}).get("include_usage"):
            usage = _completion_reply(kind, rid, self.name, results)["usage"]
            yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": self.name,
                                         "choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"


class VariantSpec(BaseModel):
    """One model behind a deployed name."""

    name: str
    path: str
    """what the replicas load (a server path or a Hub id): never shown to non-admins"""
    source: str | None = None
    """what the deployer named (checkpoint:<id>, weights:..., session:<id>, a Hub id): what replies show"""
    weight: float = Field(1.0, gt=0)
    checkpoint_id: str | None = None
    session_id: str | None = None
    """a training session whose newest weights this variant serves (path: the session's base model)"""
    lora: dict | None = None
    """that session's LoRA settings (the adapter goes on the base model)"""


# Defined before the Serve classes: Serve pickles a deployment's class when it is declared, with the module
# names its methods use as they are at that moment.
async def _read_body(request: Request) -> bytes:
    """The request body, refused past MAX_BODY_BYTES without buffering what is sent beyond it."""
    from app.serving.access import MAX_BODY_BYTES

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(f"body: more than {MAX_BODY_BYTES} bytes", param="body", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"body: more than {MAX_BODY_BYTES} bytes", param="body", status=413)
    return bytes(body)


def _router_app() -> FastAPI:
    return FastAPI(title="raygrpo policy server", docs_url=None, redoc_url=None)


policy_http = _router_app()


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(policy_http)
class PolicyRouter:
    """The HTTP face of one deployed policy: OpenAI routes, weighted choice between variants."""

    def __init__(self, name: str, variants: list[dict], servers: list[Any], gate: str | None = None):
        self.name = name
        self.variants = [VariantSpec.model_validate(v) for v in variants]
        self.servers = dict(zip([v.name for v in self.variants], servers, strict=True))
        self.created = int(time.time())
        self._rng = random.Random()
        self._info: dict[str, dict] = {}
        # The job API application that vets every request (app.serving.access); None only for a policy
        # application built outside the API (benchmarks, tests of the server itself).
        self.gate, self._gate_handle = gate, None

    async def _authorize(self, request: Request) -> tuple[JSONResponse | None, dict[str, str]]:
        """(None, rate-limit headers) when the job API lets this caller call this deployment now, else (the
        HTTP error to answer, {}). Fails closed: no answer from the API is a 503, never an open door."""
        if self.gate is None:
            return None, {}
        from app.serving.access import API_DEPLOYMENT

        try:
            if self._gate_handle is None:
                self._gate_handle = serve.get_deployment_handle(API_DEPLOYMENT, app_name=self.gate)
            verdict = await self._gate_handle.check_policy_call.remote(
                self.name, request.headers.get("authorization"), request.headers.get("x-api-key"))
        except Exception as e:  # the API is down or restarting: refuse, and say to retry
            self._gate_handle = None
            log.warning("policy %s: the job API did not vet a request (%s)", self.name, type(e).__name__)
            return JSONResponse({"error": {"message": "the job API that checks credentials is unavailable; retry",
                                           "type": "api_error", "param": None, "code": None}},
                                status_code=503, headers={"Retry-After": "5"}), {}
        if verdict["status"] != 200:
            return JSONResponse(verdict["body"], status_code=verdict["status"], headers=verdict["headers"]), {}
        return None, verdict["headers"]

    def _pick(self, model: str | None) -> str:
        if model in self.servers:
            return model
        if model not in (None, "", self.name):
            raise BadRequest(f"model: {model!r} is not served here; models: "
                             f"{', '.join([self.name, *self.servers])}", param="model", status=404,
                             code="model_not_found")
        return self._rng.choices([v.name for v in self.variants], weights=[v.weight for v in self.variants])[0]

    async def _variant_info(self, name: str) -> dict:
        if name not in self._info:
            info = await self.servers[name].info.remote()
            if "session_id" in info:  # its weights change as the session trains: asked every time
                return info
            self._info[name] = info
        return self._info[name]

    @policy_http.get("/v1/models")
    async def models(self, request: Request) -> Any:
        refused, headers = await self._authorize(request)
        if refused is not None:
            return refused
        data = []
        for v in self.variants:
            info = await self._variant_info(v.name)
            data.append({"id": v.name, "object": "model", "created": self.created, "owned_by": "raygrpo",
                         "root": v.source, "parent": self.name if v.name != self.name else None,
                         "weight": v.weight, "checkpoint_id": v.checkpoint_id,
                         "weights_sha256": info["weights_sha256"], "device": info["device"],
                         "max_context": info["max_context"], "batching": info["batching"],
                         **{k: info[k] for k in ("session_id", "weights_generation") if k in info}})
        if len(self.variants) > 1:  # the name itself routes by weight
            data.insert(0, {"id": self.name, "object": "model", "created": self.created, "owned_by": "raygrpo",
                            "root": None, "parent": None, "variants": [v.name for v in self.variants]})
        return JSONResponse({"object": "list", "data": data}, headers=headers)

    @policy_http.get("/health")
    def health(self) -> dict:
        return {"status": "ok"}

    @policy_http.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer("completion", request)

    @policy_http.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer("chat", request)

    async def _answer(self, kind: str, request: Request):
        refused, headers = await self._authorize(request)  # before the body is read: strangers send nothing big
        if refused is not None:
            return refused
        try:
            body = json.loads(await _read_body(request))
            if not isinstance(body, dict):
                raise BadRequest("body: expected a JSON object", param="body")
            variant = self._pick(body.get("model"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse(BadRequest("body: not valid JSON", param="body").body(), status_code=400,
                                headers=headers)
        except BadRequest as e:
            return JSONResponse(e.body(), status_code=e.status, headers=headers)
        headers = {**headers, "X-Raygrpo-Variant": variant}
        server = self.servers[variant]
        if body.get("stream"):
            chunks = server.options(stream=True).stream.remote(kind, body)
            first = await chunks.__anext__()
            if first.startswith(STREAM_ERROR):  # a stream that cannot start is an HTTP error, not a 200
                err = json.loads(first[len(STREAM_ERROR):])
                return JSONResponse(err["body"], status_code=err["status"], headers=headers)

            async def events() -> AsyncIterator[str]:
                yield first
                async for chunk in chunks:
                    yield chunk

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        status, reply = await server.complete.remote(kind, body)
        return JSONResponse(reply, status_code=status, headers=headers)


def build_policy_app(name: str, variants: list[VariantSpec], *, replicas: int = 1,
                     autoscaling: dict | None = None, gpus_per_replica: float = 0.0,
                     cpus_per_replica: float = 1.0, batching: bool = True, max_batch_size: int = MAX_BATCH_SIZE,
                     env: dict[str, str] | None = None, gate: str | None = None) -> Any:
    """The Serve application of one deployed name: a router and a PolicyServer per variant. `gate` names the
    job API application that vets each request (app.serving.access); models.deploy always sets it, and only a
    server built by hand for a benchmark or a test of the server itself goes without."""
    actor = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    scale: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    threads = max(1, int(cpus_per_replica))
    servers = [
        PolicyServer.options(name=f"PolicyServer-{v.name}", ray_actor_options=actor, **scale).bind(
            v.name, v.path, batching=batching, max_batch_size=max_batch_size, torch_threads=threads,
            session_id=v.session_id, lora=v.lora)
        for v in variants
    ]
    return PolicyRouter.bind(name, [v.model_dump() for v in variants], servers, gate)
