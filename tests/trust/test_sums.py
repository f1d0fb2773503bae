"""Checksum files: coreutils cross-checks, round trips, fuzzing and edge cases."""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import need, run
from unbrick.errors import IntegrityError, SourceError, UsageError
from unbrick.trust.digests import (
    ALGORITHMS,
    CHUNK_BYTES,
    DIGEST_HEX_LENGTH,
    WEAK,
    hash_file,
    hash_stream,
)
from unbrick.trust.sums import (
    MAX_SUMS_BYTES,
    SumsFile,
    format_entry,
    load_sums,
    lookup,
    parse_sums,
)
from unbrick.trust.verify import verify_file

# Names coreutils must escape (backslash, newline) next to ordinary ones.
NAMES = ["plain.bin", "with space.img", "back\\slash.bin", "new\nline.bin", "cr\rname.bin"]
TOOLS = {"md5sum": "md5", "sha1sum": "sha1", "sha256sum": "sha256", "sha512sum": "sha512"}


def _make_files(tmp_path: Path) -> dict[str, bytes]:
    contents = {}
    for i, name in enumerate(NAMES):
        data = bytes([i]) * (1000 + i) + name.encode()
        (tmp_path / name).write_bytes(data)
        contents[name] = data
    return contents


# --- digests ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_hash_stream_matches_hashlib_for_every_algorithm() -> None:
    data = bytes(range(256)) * 9000  # > 2 chunks, not a multiple of the chunk size
    got = hash_stream(io.BytesIO(data), ALGORITHMS)
    assert got == {a: hashlib.new(a, data).hexdigest() for a in ALGORITHMS}
    assert {a: len(h) for a, h in got.items()} == DIGEST_HEX_LENGTH
    assert len(data) > 2 * CHUNK_BYTES
    assert frozenset({"md5", "sha1"}) == WEAK


@pytest.mark.unit
def test_hash_stream_reads_once_and_handles_empty_and_no_readinto() -> None:
    class Counting(io.BytesIO):
        reads = 0

        def readinto(self, b: object) -> int:  # type: ignore[override]
            Counting.reads += 1
            return super().readinto(b)  # type: ignore[arg-type]

    data = b"x" * (CHUNK_BYTES + 5)
    f = Counting(data)
    got = hash_stream(f, ["sha256", "md5", "sha256"])
    assert got == {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}
    assert Counting.reads == 3  # full chunk, 5 bytes, end of file: one pass for both digests
    assert hash_stream(io.BytesIO(b""), ["sha1"]) == {"sha1": hashlib.sha1(b"").hexdigest()}
    assert hash_stream(io.BytesIO(data), []) == {}

    class NoReadinto:
        def __init__(self) -> None:
            self.inner = io.BytesIO(data)

        def read(self, n: int) -> bytes:
            return self.inner.read(n)

    assert hash_stream(NoReadinto(), ["sha512"]) == {  # type: ignore[arg-type]
        "sha512": hashlib.sha512(data).hexdigest()
    }


@pytest.mark.unit
def test_unknown_algorithm_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown digest algorithm 'crc32'"):
        hash_stream(io.BytesIO(b""), ["crc32"])
    with pytest.raises(SourceError, match=r"cannot read .*missing\.bin"):
        hash_file(tmp_path / "missing.bin", ["sha256"])
    with pytest.raises(SourceError, match="cannot read"):
        hash_file(tmp_path, ["sha256"])


# --- cross-checks with coreutils ---------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize("tool", sorted(TOOLS))
@pytest.mark.parametrize("mode", ["text", "binary", "tag"])
def test_coreutils_sums_parse_and_verify(tmp_path: Path, tool: str, mode: str) -> None:
    need(tool)
    algorithm = TOOLS[tool]
    contents = _make_files(tmp_path)
    flag = {"text": [], "binary": ["-b"], "tag": ["--tag"]}[mode]
    out = run([tool, *flag, "--", *NAMES], cwd=tmp_path).stdout
    sums_path = tmp_path / "SUMS"
    sums_path.write_bytes(out)
    sums = load_sums(sums_path)
    assert sums.malformed == ()
    assert len(sums.entries) == len(NAMES)
    for name, data in contents.items():
        (entry,) = lookup(sums, tmp_path / name)
        assert entry.name == name
        assert entry.algorithm == algorithm
        assert entry.digest == hashlib.new(algorithm, data).hexdigest()
        assert entry.binary == (mode == "binary")
        assert entry.tagged == (mode == "tag")
        assert entry.weak == (algorithm in WEAK)
    # verify_file agrees; a changed byte fails.
    target = tmp_path / "with space.img"
    report = verify_file(target, sums=sums_path)
    assert report.ok
    assert [c.id for c in report.checks] == ["sums"]
    assert report.checks[0].weak == (algorithm in WEAK)
    data = bytearray(contents["with space.img"])
    data[10] ^= 1
    target.write_bytes(bytes(data))
    report = verify_file(target, sums=sums_path)
    assert not report.ok
    assert "MISMATCH" in report.checks[0].detail


@pytest.mark.peer
def test_b2sum_file_named_b2sums_is_blake2b(tmp_path: Path) -> None:
    need("b2sum")
    _make_files(tmp_path)
    (tmp_path / "B2SUMS").write_bytes(run(["b2sum", "--", *NAMES], cwd=tmp_path).stdout)
    report = verify_file(tmp_path / "back\\slash.bin", sums=tmp_path / "B2SUMS")
    assert report.ok, report.checks
    assert "blake2b" in report.digests
    (tmp_path / "tagged").write_bytes(run(["b2sum", "--tag", "plain.bin"], cwd=tmp_path).stdout)
    (entry,) = lookup(load_sums(tmp_path / "tagged"), "plain.bin")
    assert entry.algorithm == "blake2b"


@pytest.mark.peer
@pytest.mark.parametrize("tagged", [False, True])
@pytest.mark.parametrize("binary", [False, True])
def test_coreutils_accepts_what_format_entry_writes(
    tmp_path: Path, tagged: bool, binary: bool
) -> None:
    need("sha256sum")
    contents = _make_files(tmp_path)
    lines = [
        format_entry("sha256", hashlib.sha256(d).hexdigest(), n, tagged=tagged, binary=binary)
        for n, d in contents.items()
    ]
    (tmp_path / "S").write_text("\n".join(lines) + "\n", newline="")
    proc = run(["sha256sum", "--strict", "-c", "S"], cwd=tmp_path)
    assert proc.stdout.count(b": OK") == len(NAMES)
    # And coreutils writes byte for byte what we write.
    if not binary:
        flag = ["--tag"] if tagged else []
        theirs = run(["sha256sum", *flag, "--", *NAMES], cwd=tmp_path).stdout.decode()
        assert theirs == "\n".join(lines) + "\n"


@pytest.mark.peer
def test_coreutils_rejects_a_changed_byte_too(tmp_path: Path) -> None:
    need("sha256sum")
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "S").write_bytes(run(["sha256sum", "f"], cwd=tmp_path).stdout)
    (tmp_path / "f").write_bytes(b"abd")
    proc = subprocess.run(["sha256sum", "-c", "S"], cwd=tmp_path, capture_output=True)
    assert proc.returncode == 1
    report = verify_file(tmp_path / "f", sums=tmp_path / "S")
    assert not report.ok
    assert report.checks[0].error == "IntegrityError"


# --- hand-built formats and edge cases -----------------------------------------------------------

H32 = "d41d8cd98f00b204e9800998ecf8427e"
H64 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("line", "algorithm", "name", "binary"),
    [
        (f"{H64}  a.bin", "sha256", "a.bin", False),
        (f"{H64} *a.bin", "sha256", "a.bin", True),
        (f"{H32} a.bin", "md5", "a.bin", False),  # md5 -r / reversed BSD form
        (f"{H64.upper()}  a.bin", "sha256", "a.bin", False),
        (f"  {H64}  a.bin", "sha256", "a.bin", False),
        (f"{H64}   lead space", "sha256", " lead space", False),
        (f"\\{H64}  a\\\\b\\nc\\rd", "sha256", "a\\b\nc\rd", False),
        (f"{H64}  not\\escaped", "sha256", "not\\escaped", False),
        (f"SHA256 (a.bin) = {H64}", "sha256", "a.bin", False),
        (f"MD5 (x (1).bin) = {H32}", "md5", "x (1).bin", False),
        (f"SHA2-256(a.bin)= {H64}", "sha256", "a.bin", False),  # openssl dgst
        (f"\\SHA256 (a\\nb) = {H64}", "sha256", "a\nb", False),
        (f"SHA256 (a) = b) = {H64}", "sha256", "a) = b", False),
    ],
)
def test_line_forms(line: str, algorithm: str, name: str, binary: bool) -> None:
    sums = parse_sums((line + "\r\n").encode(), name="S")
    (entry,) = sums.entries
    assert (entry.algorithm, entry.name, entry.binary, entry.line) == (algorithm, name, binary, 1)
    assert entry.digest == entry.digest.lower()


@pytest.mark.unit
def test_comments_blank_lines_and_malformed_lines_are_numbered() -> None:
    text = "\n".join(
        [
            "# made by hand",
            "",
            f"{H64}  good.bin",
            "garbage here",
            f"{H64[:-1]}  short.bin",
            f"SHA256 (x) = {H32}",
            f"FOO (x) = {H64}",
            f"\\{H64}  bad\\escape",
            f"{H64}",
            f"{H64}x  nospace",
        ]
    )
    sums = parse_sums(text.encode(), name="SUMS")
    assert [e.name for e in sums.entries] == ["good.bin"]
    assert sums.entries[0].line == 3
    reasons = dict(sums.malformed)
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9, 10]
    assert "matches no supported algorithm" in reasons[5]
    assert "SHA256 digest has 32 hex digits, expected 64" in reasons[6]
    assert "unsupported checksum algorithm 'FOO'" in reasons[7]
    assert "invalid escape" in reasons[8]
    assert "expected a space" in reasons[9]
    assert sums.problems()[0].startswith("SUMS line 4: ")


@pytest.mark.unit
def test_no_valid_line_is_an_error() -> None:
    with pytest.raises(IntegrityError, match=r"S has no valid checksum line \(line 2: "):
        parse_sums(b"# c\n<html>\n", name="S")
    with pytest.raises(IntegrityError, match="S lists no checksums"):
        parse_sums(b"# only a comment\n\n", name="S")
    with pytest.raises(IntegrityError, match="lists no checksums"):
        parse_sums(b"", name="S")


@pytest.mark.unit
def test_lookup_by_basename_and_relative_path() -> None:
    h1, h2 = "1" * 64, "2" * 64
    sums = parse_sums(
        f"{h1}  ./out/fw.bin\n{h2}  other/fw.bin\n{h1}  boot.img\n{'3' * 32}  boot.img\n".encode(),
        name="SHA256SUMS",
    )
    (e,) = lookup(sums, "/home/me/out/fw.bin")
    assert e.digest == h1
    (e,) = lookup(sums, Path("other") / "fw.bin")
    assert e.digest == h2
    # Base name alone matches two entries with different digests: refuse to guess.
    with pytest.raises(IntegrityError, match=r"lists fw.bin twice with different sha256 digests"):
        lookup(sums, "fw.bin")
    # Two algorithms for one file: strong first.
    entries = lookup(sums, "/tmp/boot.img")
    assert [x.algorithm for x in entries] == ["sha256", "md5"]
    with pytest.raises(IntegrityError, match=r"^missing.bin is not listed in SHA256SUMS$"):
        lookup(sums, "/x/missing.bin")


@pytest.mark.unit
def test_duplicates() -> None:
    same = parse_sums(f"{H64}  a\n{H64}  ./a\n".encode(), name="S")
    assert len(lookup(same, "a")) == 1
    diff = parse_sums(f"{H64}  a\n{'0' * 64}  a\n".encode(), name="S")
    with pytest.raises(IntegrityError, match=r"lines 1 and 2"):
        lookup(diff, "a")


@pytest.mark.unit
def test_clearsigned_checksum_file_reads_only_the_signed_text() -> None:
    text = (
        f"{H64}  outside.bin\n"
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
        f"# SHA256 sums\nSHA256 (inside.bin) = {H64}\n- - dashed\n"
        "-----BEGIN PGP SIGNATURE-----\n\nabcd\n-----END PGP SIGNATURE-----\n"
    )
    plain = parse_sums(text.encode(), name="C")  # armor not first: an ordinary file
    assert not plain.clearsigned
    assert [e.name for e in plain.entries] == ["outside.bin", "inside.bin"]
    sums = parse_sums(text.split("\n", 1)[1].encode(), name="CHECKSUM")
    assert sums.clearsigned
    assert [e.name for e in sums.entries] == ["inside.bin"]
    assert [n for n, _ in sums.malformed] == [6]  # "- dashed" after dash-unescaping


@pytest.mark.unit
def test_load_sums_limits(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot read checksum file"):
        load_sums(tmp_path / "nope")
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(MAX_SUMS_BYTES + 1)
    with pytest.raises(SourceError, match="larger than"):
        load_sums(big)


@pytest.mark.unit
def test_format_entry_rejects_unknown_algorithm() -> None:
    with pytest.raises(UsageError):
        format_entry("crc32", "00", "x")


# --- properties --------------------------------------------------------------------------------

_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=40,
)


@st.composite
def _entries(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    n = draw(st.integers(1, 6))
    out = []
    for _ in range(n):
        algorithm = draw(st.sampled_from(sorted(set(ALGORITHMS) - {"blake2b"})))
        digest = draw(st.binary(min_size=DIGEST_HEX_LENGTH[algorithm] // 2,
                                max_size=DIGEST_HEX_LENGTH[algorithm] // 2)).hex()  # fmt: skip
        out.append((algorithm, digest, draw(_names)))
    return out


@pytest.mark.unit
@settings(deadline=None, max_examples=200)
@given(_entries(), st.booleans(), st.booleans(), st.booleans())
def test_round_trip(
    entries: list[tuple[str, str, str]], tagged: bool, binary: bool, crlf: bool
) -> None:
    eol = "\r\n" if crlf else "\n"
    text = eol.join(format_entry(a, d, n, tagged=tagged, binary=binary) for a, d, n in entries)
    sums = parse_sums((text + eol).encode("utf-8", "surrogateescape"), name="S")
    assert sums.malformed == ()
    got = [(e.algorithm, e.digest, e.name) for e in sums.entries]
    assert got == entries
    assert all(e.tagged == tagged for e in sums.entries)
    assert all(e.binary == (binary and not tagged) for e in sums.entries)


@pytest.mark.unit
@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=2000), st.text(max_size=30))
def test_fuzz_parser_gives_typed_errors_only(data: bytes, filename: str) -> None:
    try:
        sums = parse_sums(data, name="F")
    except IntegrityError:
        return
    assert isinstance(sums, SumsFile)
    assert sums.entries
    try:
        entries = lookup(sums, filename or "x")
    except IntegrityError:
        return
    assert entries


@pytest.mark.unit
@settings(deadline=None, max_examples=300)
@given(st.data())
def test_fuzz_mutated_valid_file(data: st.DataObject) -> None:
    valid = "\n".join(
        [f"{H64}  a.bin", f"SHA256 (b c) = {H64}", f"\\{H32}  d\\\\e", "# x"]
    ).encode()
    buf = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 8))):
        op = data.draw(st.sampled_from(["flip", "cut", "add"]))
        pos = data.draw(st.integers(0, len(buf)))
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del buf[pos:]
        else:
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        sums = parse_sums(bytes(buf), name="M")
    except IntegrityError:
        return
    for entry in sums.entries:
        assert len(entry.digest) == DIGEST_HEX_LENGTH[entry.algorithm]
        assert entry.name
