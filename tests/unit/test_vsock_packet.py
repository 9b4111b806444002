"""The vsock packet header: wire layout and decoding of arbitrary bytes."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from secvf.vsock.errors import MalformedPacket
from secvf.vsock.packet import HEADER_BYTES, Op, PacketHeader

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
headers = st.builds(PacketHeader, u64, u64, u32, u32, u32, u16, u16, u32, u32, u32)


def test_header_layout_matches_the_virtio_spec():
    header = PacketHeader(3, 2, 1234, 2222, 5, 1, Op.RW, 0, 262144, 7)
    wire = header.pack()
    assert len(wire) == HEADER_BYTES == 44
    assert struct.unpack_from("<Q", wire, 0)[0] == 3  # src_cid
    assert struct.unpack_from("<Q", wire, 8)[0] == 2  # dst_cid
    assert struct.unpack_from("<I", wire, 24)[0] == 5  # len
    assert struct.unpack_from("<H", wire, 30)[0] == Op.RW  # op
    assert struct.unpack_from("<I", wire, 36)[0] == 262144  # buf_alloc
    assert struct.unpack_from("<I", wire, 40)[0] == 7  # fwd_cnt


@given(headers)
def test_pack_unpack_round_trip(header):
    assert PacketHeader.unpack(header.pack()) == header


@given(st.binary(max_size=100))
def test_unpack_of_any_bytes_decodes_the_first_44_or_raises(data):
    if len(data) < HEADER_BYTES:
        with pytest.raises(MalformedPacket):
            PacketHeader.unpack(data)
    else:
        assert PacketHeader.unpack(data).pack() == data[:HEADER_BYTES]
