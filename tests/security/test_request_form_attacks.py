"""The request-form attack catalogue, decided by the real decision core with real keys: a token
hidden where a lenient upstream reads it but a naive parser does not (two Cookie headers as
Envoy joins them, spaces around a cookie's name, another case, ``,`` or ``;`` between
cookies, ``;`` between query parameters, repeated names) is read and verified, or the request
is refused; never allowed with a token the server did not verify still in it.

test_request_readings_e2e.py sends these forms through a real Envoy to both doors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from authz_server.attributes import RequestAttributes
from authz_server.config import load as config
from authz_server.service import AuthorizationService, Engine
from authz_server.tools import devkeys
from tests.helpers import AUDIENCE, ISSUER, Clock, claims_for, write_config
from tests.security.test_token_attacks import raw_token


@dataclass
class Tokens:
    alice: str
    mallory: str
    forged: str  # alg none, for admin


class Core:
    """A provider reading `Authorization: Bearer`, `?access_token=` and the `session` cookie;
    `/api/*` needs a principal, `/public/*` is open."""

    def __init__(self, tmp_path: Path) -> None:
        clock = Clock()
        key = devkeys.generate_key("RSA", kid="rsa")
        jwks = json.dumps(json.dumps(devkeys.jwks(key)))
        text = f"""
apiVersion: authz-server/v1
kind: AuthzConfig
providers:
  - name: main
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    jwks: {jwks}
    fromHeaders: [{{name: Authorization, prefix: "Bearer "}}]
    fromParams: [access_token]
    fromCookies: [session]
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
policies:
  - name: api
    rules:
      - from: [{{source: {{requestPrincipals: ["*"]}}}}]
        to: [{{operation: {{paths: ["/api/*"]}}}}]
      - to: [{{operation: {{paths: ["/public/*"]}}}}]
"""
        engine = Engine.build(config.load(write_config(tmp_path, text)), clock=clock)
        for cache in engine.caches.values():
            assert cache.refresh()
        self.service = AuthorizationService(engine)
        self.tokens = Tokens(
            key.sign(claims_for(clock.now)),
            key.sign(claims_for(clock.now, sub="mallory")),
            raw_token({"alg": "none"}, claims_for(clock.now, sub="admin"), b""),
        )


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Core:
    return Core(tmp_path_factory.mktemp("request-forms"))


# (case, path, headers made from the tokens, expected (status, reason))
Form = tuple[str, str, Callable[[Tokens], dict[str, str]], tuple[int, str]]


def _bearer(t: Tokens, **headers: str) -> dict[str, str]:
    return {"authorization": f"Bearer {t.alice}", **headers}


FORMS: list[Form] = [
    # --- two Cookie headers, as Envoy joins them (with ",") for both doors
    ("forged cookie in a second Cookie header, with a bearer token", "/api/x", lambda t: _bearer(t, cookie=f"a=1,session={t.forged}"), (401, "ambiguous_cookie")),
    ("forged cookie in a second Cookie header, public path", "/public/x", lambda t: {"cookie": f"a=1,session={t.forged}"}, (401, "ambiguous_cookie")),
    ("valid cookie in a second Cookie header", "/api/x", lambda t: {"cookie": f"a=1,session={t.alice}"}, (401, "ambiguous_cookie")),
    ("valid cookie in the first of two Cookie headers", "/api/x", lambda t: {"cookie": f"session={t.alice},a=1"}, (401, "ambiguous_cookie")),
    # --- spaces around a cookie's name, another case
    ("forged cookie with a space before =", "/api/x", lambda t: _bearer(t, cookie=f"a=1; session ={t.forged}"), (401, "ambiguous_credentials")),
    ("forged cookie with a tab before its name", "/public/x", lambda t: {"cookie": f"a=1;\tsession={t.forged}"}, (401, "unsupported_algorithm")),
    ("forged cookie named Session", "/public/x", lambda t: {"cookie": f"Session={t.forged}"}, (401, "unsupported_algorithm")),
    ("another principal's cookie named SESSION", "/api/x", lambda t: _bearer(t, cookie=f"SESSION={t.mallory}"), (401, "ambiguous_credentials")),
    # --- repeated names
    ("session repeated with two tokens", "/api/x", lambda t: {"cookie": f"session={t.alice}; session={t.mallory}"}, (401, "ambiguous_credentials")),
    ("session repeated, once with spaces", "/api/x", lambda t: {"cookie": f"session={t.alice}; session = {t.forged}"}, (401, "ambiguous_credentials")),
    ("session repeated with one token", "/api/x", lambda t: {"cookie": f"session={t.alice}; session= {t.alice}"}, (200, "allowed")),
    # --- ";" in the query
    ("forged parameter after ;, with a bearer token", "/api/x?x=1;access_token={forged}", _bearer, (401, "ambiguous_query")),
    ("valid parameter before ;", "/api/x?access_token={alice};x=1", lambda t: {}, (401, "ambiguous_query")),
    ("parameter repeated with & and ;", "/api/x?access_token={alice}&access_token={mallory};y=2", lambda t: {}, (401, "ambiguous_query")),
    ("; between other parameters", "/api/x?x=1;y=2", _bearer, (200, "allowed")),
    # --- a token parameter's name escaped or in another case (upstreams decode it, ASP.NET
    # folds case; Envoy removes parameters by exact name, so it would pass them on)
    ("forged parameter named ACCESS_TOKEN, with a bearer token", "/api/x?ACCESS_TOKEN={forged}", _bearer, (401, "ambiguous_query")),
    ("valid parameter named Access_Token", "/api/x?Access_Token={alice}", lambda t: {}, (401, "ambiguous_query")),
    ("escaped, in another case", "/api/x?ACCESS%5FTOKEN={forged}", _bearer, (401, "ambiguous_query")),
    ("valid parameter with an escaped name", "/api/x?access%5Ftoken={alice}", lambda t: {}, (401, "ambiguous_query")),
    ("a token parameter beside its other-case twin", "/api/x?access_token={alice}&ACCESS_TOKEN={forged}", lambda t: {}, (401, "ambiguous_query")),
    ("parameter repeated with two tokens", "/api/x?access_token={alice}&access_token={mallory}", lambda t: {}, (401, "ambiguous_credentials")),
]  # fmt: skip


@pytest.mark.parametrize(("case", "path", "headers", "expected"), FORMS, ids=[f[0] for f in FORMS])
def test_every_request_form_is_verified_or_refused(
    core: Core,
    case: str,
    path: str,
    headers: Callable[[Tokens], dict[str, str]],
    expected: tuple[int, str],
) -> None:
    t = core.tokens
    sent = headers(t)
    decision = core.service.check(
        RequestAttributes(
            method="GET",
            path=path.format(alice=t.alice, mallory=t.mallory, forged=t.forged),
            headers=sent,
        )
    )
    assert (decision.status, decision.reason) == expected, case
    if decision.allowed:
        # What goes on holds no session cookie in any reading (split on "," too, names
        # trimmed, in any case).
        cookie = dict(decision.headers_to_set).get("cookie", "")
        names = [c.partition("=")[0].strip().lower() for c in re.split("[;,]", cookie)]
        assert "session" not in names
        assert "cookie" in decision.headers_to_remove or "cookie" not in sent or cookie
