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
Not covered: logprobs, penalties, tools/function calling, seeds.
"""


import asyncio
import hashlib
import json
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

MAX_BATCH_SIZE = 16
"""rows (requests x n) decoded together when batching is on"""
BATCH_WAIT_S = 0.01
"""how long a batch waits for more requests once the first has arrived"""


# ---- the OpenAI request shapes --------------------------------------------------------------------

class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (penalties: 0)
    model: str | None = Field(None, max_length=256)
    """the deployment's name (weighted choice of a variant) or one variant's name"""
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, validate_default=True)
    """up to 4 strings that end a completion (not included in it)"""
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("at most 4 non-empty stop strings of at most 256 characters")
        return stops


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = Field(max_length=1_000_000)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    """the newer name of max_tokens; wins when both are sent"""


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


@dataclass
class GenResult:
    texts: list[str]  # n completions
    finish_reasons: list[str]  # n of "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


def sample_rows(logits: Tensor, temperature: Tensor, top_p: Tensor) -> Tensor:
    """One token per row with the row's own temperature (0: greedy) and nucleus mass.

    logits (N, V), temperature (N,), top_p (N,) -> tokens (N,)
    """
    greedy = temperature <= 0.0  # (N,)
    scaled = logits.float() / torch.where(greedy, 1.0, temperature)[:, None]  # (N, V)
    probs = torch.softmax(scaled, dim=-1)  # (N, V)
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (N, V)
    outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p[:, None]  # mass before this token already > p
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill(outside, 0.0))
    sampled = torch.multinomial(probs, 1).squeeze(-1)  # (N,)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


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
        self.path = path
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

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        """The tokenizer's chat template when it has one; otherwise `role: content` lines."""
        turns = [{"role": m.role, "content": m.content} for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
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

        tokens: list[list[int]] = [[] for _ in range(n)]
        sampled = [0] * n  # tokens sampled per row, the EOS included (the usage count)
        texts, sent = [""] * n, [0] * n  # decoded so far; characters already passed to on_delta
        finish: list[str | None] = [None] * n
        for _ in range(max(limit)):
            tok = sample_rows(logits, temperature, top_p).tolist()  # (N,)
            for i, (req, j) in enumerate(rows):
                if finish[i] is not None:
                    continue
                sampled[i] += 1
                if tok[i] in self.stop_ids:
                    finish[i] = "stop"
                else:
                    tokens[i].append(tok[i])
                    texts[i] = self.tokenizer.decode(tokens[i], skip_special_tokens=True)
                    cut = min((texts[i].find(s) for s in req.stop if s in texts[i]), default=-1)
                    if cut >= 0:
                        texts[i], finish[i] = texts[i][:cut], "stop"
                    elif len(tokens[i]) >= limit[i]:
                        finish[i] = "length"
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
                                     completion_tokens=sum(sampled[k] for k in span)))
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

def _completion_reply(kind: str, rid: str, model: str, results: list[GenResult]) -> dict:
    choices, index = [], 0
    for res in results:
        for text, reason in zip(res.texts, res.finish_reasons, strict=True):
            if kind == "completion":
                choices.append({"index": index, "text": text, "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": None, "finish_reason": reason})
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
                 torch_threads: int | None = None):
        self.name, self.batching = name, batching
        self.engine = PolicyEngine(path, torch_threads=torch_threads)
        self._batched.set_max_batch_size(max_batch_size)
        # One generation at a time on the model; with batching on, one generation serves many requests.
        self._lock = asyncio.Lock()

    def info(self) -> dict:
        e = self.engine
        return {"name": self.name, "path": e.path, "weights_sha256": e.digest, "device": str(e.device),
                "num_parameters": e.num_parameters, "max_context": e.max_context, "batching": self.batching}

    async def _run(self, reqs: list[GenRequest]) -> list[GenResult]:
        async with self._lock:
            return await asyncio.to_thread(self.engine.generate, reqs)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, reqs: list[GenRequest]) -> list[GenResult]:
        return await self._run(reqs)

    async def _submit(self, req: GenRequest) -> GenResult:
        return await self._batched(req) if self.batching else (await self._run([req]))[0]

    def _requests(self, kind: str, p: CompletionRequest | ChatRequest) -> list[GenRequest]:
        if isinstance(p, ChatRequest):
            prompts, max_tokens = [self.engine.chat_prompt(p.messages)], p.max_completion_tokens or p.max_tokens
        else:
            prompts, max_tokens = [p.prompt] if isinstance(p.prompt, str) else p.prompt, p.max_tokens
        reqs = []
        for k, text in enumerate(prompts):
            ids = self.engine.encode(text)
            self.engine.check_fits(ids, max_tokens, "messages" if kind == "chat" else f"prompt.{k}")
            reqs.append(GenRequest(ids, max_tokens, p.temperature, p.top_p, p.n, p.stop))
        return reqs

    async def complete(self, kind: str, body: dict) -> tuple[int, dict]:
        """(HTTP status, OpenAI reply or error) for a non-streaming request."""
        try:
            p = parse_request(kind, body)
            reqs = self._requests(kind, p)
        except BadRequest as e:
            return e.status, e.body()
        results = await asyncio.gather(*(self._submit(r) for r in reqs))
        return 200, _completion_reply(kind, f"cmpl-{uuid.uuid4().hex}", self.name, list(results))

    async def stream(self, kind: str, body: dict) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text delta, a final chunk per choice, then `[DONE]`."""
        try:
            p = parse_request(kind, body)
            reqs = self._requests(kind, p)
        except BadRequest as e:
            yield f"data: {json.dumps(e.body())}\n\n"
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
    weight: float = Field(1.0, gt=0)
    checkpoint_id: str | None = None


def _router_app() -> FastAPI:
    return FastAPI(title="raygrpo policy server", docs_url=None, redoc_url=None)


policy_http = _router_app()


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(policy_http)
class PolicyRouter:
    """The HTTP face of one deployed policy: OpenAI routes, weighted choice between variants."""

    def __init__(self, name: str, variants: list[dict], servers: list[Any]):
        self.name = name
        self.variants = [VariantSpec.model_validate(v) for v in variants]
        self.servers = dict(zip([v.name for v in self.variants], servers, strict=True))
        self.created = int(time.time())
        self._rng = random.Random()
        self._info: dict[str, dict] = {}

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
            self._info[name] = await self.servers[name].info.remote()
        return self._info[name]

    @policy_http.get("/v1/models")
    async def models(self) -> dict:
        data = []
        for v in self.variants:
            info = await self._variant_info(v.name)
            data.append({"id": v.name, "object": "model", "created": self.created, "owned_by": "raygrpo",
                         "root": v.path, "parent": self.name if v.name != self.name else None,
                         "weight": v.weight, "checkpoint_id": v.checkpoint_id,
                         "weights_sha256": info["weights_sha256"], "device": info["device"],
                         "max_context": info["max_context"], "batching": info["batching"]})
        if len(self.variants) > 1:  # the name itself routes by weight
            data.insert(0, {"id": self.name, "object": "model", "created": self.created, "owned_by": "raygrpo",
                            "root": None, "parent": None, "variants": [v.name for v in self.variants]})
        return {"object": "list", "data": data}

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
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise BadRequest("body: expected a JSON object", param="body")
            variant = self._pick(body.get("model"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse(BadRequest("body: not valid JSON", param="body").body(), status_code=400)
        except BadRequest as e:
            return JSONResponse(e.body(), status_code=e.status)
        headers = {"X-Raygrpo-Variant": variant}
        server = self.servers[variant]
        if body.get("stream"):
            chunks = server.options(stream=True).stream.remote(kind, body)
            return StreamingResponse(chunks, media_type="text/event-stream", headers=headers)
        status, reply = await server.complete.remote(kind, body)
        return JSONResponse(reply, status_code=status, headers=headers)


def build_policy_app(name: str, variants: list[VariantSpec], *, replicas: int = 1,
                     autoscaling: dict | None = None, gpus_per_replica: float = 0.0,
                     cpus_per_replica: float = 1.0, batching: bool = True, max_batch_size: int = MAX_BATCH_SIZE,
                     env: dict[str, str] | None = None) -> Any:
    """The Serve application of one deployed name: a router and a PolicyServer per variant."""
    actor = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    if env:
        actor["runtime_env"] = {"env_vars": env}
    scale: dict[str, Any] = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    threads = max(1, int(cpus_per_replica))
    servers = [
        PolicyServer.options(name=f"PolicyServer-{v.name}", ray_actor_options=actor, **scale).bind(
            v.name, v.path, batching=batching, max_batch_size=max_batch_size, torch_threads=threads)
        for v in variants
    ]
    return PolicyRouter.bind(name, [v.model_dump() for v in variants], servers)
