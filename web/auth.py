"""Who is asking: the bearer token, its rate, its role and its tenant."""

from __future__ import annotations

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from web import tokens
from web.state import WebState
from web.tokens import Token, TokenRole

bearer = HTTPBearer(auto_error=False, description="flt_... token (`fieldline web token create`)")


class ApiError(Exception):
    """An answer other than 2xx: status and one sentence of what to do."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def state_of(request: Request) -> WebState:
    """The app's WebState."""
    state: WebState = request.app.state.web
    return state


async def authenticate(state: WebState, header: str | None) -> Token:
    """The token of an `Authorization: Bearer` value, or ApiError 401."""
    if not header:
        state.metrics.refused.labels("unauthorized").inc()
        raise ApiError(
            401,
            "no token: send `Authorization: Bearer flt_...` (create one with "
            "`fieldline web token create TENANT --role viewer`)",
            {"WWW-Authenticate": "Bearer"},
        )
    token = await tokens.verify(await state.shared(), header)
    if token is None:
        state.metrics.refused.labels("unauthorized").inc()
        raise ApiError(
            401,
            "the token is unknown, malformed or revoked: ask for a new one "
            "(`fieldline web token list` shows the valid ones)",
            {"WWW-Authenticate": "Bearer"},
        )
    return token


async def caller(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> Token:
    """The authenticated, rate-limited token of this request."""
    state = state_of(request)
    # failed checks are bounded per client address, so a flood of made-up tokens costs one
    # bucket lookup each instead of a database query (a secret cannot be guessed anyway)
    address = request.client.host if request.client else "-"
    if not state.auth_failures.holds(address):
        state.metrics.refused.labels("auth_failures").inc()
        wait = state.auth_failures.retry_after(address)
        raise ApiError(
            429,
            f"too many failed token checks from {address} (web.auth_failures_per_min "
            f"{state.settings.web.auth_failures_per_min}): retry in {wait:.0f} s "
            "with a valid token",
            {"Retry-After": str(max(1, round(wait)))},
        )
    try:
        token = await authenticate(state, credentials.credentials if credentials else None)
    except ApiError:
        state.auth_failures.allow(address)
        raise
    if not state.rate.allow(token.id):
        state.metrics.refused.labels("rate_limited").inc()
        wait = state.rate.retry_after(token.id)
        raise ApiError(
            429,
            f"too many requests for this token (web.rate_per_s {state.settings.web.rate_per_s:g}"
            f"/s, burst {state.settings.web.rate_burst}): retry in {wait:.1f} s",
            {"Retry-After": str(max(1, round(wait)))},
        )
    return token


def require(state: WebState, token: Token, role: TokenRole, what: str) -> None:
    """ApiError 403 unless the token's role is at least `role`."""
    if not token.role.at_least(role):
        state.metrics.refused.labels("forbidden").inc()
        raise ApiError(
            403, f"{what} needs {_a(role.value)} token; this one is {_a(token.role.value)}'s"
        )


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def scope_tenant(token: Token, tenant: str) -> str:
    """The tenant if the token may see it; else 404, as if it did not exist."""
    if token.role is TokenRole.ADMIN or token.tenant == tenant:
        return tenant
    raise ApiError(404, f"no tenant {tenant!r} (this token sees tenant {token.tenant!r} only)")
