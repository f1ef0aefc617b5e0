"""The edge's memo of manifest answers: expiry on both clocks, generations, and bounded memory."""

from __future__ import annotations

from edgecache import oci
from edgecache.answers import Answer, AnswerMemo, MemoKey


def key(ref: str, ns: str | None = None, accept: str = "*/*", auth: str = "") -> MemoKey:
    return (f"/v2/library/x/manifests/{ref}", ns, accept, auth)


def answer(body: bytes, expires: float = 10.0, fresh_until: float = 110.0, generation: int = 0) -> Answer:
    return Answer(expires, fresh_until, generation, {"X-Cache": "HIT"}, body, "sha256:" + "0" * 64,
                  oci.parse_path("/v2/library/x/manifests/v1"), "up", "library/x")


def test_answers_end_with_either_clock_and_with_a_new_generation() -> None:
    memo = AnswerMemo()
    memo.put(key("v1"), answer(b"doc"))
    assert memo.get(key("v1"), 5.0, 105.0, 0) is not None
    assert memo.get(key("v1", ns="other.io"), 5.0, 105.0, 0) is None  # every part of the key counts
    assert memo.get(key("v1", accept="application/json"), 5.0, 105.0, 0) is None
    assert memo.get(key("v1", auth="Basic eA=="), 5.0, 105.0, 0) is None
    assert memo.get(key("v1"), 5.0, 105.0, 1) is None  # blocklist reload: void, and dropped
    assert len(memo) == 0
    memo.put(key("v1"), answer(b"doc"))
    assert memo.get(key("v1"), 10.0, 105.0, 0) is None  # its second is over
    memo.put(key("v1"), answer(b"doc"))
    assert memo.get(key("v1"), 5.0, 110.0, 0) is None  # the tag went stale on the policy's clock


def test_memory_is_bounded_by_count_and_by_bytes() -> None:
    memo = AnswerMemo(capacity=3, max_bytes=1000)
    for i in range(10):
        memo.put(key(f"t{i}"), answer(b"x" * 10))
        assert len(memo) <= 3
    memo = AnswerMemo(capacity=100, max_bytes=1000)
    for i in range(10):
        memo.put(key(f"t{i}"), answer(b"x" * 300))
        assert memo._bytes <= 1000  # noqa: SLF001
    memo.put(key("same"), answer(b"x" * 300))
    memo.put(key("same"), answer(b"x" * 300))  # replacing an entry does not count it twice
    assert memo._bytes == sum(len(a.body) for a in memo._answers.values())  # noqa: SLF001
    memo.put(key("big"), answer(b"x" * (AnswerMemo.MAX_BODY + 1)))
    assert memo.get(key("big"), 0.0, 0.0, 0) is None  # big documents are never held here
