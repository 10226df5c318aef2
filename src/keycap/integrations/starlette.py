"""Starlette (or any ASGI app on Starlette's ``AuthenticationMiddleware``).

::

    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from keycap.integrations.starlette import KeycapBackend

    backend = KeycapBackend(client)
    app = Starlette(routes=..., middleware=[
        Middleware(AuthenticationMiddleware, backend=backend, on_error=backend.on_error),
    ])

A request with a valid key gets ``request.user`` (a :class:`KeycapUser`, with
``.key``) and ``request.auth.scopes`` (``"authenticated"`` and the key's granted
scopes, as stored: ``"chat:*"`` stays ``"chat:*"``, so check wildcard grants with
``request.user.has_scope``). A request without a key is anonymous; a refused
key gets the same problem+json response as in FastAPI.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
)
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response

from keycap._client import APIKeyClient
from keycap._errors import ConfigurationError, KeycapError
from keycap._models import APIKey
from keycap._rules import scopes as scope_rules
from keycap.integrations._http import (
    DEFAULT_HEADERS,
    PROBLEM_JSON,
    HTTPOptions,
    credential,
    problem,
)

__all__ = ["KeycapAuthenticationError", "KeycapBackend", "KeycapUser"]


class KeycapUser(BaseUser):
    """``request.user`` for a request with a valid key (Starlette's ``BaseUser`` protocol)."""

    def __init__(self, key: APIKey) -> None:
        self.key = key

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.key.name or self.key.id

    @property
    def identity(self) -> str:
        return self.key.id

    def has_scope(self, scope: str) -> bool:
        """Whether the key's grants cover ``scope`` (wildcards included)."""
        return not scope_rules.missing(self.key.scopes, (scope,))

    def __repr__(self) -> str:
        return f"KeycapUser({self.key.id!r})"


class KeycapAuthenticationError(AuthenticationError):
    """Carries the keycap error to ``on_auth_error``."""

    def __init__(self, error: KeycapError) -> None:
        super().__init__(error.message)
        self.error = error


class KeycapBackend(AuthenticationBackend):
    """Validates the request's key with ``client``.

    Args:
        client: the :class:`~keycap.APIKeyClient`.
        headers: request headers that may carry the key.
        required_scopes: scopes every request must have (per-route checks:
            ``request.user.has_scope``).
        product: a product name in the key's organization every request is for.
        options: status choices for :func:`on_auth_error` (see ``HTTPOptions``).
    """

    def __init__(
        self,
        client: APIKeyClient,
        *,
        headers: Sequence[str] = DEFAULT_HEADERS,
        required_scopes: Sequence[str | scope_rules.AnyOf] = (),
        product: str | None = None,
        options: HTTPOptions | None = None,
    ) -> None:
        if not isinstance(client, APIKeyClient):
            raise ConfigurationError("KeycapBackend needs an APIKeyClient")
        self.client = client
        self.options = options or HTTPOptions(headers=tuple(headers))
        self.required = scope_rules.expressed(
            scope_rules.required(required_scopes, "required_scopes")
        )
        self.product = product

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, KeycapUser] | None:
        presented = credential(conn.headers, self.options.headers)
        if presented is None:
            return None
        try:
            peer = conn.client.host if conn.client else None
            key = await self.client.validate_key(
                presented,
                required_scopes=self.required,
                product_name=self.product,
                client_ip=self.options.client_ip(peer, conn.headers),
            )
        except KeycapError as error:
            raise KeycapAuthenticationError(error) from None
        return AuthCredentials(["authenticated", *key.scopes]), KeycapUser(key)

    def on_error(self, conn: HTTPConnection, exc: AuthenticationError) -> Response:
        """``AuthenticationMiddleware(on_error=backend.on_error)``: refusals as problem+json."""
        if not isinstance(exc, KeycapAuthenticationError):
            return JSONResponse({"detail": str(exc)}, status_code=401)
        found = problem(exc.error, self.options, self.client.now())
        return JSONResponse(
            found.body, status_code=found.status, headers=found.headers, media_type=PROBLEM_JSON
        )
