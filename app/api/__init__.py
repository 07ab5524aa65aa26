"""The HTTP/JSON-RPC core of the job API.

Owns: the JSON-RPC 2.0 protocol and its error codes (`jsonrpc`), the one method registry and the
handler `Context` (`context`), JWT and API-key auth with the `auth.*`/`audit.*` methods (`auth`,
`admin`), rate limits (`ratelimit`), Prometheus metrics (`metrics`), the FastAPI app with its health
endpoints (`main`), its Ray Serve deployment (`serve`), and the callback Serve's HTTP proxy runs before it
(`proxy`). `main` and `serve` are the composition root:
they import the job system, serving and the research registry so that their methods register.
Does not own: any method's business logic, tables or queries (app.data), the engine (grpo).
Importing this package runs nothing: `app.api.jsonrpc` needs only pydantic, so the SDK reads its codes.
"""
