import time
import zlib

import pytest

from keycap._errors import ConfigurationError, InvalidKeyError
from keycap._rules import base62 as _base62
from keycap._rules.tokens import BODY_LENGTH, KeyFormat

FMT = KeyFormat("sk", "live")


def test_generated_key_has_the_documented_anatomy() -> None:
    public_id, plaintext = FMT.generate()
    assert plaintext.startswith("sk_live_")
    body = plaintext[len("sk_live_") :]
    assert len(body) == BODY_LENGTH == 12 + 33 + 6
    assert body[:12] == public_id
    assert _base62.is_base62(body)
    # The checksum is CRC32 of everything before it, in base62.
    assert body[-6:] == _base62.encode_fixed(zlib.crc32(plaintext[:-6].encode()), 6)
    assert FMT.parse(plaintext) == public_id


def test_secret_part_carries_at_least_192_bits() -> None:
    import math

    assert 33 * math.log2(62) >= 192


def test_keys_are_unique() -> None:
    assert len({FMT.generate()[1] for _ in range(2000)}) == 2000


def test_start_shows_only_public_characters() -> None:
    public_id, plaintext = FMT.generate()
    assert FMT.start(plaintext) == "sk_live_" + public_id[:8]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda k: k[:-1],  # too short
        lambda k: k + "A",  # too long
        lambda k: "pk" + k[2:],  # wrong prefix
        lambda k: k.replace("_live_", "_test_"),  # wrong environment
        lambda k: k[:20] + ("A" if k[20] != "A" else "B") + k[21:],  # checksum no longer matches
        lambda k: k[:-1] + "!",  # alphabet
        lambda k: k[:-1] + "é",  # non-ASCII
        lambda k: k[:-1] + "\x00",  # NUL
        lambda k: k[:-1] + "\ud800",  # lone surrogate
        lambda k: k.upper(),
        lambda k: "",
        lambda k: " " + k[1:],
    ],
)
def test_malformed_keys_are_rejected(mutate: object) -> None:
    _, plaintext = FMT.generate()
    with pytest.raises(InvalidKeyError):
        FMT.parse(mutate(plaintext))  # type: ignore[operator]


@pytest.mark.parametrize("value", [None, b"sk_live_x", 42, ["sk"], object()])
def test_non_strings_are_invalid_keys(value: object) -> None:
    with pytest.raises(InvalidKeyError):
        FMT.parse(value)


def test_every_single_character_typo_is_caught_by_the_checksum() -> None:
    _, plaintext = FMT.generate()
    head = len("sk_live_")
    for i in range(head, len(plaintext)):
        for replacement in "0aZ":
            if plaintext[i] == replacement:
                continue
            typo = plaintext[:i] + replacement + plaintext[i + 1 :]
            with pytest.raises(InvalidKeyError):
                FMT.parse(typo)


def test_huge_input_is_rejected_before_any_work() -> None:
    huge = "sk_live_" + "A" * 10_000_000
    start = time.perf_counter()
    for _ in range(100):
        with pytest.raises(InvalidKeyError):
            FMT.parse(huge)
    # Length is checked first: 100 rejections of 10 MB take far less than hashing once would.
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    ("prefix", "env"),
    [
        ("", "live"),
        ("sk_", "live"),
        ("SK", "live"),
        ("sk", "li ve"),
        ("sk", "x" * 17),
        ("1sk", "live"),
    ],
)
def test_bad_prefix_or_environment_is_a_configuration_error(prefix: str, env: str) -> None:
    with pytest.raises(ConfigurationError):
        KeyFormat(prefix, env)


def test_base62_encodes_to_a_fixed_width() -> None:
    assert _base62.encode_fixed(0, 6) == "000000"
    assert _base62.encode_fixed(2**32 - 1, 6) != _base62.encode_fixed(2**32 - 2, 6)
    with pytest.raises(ValueError):
        _base62.encode_fixed(62**6, 6)
