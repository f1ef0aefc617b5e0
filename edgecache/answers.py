"""Manifest answers the edge replays for a moment without asking the policy (see :class:`AnswerMemo`)."""

from __future__ import annotations

from dataclasses import dataclass

from . import oci

MEMO_SECONDS = 1.0


@dataclass(slots=True)
class Answer:
    """A cached manifest's whole answer, as the policy last decided it."""

    expires: float  # time.monotonic()
    fresh_until: float  # the policy's clock (tests move it; a wall-clock jump must not stretch an answer)
    generation: int  # the policy's, when decided (a blocklist reload or a purge voids the answer)
    headers: dict[str, str]
    body: bytes
    digest: str
    api: oci.ApiPath  # the parsed path the key's raw path names
    upstream: str
    repository: str


MemoKey = tuple[str, "str | None", str, str]  # raw path, ns, Accept, Authorization


class AnswerMemo:
    """Manifest HIT answers replayed for at most ``MEMO_SECONDS`` without asking the policy again.

    The same manifest is asked for thousands of times a second in a rollout; the policy's answer
    (routing, allow/deny, blocklist, cache entry, tag freshness) cannot change within a second
    except by a blocklist reload or a purge in this process (the policy's generation voids older
    answers) or a config reload (a new router, a new memo; a request decided under the old one
    stores its answer there, never in the new one). Region-wide (Redis) tags are never replayed.
    The key is everything the answer depends on: the raw path (name with any prefix, reference;
    only a path that parsed is ever stored), ``ns``, the Accept list and the Authorization header.
    It is looked up before the path is parsed: strings hash once. Never used where access is decided per
    credential (passthrough) or by a scanner (:meth:`PullThrough.memoisable`). Memory is bounded
    by entry count and by the bytes of the bodies held (small documents only).
    """

    MAX_BODY = 256 << 10

    def __init__(self, capacity: int = 4096, max_bytes: int = 32 << 20) -> None:
        self.capacity, self.max_bytes = capacity, max_bytes
        self._answers: dict[MemoKey, Answer] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: MemoKey, now: float, policy_now: float, generation: int) -> Answer | None:
        answer = self._answers.get(key)
        if answer is None:
            return None
        if answer.expires <= now or answer.fresh_until <= policy_now or answer.generation != generation:
            del self._answers[key]
            self._bytes -= len(answer.body)
            return None
        return answer

    def put(self, key: MemoKey, answer: Answer) -> None:
        size = len(answer.body)
        if size > self.MAX_BODY:
            return
        old = self._answers.pop(key, None)
        if old is not None:
            self._bytes -= len(old.body)
        if len(self._answers) >= self.capacity or self._bytes + size > self.max_bytes:
            self._answers.clear()  # every entry lives a second at most: starting over costs little
            self._bytes = 0
        self._answers[key] = answer
        self._bytes += size
