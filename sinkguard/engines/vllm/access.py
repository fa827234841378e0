"""Who may call sinkguard's routes on vLLM's OpenAI server.

vLLM's ``--api-key`` (or ``VLLM_API_KEY``) guards only ``/v1``-style prefixes, so sinkguard's routes
check it themselves, the same way (``Authorization: Bearer``, constant-time compare). With
``SINKGUARD_ADMIN_TOKEN`` set, status and the detection switch need that token instead, and record
lookups accept either.
"""

from __future__ import annotations

import hashlib
import secrets

from fastapi import Request

ADMIN_TOKEN_ENV = "SINKGUARD_ADMIN_TOKEN"


def _digests(tokens: list[str | None]) -> list[bytes]:
    return [hashlib.sha256(t.encode()).digest() for t in tokens if t]


class Access:
    """Bearer-token checks (vLLM's AuthenticationMiddleware semantics) for sinkguard's routes."""

    def __init__(self, api_keys: list[str | None], admin_token: str | None) -> None:
        self.api_keys = _digests(api_keys)
        self.admin = _digests([admin_token])

    @staticmethod
    def _matches(request: Request, digests: list[bytes]) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        found = False
        for expected in digests:  # no early exit: constant time in the number of keys
            found |= secrets.compare_digest(digest, expected)
        return found

    def may_read_records(self, request: Request) -> bool:
        if not self.api_keys and not self.admin:
            return True
        return self._matches(request, self.api_keys + self.admin)

    def may_administer(self, request: Request) -> bool:
        digests = self.admin or self.api_keys
        return not digests or self._matches(request, digests)
