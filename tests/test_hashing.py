import pytest

from keycap._errors import ConfigurationError
from keycap._rules.hashing import PepperRing

S1 = "a" * 32
S2 = "b" * 32


def test_newest_secret_digests_and_every_secret_verifies() -> None:
    old = PepperRing(S1)
    ring = PepperRing([S2, S1])
    digest = old.digest("sk_live_x")
    assert ring.current_id != old.current_id
    assert ring.verify("sk_live_x", old.current_id, digest)
    assert ring.needs_upgrade(old.current_id)
    assert not ring.needs_upgrade(ring.current_id)
    assert not ring.verify("sk_live_y", old.current_id, digest)


def test_retired_secret_no_longer_verifies() -> None:
    old = PepperRing(S1)
    digest = old.digest("k")
    assert not PepperRing(S2).verify("k", old.current_id, digest)


def test_digest_is_hmac_sha256_hex_and_salted_per_purpose() -> None:
    import hashlib
    import hmac

    ring = PepperRing(S1)
    d = ring.digest("k")
    assert len(d) == 64
    # Not a bare HMAC with the secret: a per-purpose key is derived first.
    assert d != hmac.new(S1.encode(), b"k", hashlib.sha256).hexdigest()


def test_bytes_and_str_secrets_are_the_same_pepper() -> None:
    assert PepperRing(S1).current_id == PepperRing(S1.encode()).current_id


@pytest.mark.parametrize("bad", [None, "", "short", [], [S1, None], 123, ["x" * 31], "\ud800" * 40])
def test_bad_secrets_are_configuration_errors(bad: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        PepperRing(bad)  # type: ignore[arg-type]
    assert "a" * 32 not in str(info.value)


def test_repr_never_shows_secrets() -> None:
    ring = PepperRing([S1, S2])
    assert S1 not in repr(ring) and S2 not in repr(ring)
    assert "2 secrets" in repr(ring)
