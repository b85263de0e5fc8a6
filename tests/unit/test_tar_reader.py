"""data_pipeline.stream.iter_tar_members, the fast tar reader of the shard streams, against Python's
tarfile (the reference) on the formats WebDataset shards come in, and its errors on broken tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_pipeline.stream import TarFormatError, iter_tar_members


def make_tar(members: list[tuple[str, bytes]], fmt: int, directory: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo("a-folder")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000.5  # a float mtime: PAX writes it in an extended header
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def reference(blob: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tar:
        out = []
        for member in tar:
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                out.append((member.name, extracted.read()))
        return out


MEMBERS = [
    ("000001.json", b'{"label": 1}'),
    ("000001.txt", b""),  # empty member
    ("000002.json", bytes(range(256)) * 3),  # binary, not a multiple of 512
    ("000003.json", b"x" * 512),  # exactly one block
    ("k" * 120 + ".json", b"long name"),  # > 100 characters: PAX path / GNU long name / ustar prefix
    ("caf\u00e9/\u00e9t\u00e9.txt", b"non-ASCII"),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_reads_what_tarfile_reads(fmt: int) -> None:
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else MEMBERS[:4]  # ustar: ASCII, short names only
    if fmt == tarfile.USTAR_FORMAT:
        members = [*members, ("dir/" * 30 + "x.json", b"prefix field")]  # ustar's 155-byte prefix
    blob = make_tar(members, fmt, directory=True)
    got = list(iter_tar_members(io.BytesIO(blob)))
    assert got == reference(blob) == members


def test_a_tar_without_end_blocks_ends_at_a_header_boundary() -> None:
    blob = make_tar(MEMBERS[:3], tarfile.PAX_FORMAT)
    end = len(blob.rstrip(b"\0"))  # the last member's data ends in 0xff
    cut = end + -end % 512  # its padding kept, the end-of-archive blocks cut off
    assert list(iter_tar_members(io.BytesIO(blob[:cut]))) == MEMBERS[:3]


@pytest.mark.parametrize("cut", [100, 512 + 5, 2 * 512 + 700])
def test_an_end_inside_a_member_or_header_is_an_error(cut: int) -> None:
    blob = make_tar([("a.bin", b"y" * 1500), ("b.bin", b"z" * 10)], tarfile.USTAR_FORMAT)
    with pytest.raises(TarFormatError, match="ends inside"):
        list(iter_tar_members(io.BytesIO(blob[:cut])))


def test_a_damaged_header_is_an_error() -> None:
    blob = bytearray(make_tar([("a.bin", b"y" * 10)], tarfile.USTAR_FORMAT))
    blob[3] ^= 0x01  # one bit of the name
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(blob))))
    with pytest.raises(tarfile.ReadError):  # tarfile refuses it too
        reference(bytes(blob))
