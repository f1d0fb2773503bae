"""The backup vault: encryption, content addressing, tamper detection, keys, bounded memory."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unbrick.engine.paths import WorkbenchPaths
from unbrick.engine.vault import HEADER_BYTES, KEY_BYTES, TAG_BYTES, BackupVault
from unbrick.errors import IntegrityError, KeyFileError, SourceError, UsageError

MiB = 1 << 20
SMALL_CHUNK = 4096


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def pieces(data: bytes, seed: int = 1) -> Iterator[bytes]:
    """``data`` cut into pieces of uneven sizes (as a device or a socket delivers them)."""
    rng = random.Random(seed)
    pos = 0
    while pos < len(data):
        n = rng.randint(1, 300_000)
        yield data[pos : pos + n]
        pos += n


@pytest.fixture
def vault(tmp_path: Path) -> BackupVault:
    return BackupVault(tmp_path / "data" / "vault", tmp_path / "config" / "vault.key")


@pytest.fixture
def small(tmp_path: Path) -> BackupVault:
    """Small chunks, so that a few KiB make several chunks."""
    return BackupVault(
        tmp_path / "data" / "vault", tmp_path / "config" / "vault.key", chunk_bytes=SMALL_CHUNK
    )


def meta(serial: str = "SN1", **extra: object) -> dict[str, object]:
    return {"device_identity": {"model": "R1", "serial": serial}, "job_id": "J1", **extra}


# ------------------------------------------------------------------ round trips


def test_round_trip_of_a_few_mib(vault: BackupVault) -> None:
    data = payload(3 * MiB + 12345)
    record = vault.put(pieces(data), meta())
    assert record.id == hashlib.sha256(data).hexdigest()
    assert record.size_bytes == len(data)
    assert record.meta["device_identity"]["serial"] == "SN1"
    assert record.meta["stored_at"] == record.created_at
    assert b"".join(vault.open(record.id)) == data
    assert vault.put([data], meta()).id == record.id  # one big piece
    record = vault.get(record.id)
    assert vault.verify(record.id) == record
    blob = vault.data_dir / "objects" / record.id[:2] / f"{record.id}.blob"
    assert blob.stat().st_size == HEADER_BYTES + len(data) + 4 * TAG_BYTES
    assert data[:4096] not in blob.read_bytes()
    assert list((vault.data_dir / "tmp").iterdir()) == []


def test_round_trip_from_a_file_object_and_empty(small: BackupVault) -> None:
    data = payload(3 * SMALL_CHUNK)  # an exact multiple of the chunk size
    record = small.put(io.BytesIO(data), meta())
    assert b"".join(small.open(record.id)) == data
    empty = small.put(iter([]), meta())
    assert empty.id == hashlib.sha256(b"").hexdigest() and empty.size_bytes == 0
    assert b"".join(small.open(empty.id)) == b""


def test_range_reads(small: BackupVault) -> None:
    data = payload(10 * SMALL_CHUNK + 777, seed=5)
    record = small.put([data], meta())
    rng = random.Random(9)
    cases = [(0, 0), (0, 1), (SMALL_CHUNK - 1, 2), (SMALL_CHUNK, SMALL_CHUNK), (len(data) - 1, 1)]
    cases += [(o, rng.randint(0, len(data) - o)) for o in rng.sample(range(len(data)), 20)]
    for offset, length in cases:
        assert (
            b"".join(small.open(record.id, offset=offset, length=length))
            == (data[offset : offset + length])
        ), (offset, length)
    assert b"".join(small.open(record.id, offset=len(data) - 10)) == data[-10:]
    with pytest.raises(UsageError, match="outside"):
        list(small.open(record.id, offset=len(data) - 1, length=2))


def test_metadata_is_encrypted(vault: BackupVault) -> None:
    record = vault.put([b"firmware bytes"], meta(serial="SECRET-SERIAL-42"))
    sidecar = vault.data_dir / "objects" / record.id[:2] / f"{record.id}.meta"
    assert b"SECRET-SERIAL-42" not in sidecar.read_bytes()
    assert vault.get(record.id).meta["device_identity"]["serial"] == "SECRET-SERIAL-42"


def test_metadata_may_be_given_after_the_stream(vault: BackupVault) -> None:
    facts: dict[str, object] = {}

    def stream() -> Iterator[bytes]:
        yield b"abc"
        facts["regions"] = [{"name": "env", "sha256": hashlib.sha256(b"abc").hexdigest()}]

    record = vault.put(stream(), lambda: meta(**facts))
    assert vault.get(record.id).meta["regions"][0]["name"] == "env"


def test_unserialisable_metadata_is_refused_before_reading(vault: BackupVault) -> None:
    def stream() -> Iterator[bytes]:
        raise AssertionError("read")
        yield b""

    with pytest.raises(UsageError, match="JSON"):
        vault.put(stream(), {"when": object()})


# ------------------------------------------------------------------ content addressing


def test_same_content_is_one_blob(vault: BackupVault) -> None:
    data = payload(200_000, seed=2)
    first = vault.put([data], meta(serial="A", job_id="J1"))
    second = vault.put(pieces(data), meta(serial="B", job_id="J2"))
    assert first.id == second.id
    blobs = list((vault.data_dir / "objects").rglob("*.blob"))
    assert len(blobs) == 1
    record = vault.get(first.id)
    assert record.meta["job_id"] == "J2" and record.device_serial == "B"
    assert [m["job_id"] for m in record.earlier] == ["J1"]
    assert record.serials() == {"A", "B"}
    assert [r.id for r in vault.list(device_serial="A")] == [first.id]
    assert [r.id for r in vault.list(device_serial="B")] == [first.id]
    # The same put again is not listed twice.
    vault.put([data], meta(serial="B", job_id="J2"))
    assert len(vault.get(first.id).earlier) == 1


def test_list_newest_first_and_by_device(vault: BackupVault) -> None:
    clock = iter(range(100, 200))
    v = BackupVault(vault.data_dir, vault.key_file, clock=lambda: float(next(clock)))
    ids = [v.put([bytes([i]) * 100], meta(serial="A" if i % 2 else "B")).id for i in range(5)]
    assert [r.id for r in v.list()] == list(reversed(ids))
    assert [r.id for r in v.list(device_serial="A")] == [ids[3], ids[1]]
    assert v.list(device_serial="C") == []


def test_resolve_prefixes(vault: BackupVault) -> None:
    # Two contents whose ids share their first four hex digits.
    seen: dict[str, bytes] = {}
    for i in range(100_000):
        content = f"backup {i}".encode()
        head = hashlib.sha256(content).hexdigest()[:4]
        if head in seen:
            a, b = seen[head], content
            break
        seen[head] = content
    ida = vault.put([a], meta()).id
    idb = vault.put([b], meta()).id
    other = vault.put([b"something else"], meta()).id
    assert vault.resolve(other[:6].upper()) == other
    assert vault.resolve(ida) == ida
    with pytest.raises(UsageError, match="ambiguous") as err:
        vault.resolve(ida[:4])
    assert ida[:16] in err.value.message and idb[:16] in err.value.message
    assert vault.resolve(ida[:20]) == ida
    with pytest.raises(UsageError, match="no backup"):
        vault.resolve("ffff0000" if not other.startswith("ffff0000") else "eeee0000")
    for bad in ("abc", "xyz123", ""):
        with pytest.raises(UsageError):
            vault.resolve(bad)


def test_unknown_ids(vault: BackupVault) -> None:
    vault.put([b"x"], meta())
    missing = "0" * 64
    with pytest.raises(UsageError, match="no backup"):
        vault.get(missing)
    with pytest.raises(UsageError, match="no backup"):
        vault.open(missing)
    with pytest.raises(UsageError, match="full backup id"):
        vault.get("abcd")


def test_a_failing_stream_leaves_nothing(vault: BackupVault) -> None:
    def stream() -> Iterator[bytes]:
        yield b"a" * 100_000
        raise SourceError("the device went away")

    with pytest.raises(SourceError, match="went away"):
        vault.put(stream(), meta())
    assert vault.list() == []
    assert list((vault.data_dir / "tmp").iterdir()) == []


# ------------------------------------------------------------------ tampering


def _blob(v: BackupVault, backup_id: str) -> Path:
    return v.data_dir / "objects" / backup_id[:2] / f"{backup_id}.blob"


def _chunk_span(index: int) -> tuple[int, int]:
    start = HEADER_BYTES + index * (SMALL_CHUNK + TAG_BYTES)
    return start, start + SMALL_CHUNK + TAG_BYTES


@pytest.fixture
def stored(small: BackupVault) -> tuple[BackupVault, str, bytes]:
    data = payload(5 * SMALL_CHUNK + 100, seed=7)  # chunks 0..5, the last one short
    return small, small.put([data], meta()).id, data


def test_flipped_byte_names_backup_and_chunk(stored: tuple[BackupVault, str, bytes]) -> None:
    v, backup_id, _ = stored
    path = _blob(v, backup_id)
    raw = bytearray(path.read_bytes())
    raw[_chunk_span(2)[0] + 10] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError) as err:
        b"".join(v.open(backup_id))
    assert backup_id in err.value.message and "chunk 2" in err.value.message
    with pytest.raises(IntegrityError, match="chunk 2"):
        v.verify(backup_id)
    # A range that avoids the damaged chunk still reads.
    assert len(b"".join(v.open(backup_id, offset=0, length=SMALL_CHUNK))) == SMALL_CHUNK


@pytest.mark.parametrize("cut", ["last-chunk", "mid-chunk", "header"])
def test_truncation_is_detected(stored: tuple[BackupVault, str, bytes], cut: str) -> None:
    v, backup_id, _ = stored
    path = _blob(v, backup_id)
    raw = path.read_bytes()
    size = {"last-chunk": _chunk_span(5)[0], "mid-chunk": _chunk_span(3)[0] + 50, "header": 40}
    path.write_bytes(raw[: size[cut]])
    with pytest.raises(IntegrityError, match="truncated"):
        b"".join(v.open(backup_id))


def test_truncation_with_a_forged_size_fails_authentication(
    stored: tuple[BackupVault, str, bytes],
) -> None:
    """Dropping the last chunk and editing the header's size to match is still caught."""
    v, backup_id, _ = stored
    path = _blob(v, backup_id)
    raw = bytearray(path.read_bytes()[: _chunk_span(5)[0]])
    raw[32:40] = (5 * SMALL_CHUNK).to_bytes(8, "big")  # plaintext size field
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="chunk 4"):
        b"".join(v.open(backup_id))
    with pytest.raises(IntegrityError, match="chunk 4"):
        b"".join(v.open(backup_id, offset=0, length=10))


def test_swapped_chunks_are_detected(stored: tuple[BackupVault, str, bytes]) -> None:
    v, backup_id, _ = stored
    path = _blob(v, backup_id)
    raw = path.read_bytes()
    (a0, a1), (b0, b1) = _chunk_span(1), _chunk_span(3)
    swapped = raw[:a0] + raw[b0:b1] + raw[a1:b0] + raw[a0:a1] + raw[b1:]
    assert len(swapped) == len(raw)
    path.write_bytes(swapped)
    with pytest.raises(IntegrityError, match="chunk 1"):
        b"".join(v.open(backup_id))


def test_a_chunk_from_another_backup_is_detected(small: BackupVault) -> None:
    one = small.put([payload(3 * SMALL_CHUNK, seed=1)], meta()).id
    two = small.put([payload(3 * SMALL_CHUNK, seed=2)], meta()).id
    p1, p2 = _blob(small, one), _blob(small, two)
    raw1, raw2 = p1.read_bytes(), p2.read_bytes()
    a, b = _chunk_span(1)
    p1.write_bytes(raw1[:a] + raw2[a:b] + raw1[b:])
    with pytest.raises(IntegrityError, match="chunk 1"):
        b"".join(small.open(one))


def test_a_whole_blob_under_another_id_is_detected(small: BackupVault) -> None:
    one = small.put([payload(3 * SMALL_CHUNK, seed=1)], meta()).id
    two = small.put([payload(3 * SMALL_CHUNK, seed=2)], meta()).id
    raw2 = _blob(small, two).read_bytes()
    _blob(small, one).write_bytes(raw2)
    with pytest.raises(IntegrityError, match="holds backup"):
        b"".join(small.open(one))
    # ...also with the id in the header forged: the final chunk authenticates the header.
    forged = bytearray(raw2)
    forged[40:72] = bytes.fromhex(one)
    _blob(small, one).write_bytes(bytes(forged))
    with pytest.raises(IntegrityError, match="chunk 2"):
        b"".join(small.open(one, offset=0, length=100))


def test_wrong_key_is_an_integrity_error(stored: tuple[BackupVault, str, bytes], tmp_path: Path):
    v, backup_id, _ = stored
    other_key = tmp_path / "other" / "vault.key"
    other = BackupVault(v.data_dir, other_key)
    other.put([b"creates the other key"], meta())
    with pytest.raises(IntegrityError, match="another key") as err:
        b"".join(other.open(backup_id))
    assert "key id" in err.value.message
    with pytest.raises(IntegrityError, match="another key"):
        other.get(backup_id)
    with pytest.raises(IntegrityError, match="another key"):
        other.list()
    # A forged key id does not help: the chunks still fail authentication.
    path = _blob(v, backup_id)
    raw = bytearray(path.read_bytes())
    raw[16:24] = bytes.fromhex(other.key_id)
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="chunk 0"):
        b"".join(other.open(backup_id))


def test_tampered_metadata(stored: tuple[BackupVault, str, bytes], caplog) -> None:
    v, backup_id, _ = stored
    good = v.put([b"another"], meta()).id
    sidecar = v.data_dir / "objects" / backup_id[:2] / f"{backup_id}.meta"
    raw = bytearray(sidecar.read_bytes())
    raw[-5] ^= 0x80
    sidecar.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="metadata"):
        v.get(backup_id)
    with caplog.at_level(logging.WARNING, logger="unbrick.engine.vault"):
        assert [r.id for r in v.list()] == [good]
    assert backup_id in caplog.text
    sidecar.unlink()
    with pytest.raises(IntegrityError, match="metadata file is missing"):
        v.get(backup_id)


# ------------------------------------------------------------------ the key


def test_key_created_0600_on_first_put(vault: BackupVault) -> None:
    assert not vault.key_file.exists()
    assert vault.list() == []  # reading an empty vault creates no key
    assert not vault.key_file.exists()
    vault.put([b"x"], meta())
    st = vault.key_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == KEY_BYTES
    assert stat.S_IMODE(vault.data_dir.stat().st_mode) == 0o700
    # Loaded, not replaced, by the next vault object.
    key = vault.key_file.read_bytes()
    again = BackupVault(vault.data_dir, vault.key_file)
    again.put([b"y"], meta())
    assert vault.key_file.read_bytes() == key
    assert again.key_id == vault.key_id


def test_key_inside_the_vault_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "vault"
    for key in (data / "vault.key", data / "sub" / "k", data):
        with pytest.raises(UsageError, match="never stored beside the data"):
            BackupVault(data, key)
    with pytest.raises(UsageError, match="never stored beside the data"):
        BackupVault(tmp_path / "x" / ".." / "vault", tmp_path / "vault" / "k")
    assert not data.exists()


def test_bad_key_files_are_refused(vault: BackupVault) -> None:
    vault.put([b"x"], meta())
    backup_id = vault.list()[0].id
    vault.key_file.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others") as err:
        BackupVault(vault.data_dir, vault.key_file).get(backup_id)
    assert "chmod 600" in err.value.hint
    vault.key_file.write_bytes(b"short")
    vault.key_file.chmod(0o600)
    with pytest.raises(KeyFileError, match="5 bytes"):
        BackupVault(vault.data_dir, vault.key_file).get(backup_id)
    vault.key_file.unlink()
    with pytest.raises(KeyFileError, match="does not exist"):
        BackupVault(vault.data_dir, vault.key_file).list()


def test_workbench_paths_keep_the_key_away_from_the_vault(tmp_path: Path) -> None:
    paths = WorkbenchPaths.from_env({"UNBRICK_HOME": str(tmp_path / "home")}).ensure()
    assert paths.vault_dir.is_relative_to(paths.data_dir)
    assert paths.key_file.parent == paths.config_dir
    for d in (paths.data_dir, paths.config_dir, paths.state_dir, paths.vault_dir):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    v = BackupVault(paths.vault_dir, paths.key_file)
    assert b"".join(v.open(v.put([b"ok"], meta()).id)) == b"ok"
    with pytest.raises(UsageError):
        BackupVault(paths.data_dir, paths.data_dir / "vault" / "k")


@pytest.mark.unit
def test_workbench_paths_from_env() -> None:
    p = WorkbenchPaths.from_env({"HOME": "/home/t"})
    assert p.data_dir == Path("/home/t/.local/share/unbrick")
    assert p.config_dir == Path("/home/t/.config/unbrick")
    assert p.state_dir == Path("/home/t/.local/state/unbrick")
    assert p.db_path.parent == p.data_dir and p.vault_dir == p.data_dir / "vault"
    assert p.key_file == Path("/home/t/.config/unbrick/vault.key")
    x = WorkbenchPaths.from_env(
        {"HOME": "/h", "XDG_DATA_HOME": "/d", "XDG_CONFIG_HOME": "rel", "XDG_STATE_HOME": "/s"}
    )
    assert (x.data_dir, x.config_dir, x.state_dir) == (
        Path("/d/unbrick"),
        Path("/h/.config/unbrick"),  # a relative XDG path is ignored
        Path("/s/unbrick"),
    )
    u = WorkbenchPaths.from_env({"UNBRICK_HOME": "/u", "XDG_DATA_HOME": "/d"})
    assert (u.data_dir, u.config_dir, u.state_dir) == (
        Path("/u/data"),
        Path("/u/config"),
        Path("/u/state"),
    )
    with pytest.raises(UsageError, match="HOME is not set") as err:
        WorkbenchPaths.from_env({})
    assert "UNBRICK_HOME" in err.value.hint


# ------------------------------------------------------------------ bounded memory

_MEASURE = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""

_STREAM_256 = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    from unbrick.engine.vault import BackupVault

    MiB = 1 << 20
    block = hashlib.shake_256(b"seed").digest(MiB)

    def source():
        for i in range(256):
            yield i.to_bytes(8, "big") + block[8:]

    expect = hashlib.sha256()
    for piece in source():
        expect.update(piece)
    vault = BackupVault(Path(sys.argv[1]), Path(sys.argv[2]))
    record = vault.put(source(), {"job_id": "J1"})
    assert record.id == expect.hexdigest(), record.id
    got = hashlib.sha256()
    total = 0
    for piece in vault.open(record.id):
        got.update(piece)
        total += len(piece)
    assert total == 256 * MiB and got.hexdigest() == record.id
    """
)


@pytest.mark.slow
def test_256_mib_put_and_open_in_bounded_memory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _MEASURE,
            sys.executable,
            "-c",
            _STREAM_256,
            str(tmp_path / "vault"),
            str(tmp_path / "config" / "vault.key"),
        ],
        capture_output=True,
        check=False,
        timeout=600,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr.decode()
    code, rss_kib = (int(x) for x in proc.stdout.split())
    assert code == 0, proc.stderr.decode()
    assert rss_kib < 100 * 1024, f"peak RSS {rss_kib} KiB"


# ------------------------------------------------------------------ property and fuzz tests


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[BackupVault, str, bytes]:
    root = tmp_path_factory.mktemp("fuzz")
    v = BackupVault(root / "vault", root / "key", chunk_bytes=1024)
    data = random.Random(3).randbytes(5 * 1024 + 300)
    return v, v.put([data], meta()).id, data


_FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_FUZZ
@given(pieces_=st.lists(st.binary(max_size=3000), max_size=8))
def test_any_content_round_trips(
    shared: tuple[BackupVault, str, bytes], pieces_: list[bytes]
) -> None:
    v = shared[0]
    data = b"".join(pieces_)
    record = v.put(iter(pieces_), meta())
    assert record.id == hashlib.sha256(data).hexdigest()
    assert b"".join(v.open(record.id)) == data


@_FUZZ
@given(offset=st.integers(0, 5 * 1024 + 300), length=st.integers(0, 6000))
def test_any_range_reads_the_same_bytes(
    shared: tuple[BackupVault, str, bytes], offset: int, length: int
) -> None:
    v, backup_id, data = shared
    length = min(length, len(data) - offset)
    got = b"".join(v.open(backup_id, offset=offset, length=length))
    assert got == data[offset : offset + length]


@_FUZZ
@given(bit=st.integers(0, (HEADER_BYTES + 6 * TAG_BYTES + 5 * 1024 + 300) * 8 - 1))
def test_any_flipped_bit_is_an_integrity_error(
    shared: tuple[BackupVault, str, bytes], bit: int
) -> None:
    v, backup_id, _ = shared
    path = _blob(v, backup_id)
    good = path.read_bytes()
    bad = bytearray(good)
    bad[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(bad))
    try:
        with pytest.raises(IntegrityError):
            b"".join(v.open(backup_id))
    finally:
        path.write_bytes(good)


@_FUZZ
@given(junk=st.binary(max_size=4000), which=st.sampled_from(["blob", "meta"]))
def test_random_files_give_typed_errors_only(
    shared: tuple[BackupVault, str, bytes], junk: bytes, which: str
) -> None:
    v = shared[0]
    fake_id = hashlib.sha256(b"fuzz target").hexdigest()
    folder = v.data_dir / "objects" / fake_id[:2]
    folder.mkdir(parents=True, exist_ok=True)
    other = "meta" if which == "blob" else "blob"
    (folder / f"{fake_id}.{which}").write_bytes(junk)
    (folder / f"{fake_id}.{other}").unlink(missing_ok=True)
    try:
        with pytest.raises(IntegrityError):
            if which == "blob":
                b"".join(v.open(fake_id))
            else:
                v.get(fake_id)
    finally:
        (folder / f"{fake_id}.{which}").unlink()


def test_stale_temporary_files_are_swept(vault: BackupVault) -> None:
    vault.put([b"first"], meta())
    tmp = vault.data_dir / "tmp"
    old, fresh = tmp / "put.dead.part", tmp / "put.running.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (1_000_000, 1_000_000))
    vault.put([b"second"], meta())
    assert not old.exists() and fresh.exists()


def test_metadata_failing_after_the_stream_stores_nothing(vault: BackupVault) -> None:
    with pytest.raises(UsageError, match="JSON"):
        vault.put([b"content"], lambda: {"bad": object()})
    assert list((vault.data_dir / "objects").rglob("*")) == []
