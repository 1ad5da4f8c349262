"""The on-disk name patterns accept exactly their documented form (the names become paths and tar keys)."""

from core.layout import FIELD_RE, SHARD_RE, UID_RE


def test_names_match_whole_strings_of_ascii():
    assert UID_RE.match("procedural-w50-s0-000003") and UID_RE.match("a" * 64)
    for bad in ("a" * 65, "", "a.b", "../x", "a/b", "abc\n", "\u0661\u0662"):
        assert not UID_RE.match(bad), repr(bad)
    assert SHARD_RE.match("train-000001.tar") and SHARD_RE.match("val-123456.tar")
    for bad in ("train-000001.tar\n", "train-\u0660\u0660\u0660\u0660\u0660\u0661.tar", "test-000001.tar"):
        assert not SHARD_RE.match(bad), repr(bad)
    assert FIELD_RE.match("12.rgba.png") and FIELD_RE.match("cameras.npz")
    for bad in ("12.rgba.png\n", "\u0661.rgba.png", "12.rgb.png", "../meta.json"):
        assert not FIELD_RE.match(bad), repr(bad)
