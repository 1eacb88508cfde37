"""The test data in tests/data is what was copied from ../shared, byte for byte."""

from __future__ import annotations

import hashlib

from tests.harness import DATA, SHARED

#: tests/data file -> where it was copied from, under ../shared.
ORIGIN = {
    "zds-wire.tsv": "vectors/zds-wire.tsv",
    **{p.name: f"upstream/{p.name}" for p in sorted(DATA.glob("*.golden"))},
}


def pinned_sums() -> dict[str, str]:
    sums = {}
    for line in (DATA / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    return sums


def test_every_data_file_has_a_known_origin_and_a_pinned_sum() -> None:
    files = {p.name for p in DATA.iterdir() if p.name not in ("README.md", "SHA256SUMS")}
    assert files == set(ORIGIN) == set(pinned_sums())
    assert len([f for f in files if f.endswith(".golden")]) == 7
    readme = (DATA / "README.md").read_text()
    for name in ("zds-wire.tsv", "istio-inpod-iptables.golden", "istio-inpod-nftables-*.golden"):
        assert f"`{name}`" in readme


def test_data_is_byte_for_byte_what_was_copied_and_equals_its_origin_when_shared_is_beside() -> None:
    """The pinned sums always; with ../shared beside the clone, its files too (in CI's fresh
    clone nothing is beside it: the sums, pinned when the files were copied, stand in)."""
    for name, digest in pinned_sums().items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, f"tests/data/{name} changed"
    if not SHARED.is_dir():
        return
    compared = []
    for name, origin in ORIGIN.items():
        original = SHARED / origin
        assert original.is_file(), f"{original} is gone from ../shared"
        assert (DATA / name).read_bytes() == original.read_bytes(), (
            f"tests/data/{name} drifted from {original}; copy it again and update SHA256SUMS"
        )
        compared.append(name)
    assert sorted(compared) == sorted(ORIGIN)
