import pytest

from keycap._errors import InvalidArgumentError
from keycap._rules import scopes


@pytest.mark.parametrize(
    ("granted", "required", "ok"),
    [
        (["chat:write"], "chat:write", True),
        (["chat:*"], "chat:write", True),
        (["chat:*"], "chat:admin:read", True),
        (["chat:admin:*"], "chat:admin:read", True),
        (["*"], "anything:at:all", True),
        (["*"], "*", True),
        (["chat:*"], "chat:*", True),
        (["chat:write"], "chat:*", False),
        (["chat:*"], "chat", False),  # a wildcard covers children, not the parent itself
        (["chat:read"], "chat:write", False),
        (["chat:write"], "chat:writer", False),  # whole segments, not prefixes
        (["chat"], "chat:write", False),
        (["chat:admin:*"], "chat:write", False),
        (["Chat:write"], "chat:write", False),  # case-sensitive
        ([], "chat:write", False),  # an empty grant list grants nothing
        (["chat:*"], "*", False),
        (["billing:*", "chat:write"], "chat:write", True),
    ],
)
def test_a_grant_covers_itself_and_what_its_wildcard_names(
    granted: list[str], required: str, ok: bool
) -> None:
    assert (scopes.missing(granted, [required]) == ()) is ok


def test_covering_lists_every_grant_that_covers() -> None:
    assert scopes.covering("a:b:c") == ("*", "a:*", "a:b:*", "a:b:c")
    assert scopes.covering("a:*") == ("*", "a:*")
    assert scopes.covering("*") == ("*",)


def test_missing_reports_in_given_order() -> None:
    assert scopes.missing(["a:x"], ["c:x", "a:x", "b:x"]) == ("c:x", "b:x")


def test_normalize_sorts_and_dedupes() -> None:
    assert scopes.normalize(["b", "a", "b"]) == ("a", "b")
    assert scopes.normalize(()) == ()


@pytest.mark.parametrize(
    "bad",
    [
        "chat:write",  # a bare string, not a list
        None,
        [None],
        [b"chat"],
        [""],
        ["chat write"],
        ["chat:"],
        [":chat"],
        ["chat::write"],
        ["*:chat"],
        ["chat:*:write"],
        ["chat*"],
        ["chät"],
        ["a" * 129],
        ["s" + str(i) for i in range(65)],
        ["\x00"],
    ],
)
def test_a_malformed_scope_is_refused(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        scopes.normalize(bad)


def test_stored_form_round_trips_and_supports_substring_matching() -> None:
    stored = scopes.encode(("a:b", "c"))
    assert stored == " a:b c "
    assert " a:b " in stored and " a " not in stored
    assert scopes.decode(stored) == ("a:b", "c")
    assert scopes.decode(scopes.encode(())) == ()
