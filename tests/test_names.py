"""vault.names: the identifier rules every layer shares (docs/contracts.md)."""
import sys
import unicodedata

import grpc
import pytest

from vault import codec, names, sharing
from vault.errors import InvalidName
from vaultrpc import status

# Categories str.isprintable refuses: "Other" (Cc, Cf, Cs, Co, Cn) and
# "Separator" (Zl, Zp, Zs but the ASCII space).
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}


def test_identifier_refuses_exactly_the_unprintable_code_points():
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        printable = ch == " " or unicodedata.category(ch) not in _UNPRINTABLE
        if printable:
            assert names.check_id(ch, "subject") == ch, hex(cp)
        else:
            with pytest.raises(InvalidName, match="printable"):
                names.check_id(ch, "subject")


@pytest.mark.parametrize("value, ok", [
    ("a", True), ("x" * 128, True), ("é" * 64, True), ("é" * 65, False), ("x" * 129, False),
    ("", False), ("a\x00b", False), ("tab\there", False), ("\u200b", False), ("rtl\u202eevil", False),
    ("\ufeff", False), ("with space", True), ("漢字", True), (None, False), (b"bytes", False),
])
def test_identifier_lengths_are_utf8_bytes(value, ok):
    if ok:
        assert names.check_id_bytes(value, "subject") == value.encode()
    else:
        with pytest.raises(InvalidName):
            names.check_id(value, "subject")


@pytest.mark.parametrize("value, ok", [
    ("r-1", True), ("x" * 128, True), ("x" * 129, False), ("", False), ("é", False), ("a\tb", False), ("~!", True),
])
def test_token_is_printable_ascii(value, ok):
    if ok:
        assert names.check_token(value, "request id") == value
    else:
        with pytest.raises(InvalidName, match="request id must be 1 to 128 printable ASCII"):
            names.check_token(value, "request id")


@pytest.mark.parametrize("value, ok", [
    ("node-1", True), ("a" * 63, True), ("a" * 64, False), ("-x", False), ("a/b", False), ("", False),
    ("../etc", False), ("A.b_c", True),
])
def test_name(value, ok):
    if ok:
        assert names.check_name(value) == value
    else:
        with pytest.raises(InvalidName):
            names.check_name(value)


def test_session_id_and_index():
    assert names.is_session_id("abcdefgh") and names.is_session_id("A" * 64)
    assert not any(names.is_session_id(v) for v in ("abcdefg", "A" * 65, "-abcdefgh", "abc.defgh", None, 12345678))
    assert names.check_index(1, "index") == 1 and names.check_index(255, "index") == 255
    for bad in (0, 256, True, 1.0, "1"):
        with pytest.raises(InvalidName, match="index from 1 to 255"):
            names.check_index(bad, "index")


def test_limits_agree_with_the_core():
    assert names.MAX_DIMENSION == codec.MAX_DIMENSION == 66_572
    assert names.MAX_SHAREHOLDERS == sharing.MAX_SHAREHOLDERS == 255


def test_an_invalid_name_is_invalid_argument_through_the_one_status_map():
    with pytest.raises(status.InvalidArgument, match="subject must be printable") as info:
        status.checked(names.check_id, "a\x00", "subject")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert status.to_status(InvalidName("The x is bad.")) == (grpc.StatusCode.INVALID_ARGUMENT, "The x is bad.")
    assert isinstance(status.error(grpc.StatusCode.NOT_FOUND, "m"), status.NotFound)


@pytest.mark.parametrize("value, ok", [
    ("bank-a", True), ("matcher", True), ("a.b", True), ("Bank-A", False), ("bank_a", False), ("-bank", False),
    ("bank-", False), ("a..b", False),
])
def test_server_name_is_also_a_dns_name(value, ok):
    if ok:
        assert names.check_server_name(value) == value
    else:
        with pytest.raises(InvalidName):
            names.check_server_name(value)
