"""--subnet values: what the hosts' bridge network may be."""

import pytest

from cloud.sim.hosts import parse_subnet


@pytest.mark.parametrize("text", ["10.77.5.0/24", "192.168.40.0/29", "172.20.0.0/16"])
def test_private_ipv4_subnets_accepted(text):
    assert str(parse_subnet(text)) == text


@pytest.mark.parametrize(
    "text, reason",
    [
        ("10.77.5.1/24", "host bits set"),
        ("8.8.8.0/24", "private IPv4"),
        ("10.0.0.0/8", "from /16 to /29"),
        ("fd00::/64", "private IPv4"),
        ("nonsense", "does not appear to be"),
    ],
)
def test_other_subnets_refused_saying_what_is_valid(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_subnet(text)
