"""The SDK's own logic without a server: every JSON-RPC error code has its exception class, and replies
that are not JSON-RPC become TransportError. Calls against the real API: test_client_ray.py."""

from __future__ import annotations

import httpx
import pytest

from app.api import jsonrpc
from app.client import sdk


@pytest.mark.parametrize("code", sorted(jsonrpc.ERROR_MESSAGES))
def test_every_error_code_has_its_exception_class(code):
    err = sdk.error_from({"code": code, "message": "m", "data": {"x": 1}}, "training.get_status", 200)
    assert type(err) is not sdk.RaygrpoError and isinstance(err, sdk.RaygrpoError)
    assert err.code == code and err.data == {"x": 1} and err.method == "training.get_status"
    assert f"code {code}" in str(err)


def test_unknown_codes_and_non_jsonrpc_replies():
    err = sdk.error_from({"code": -1, "message": "odd"}, "m")
    assert type(err) is sdk.RaygrpoError and err.code == -1

    def proxy_page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, text="<html>not here</html>")

    c = sdk.Client("http://api.invalid", retries=0)
    c.http = httpx.Client(transport=httpx.MockTransport(proxy_page))
    with pytest.raises(sdk.TransportError, match="HTTP 404") as info:
        c.whoami()
    assert info.value.status == 404
    assert c.url == "http://api.invalid/api/v1/jsonrpc" and c.policy_url("p") == "http://api.invalid/policies/p/v1"
