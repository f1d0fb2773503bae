"""The backup vault: content-addressed, encrypted, streamed backups.

A backup's id is the SHA-256 of its plaintext, so the same content stored twice is one blob.
Blobs and their metadata (device identities are sensitive) are encrypted with AES-256-GCM under
one 32-byte key that lives in a file outside the vault directory.

Blob file (``objects/<id[:2]>/<id>.blob``)::

    header (72 bytes): b"UBKVBLOB" | version u8 | 3 reserved | chunk size u32 | key id 8 |
                       nonce prefix 8 | plaintext size u64 | id (raw SHA-256) 32
    then one record per chunk: AES-GCM ciphertext of ``chunk size`` plaintext bytes (fewer in
    the last chunk, which may be empty) followed by its 16-byte tag.

Each chunk's nonce is the file's random 8-byte prefix followed by the chunk index (u32, big
endian); its associated data is b"UBKV" + index + final flag, and for the final chunk also the
whole header. So reordering, swapping chunks between files, truncation at a chunk boundary and
header edits all fail authentication. The id (the hash of the plaintext) is known only once the
last byte has been read, which is why a single streaming pass can bind it only in the final
chunk; the random per-file nonce prefix binds every other chunk to this file, and a full read
also checks the plaintext's SHA-256 against the id.

Metadata (``<id>.meta``): b"UBKVMETA" | key id 8 | nonce 12 | AES-GCM(JSON) with the id as
associated data. The JSON lists the puts of this content (``takes``): each caller's ``meta``
plus ``stored_at``. :class:`BackupRecord` shows the latest put's meta and keeps the earlier
ones (the same bytes may come from two devices, e.g. two erased flashes).

Key file: 32 random bytes, created on the first ``put`` with mode 0600 (through a temporary
file and a hard link, so two processes never see half a key). A key file that is readable by
group or others, or that is not exactly 32 bytes, is refused with KeyFileError, as ssh refuses
an open private key: anyone who can read it can read every backup. A key file inside the vault
directory is refused (UsageError): the key is never stored beside the data.

Writes go to ``tmp/`` and are fsynced and renamed into place; a put of content already in the
vault replaces the blob with the freshly written copy (the bytes are equal by hash, and a
damaged old copy is healed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from unbrick.errors import IntegrityError, KeyFileError, SourceError, UsageError

if sys.platform != "win32":
    import fcntl

log = logging.getLogger(__name__)

KEY_BYTES = 32
CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 1 << 10
MAX_CHUNK_BYTES = 16 << 20
TAG_BYTES = 16
MAX_META_BYTES = 16 << 20

_BLOB_MAGIC = b"UBKVBLOB"
_META_MAGIC = b"UBKVMETA"
_VERSION = 1
_HEADER = struct.Struct(">8sB3xI8s8sQ32s")
HEADER_BYTES = _HEADER.size  # 72
_MIN_PREFIX_CHARS = 4
_HEX = frozenset("0123456789abcdef")
_LIST_HINT = "list the backups with 'unbrick backup list'"


@dataclass(frozen=True)
class BackupRecord:
    """One backup in the vault.

    ``meta`` is what the latest put of this content passed (plus ``stored_at``): device
    identity, regions, job id, how the read was verified. ``earlier`` holds the metas of earlier
    puts of the same content, oldest first.
    """

    id: str
    size_bytes: int
    created_at: float
    meta: dict[str, Any]
    earlier: tuple[dict[str, Any], ...] = field(default=())

    @property
    def device_serial(self) -> str | None:
        return _serial_of(self.meta)

    def serials(self) -> set[str]:
        """Serials of every device this content was backed up from."""
        found = {_serial_of(m) for m in (*self.earlier, self.meta)}
        return {s for s in found if s is not None}

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def created_iso(self) -> str:
        """``created_at`` as UTC ISO 8601 (``2026-01-01T12:00:00Z``)."""
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created_at))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "size_bytes": self.size_bytes,
            "created_at": self.created_at,
            "created_iso": self.created_iso,
            "meta": self.meta,
            "earlier": list(self.earlier),
        }


def _serial_of(meta: dict[str, Any]) -> str | None:
    identity = meta.get("device_identity")
    if isinstance(identity, dict) and identity.get("serial") is not None:
        return str(identity["serial"])
    return None


class _WrongKey(IntegrityError):
    """The data was encrypted under another key (every backup is then unreadable)."""


def _key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"unbrick vault key id\0" + key).digest()[:8]


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def _chunk_aad(index: int, final: bool, header: bytes) -> bytes:
    head = b"UBKV" + struct.pack(">IB", index, 1 if final else 0)
    return head + header if final else head


def _chunk_count(size: int, chunk: int) -> int:
    return max(1, -(-size // chunk))


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rechunk(stream: Iterable[bytes] | BinaryIO, size: int) -> Iterator[bytes]:
    """Pieces of exactly ``size`` bytes (the last one shorter, never empty)."""
    if hasattr(stream, "read"):
        reader = cast(BinaryIO, stream)
        while True:
            buf = bytearray()
            while len(buf) < size:
                piece = reader.read(size - len(buf))
                if not piece:
                    break
                buf += piece
            if buf:
                yield bytes(buf)
            if len(buf) < size:
                return
    pending = bytearray()
    for piece in stream:
        pending += piece
        if len(pending) < size:
            continue
        # Cut whole chunks through a view and compact once, so that a huge piece is not
        # shifted in memory once per chunk.
        view = memoryview(pending)
        pos = 0
        while len(pending) - pos >= size:
            yield bytes(view[pos : pos + size])
            pos += size
        view.release()
        del pending[:pos]
    if pending:
        yield bytes(pending)


def _sweep(tmp_dir: Path, max_age_s: float = 86400.0) -> None:
    """Remove temporary files left by puts that died more than ``max_age_s`` ago."""
    limit = time.time() - max_age_s
    for entry in tmp_dir.glob("*.part"):
        with contextlib.suppress(OSError):
            if entry.stat().st_mtime < limit:
                entry.unlink()
                log.info("removed stale temporary file %s", entry)


def _mkdir_private(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):
            path.chmod(0o700)


class _Lock:
    """An advisory lock on a file in the vault (serialises metadata updates between
    processes; a no-op where fcntl does not exist)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> _Lock:
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        if sys.platform != "win32":
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


class BackupVault:
    """Encrypted, content-addressed backups under ``data_dir``, keyed by ``key_file``."""

    def __init__(
        self,
        data_dir: Path,
        key_file: Path,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.key_file = Path(key_file)
        data = Path(os.path.abspath(self.data_dir)).resolve()
        key = Path(os.path.abspath(self.key_file)).resolve()
        if key == data or key.is_relative_to(data):
            raise UsageError(
                f"key file {self.key_file} is inside the vault directory {self.data_dir}: "
                "the key is never stored beside the data",
                hint="keep the key in the config directory (see WorkbenchPaths)",
            )
        if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise UsageError(
                f"chunk size {chunk_bytes} is outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} bytes"
            )
        self.chunk_bytes = chunk_bytes
        self._clock = clock
        self._key: bytes | None = None

    # ------------------------------------------------------------------ the key

    def _load_key(self, *, create: bool) -> bytes:
        if self._key is not None:
            return self._key
        try:
            fd = os.open(self.key_file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            if not create:
                raise KeyFileError(
                    f"vault key file {self.key_file} does not exist, so the backups in "
                    f"{self.data_dir} cannot be decrypted",
                    hint="restore the key file from where you keep its copy",
                ) from None
            self._key = self._create_key()
            return self._key
        except OSError as e:
            raise KeyFileError(f"vault key file {self.key_file}: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            if sys.platform != "win32" and st.st_mode & 0o077:
                raise KeyFileError(
                    f"vault key file {self.key_file} is readable by others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); anyone who can read it can read "
                    "every backup",
                    hint=f"run 'chmod 600 {self.key_file}'",
                )
            raw = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(raw) != KEY_BYTES:
            raise KeyFileError(
                f"vault key file {self.key_file} holds {len(raw)} bytes, not {KEY_BYTES}: "
                "it is not an unbrick vault key",
                hint="point to the right key file; a damaged key cannot be repaired",
            )
        self._key = raw
        return raw

    def _create_key(self) -> bytes:
        key = os.urandom(KEY_BYTES)
        directory = self.key_file.parent
        try:
            _mkdir_private(directory)
            fd, tmp = tempfile.mkstemp(prefix=".vault-key.", dir=directory)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.key_file)  # fails if another process made one first
            except FileExistsError:
                os.unlink(tmp)
                self._key = None
                return self._load_key(create=False)
            os.unlink(tmp)
            _fsync_dir(directory)
        except OSError as e:
            raise KeyFileError(f"cannot create vault key file {self.key_file}: {e}") from e
        log.info("created vault key %s (key id %s)", self.key_file, _key_id(key).hex())
        return key

    @property
    def key_id(self) -> str:
        """Hex id of the key (a hash of it, safe to show) — creates no key."""
        return _key_id(self._load_key(create=False)).hex()

    # ------------------------------------------------------------------ paths

    def _objects(self) -> Path:
        return self.data_dir / "objects"

    def _blob_path(self, backup_id: str) -> Path:
        return self._objects() / backup_id[:2] / f"{backup_id}.blob"

    def _meta_path(self, backup_id: str) -> Path:
        return self._objects() / backup_id[:2] / f"{backup_id}.meta"

    @staticmethod
    def _check_id(backup_id: str) -> str:
        if len(backup_id) != 64 or not set(backup_id) <= _HEX:
            raise UsageError(
                f"{backup_id!r} is not a full backup id (64 lower-case hex digits)",
                hint="resolve a short id with BackupVault.resolve()",
            )
        return backup_id

    # ------------------------------------------------------------------ put

    def put(
        self,
        stream: Iterable[bytes] | BinaryIO,
        meta: dict[str, Any] | Callable[[], dict[str, Any]],
    ) -> BackupRecord:
        """Encrypt and store the plaintext of ``stream`` (constant memory); record ``meta``.

        ``meta`` may also be a function returning it, called once the stream has been consumed
        (a producer that learns facts while streaming, such as per-region hashes, fills them
        in there). Returns the record of the stored backup, whose id is the plaintext's SHA-256.
        """
        if not callable(meta):
            _json(meta)  # refuse unserialisable metadata before reading a byte
        key = self._load_key(create=True)
        aes = AESGCM(key)
        tmp_dir = self.data_dir / "tmp"
        try:
            _mkdir_private(self.data_dir)
            _mkdir_private(tmp_dir)
            _sweep(tmp_dir)
            fd, tmp_name = tempfile.mkstemp(prefix="put.", suffix=".part", dir=tmp_dir)
        except OSError as e:
            raise SourceError(f"{self.data_dir}: cannot write to the vault: {e}") from e
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w+b") as f:
                backup_id, size = self._encrypt(aes, key, stream, f)
                f.flush()
                os.fsync(f.fileno())
            facts = meta() if callable(meta) else meta
            _json(facts)  # before the blob is in place: no backup without its metadata
            target = self._blob_path(backup_id)
            _mkdir_private(target.parent)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
            record = self._add_take(aes, key, backup_id, size, facts)
        except OSError as e:
            raise SourceError(f"{self.data_dir}: writing a backup failed: {e}") from e
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        log.info("stored backup %s (%d bytes)", backup_id[:12], size)
        return record

    def _encrypt(
        self, aes: AESGCM, key: bytes, stream: Iterable[bytes] | BinaryIO, f: BinaryIO
    ) -> tuple[str, int]:
        chunk = self.chunk_bytes
        prefix = os.urandom(8)
        f.write(b"\0" * HEADER_BYTES)  # the real header is written once the id is known
        digest = hashlib.sha256()
        size = 0
        pieces = _rechunk(stream, chunk)
        current = next(pieces, b"")
        index = 0
        while True:
            following = next(pieces, None)
            digest.update(current)
            size += len(current)
            header = b""
            if following is None:
                header = _HEADER.pack(
                    _BLOB_MAGIC, _VERSION, chunk, _key_id(key), prefix, size, digest.digest()
                )
            aad = _chunk_aad(index, following is None, header)
            f.write(aes.encrypt(_nonce(prefix, index), current, aad))
            if following is None:
                f.seek(0)
                f.write(header)
                return digest.hexdigest(), size
            current = following
            index += 1
            if index >= 1 << 32:
                raise UsageError("backup too large for one vault blob (2^32 chunks)")

    def _add_take(
        self, aes: AESGCM, key: bytes, backup_id: str, size: int, meta: dict[str, Any]
    ) -> BackupRecord:
        take = {**json.loads(_json(meta)), "stored_at": self._clock()}
        with _Lock(self.data_dir / ".lock"):
            path = self._meta_path(backup_id)
            takes: list[dict[str, Any]] = []
            if path.exists():
                try:
                    takes = list(self._read_meta(backup_id, key)["takes"])
                except IntegrityError as e:
                    log.warning("backup %s: replacing unreadable metadata: %s", backup_id, e)
            plain = {k: v for k, v in take.items() if k != "stored_at"}
            takes = [t for t in takes if {k: v for k, v in t.items() if k != "stored_at"} != plain]
            takes.append(take)
            doc = {"version": _VERSION, "id": backup_id, "size_bytes": size, "takes": takes}
            nonce = os.urandom(12)
            sealed = aes.encrypt(nonce, _json(doc).encode(), backup_id.encode())
            fd, tmp = tempfile.mkstemp(prefix="meta.", suffix=".part", dir=self.data_dir / "tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_META_MAGIC + _key_id(key) + nonce + sealed)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            _fsync_dir(path.parent)
        return _record(doc)

    # ------------------------------------------------------------------ metadata

    def _read_meta(self, backup_id: str, key: bytes) -> dict[str, Any]:
        path = self._meta_path(backup_id)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_META_BYTES + 1)
        except FileNotFoundError:
            if self._blob_path(backup_id).exists():
                raise IntegrityError(
                    f"backup {backup_id}: the metadata file is missing",
                    hint="the backup was interrupted or files were deleted; take a new backup",
                ) from None
            raise UsageError(f"no backup {backup_id} in {self.data_dir}", hint=_LIST_HINT) from None
        except OSError as e:
            raise SourceError(f"{path}: cannot read backup metadata: {e.strerror}") from e
        head = len(_META_MAGIC) + 8 + 12
        if (
            len(raw) > MAX_META_BYTES
            or len(raw) < head + TAG_BYTES
            or not raw.startswith(_META_MAGIC)
        ):
            raise IntegrityError(f"backup {backup_id}: the metadata file is damaged")
        kid = raw[len(_META_MAGIC) : len(_META_MAGIC) + 8]
        if kid != _key_id(key):
            raise self._wrong_key(backup_id, kid, key)
        try:
            plain = AESGCM(key).decrypt(raw[head - 12 : head], raw[head:], backup_id.encode())
        except InvalidTag:
            raise IntegrityError(
                f"backup {backup_id}: the metadata failed authentication (the file was changed)"
            ) from None
        try:
            doc = json.loads(plain)
            if not isinstance(doc, dict) or doc.get("id") != backup_id:
                raise ValueError("it names another backup")
            _record(doc)  # every field a record needs is there
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise IntegrityError(f"backup {backup_id}: the metadata is malformed: {e}") from e
        return doc

    def _wrong_key(self, backup_id: str, kid: bytes, key: bytes) -> IntegrityError:
        return _WrongKey(
            f"backup {backup_id} was encrypted with another key (key id {kid.hex()}; "
            f"{self.key_file} has key id {_key_id(key).hex()})",
            hint="use the key file this vault was created with",
        )

    def get(self, backup_id: str) -> BackupRecord:
        """The record of one backup (full id; see :meth:`resolve` for short ids)."""
        self._check_id(backup_id)
        if not self._meta_path(backup_id).exists() and not self._blob_path(backup_id).exists():
            raise UsageError(f"no backup {backup_id} in {self.data_dir}", hint=_LIST_HINT)
        key = self._load_key(create=False)
        return _record(self._read_meta(backup_id, key))

    def _ids(self) -> list[str]:
        objects = self._objects()
        if not objects.is_dir():
            return []
        found = set()
        for sub in objects.iterdir():
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for entry in sub.iterdir():
                stem, _, ext = entry.name.partition(".")
                if ext in ("blob", "meta") and len(stem) == 64 and set(stem) <= _HEX:
                    found.add(stem)
        return sorted(found)

    def list(self, device_serial: str | None = None) -> list[BackupRecord]:
        """Backups, newest first; with ``device_serial``, those taken from that device.

        A backup whose metadata is damaged is left out with a logged warning; metadata written
        under another key is an IntegrityError (every backup would be missing otherwise).
        """
        ids = self._ids()
        if not ids:
            return []
        key = self._load_key(create=False)
        records = []
        for backup_id in ids:
            try:
                record = _record(self._read_meta(backup_id, key))
            except _WrongKey:
                raise
            except IntegrityError as e:
                log.warning("skipping backup %s: %s", backup_id, e.message)
                continue
            if device_serial is None or device_serial in record.serials():
                records.append(record)
        records.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return records

    def resolve(self, prefix: str) -> str:
        """The full id of the one backup whose id starts with ``prefix`` (like git)."""
        text = prefix.strip().lower()
        if len(text) < _MIN_PREFIX_CHARS or not set(text) <= _HEX:
            raise UsageError(
                f"{prefix!r} is not a backup id prefix (at least {_MIN_PREFIX_CHARS} hex digits)",
                hint=_LIST_HINT,
            )
        matches = [i for i in self._ids() if i.startswith(text)]
        if not matches:
            raise UsageError(f"no backup id starts with {text}", hint=_LIST_HINT)
        if len(matches) > 1:
            shown = ", ".join(m[:16] for m in matches[:5])
            more = f" and {len(matches) - 5} more" if len(matches) > 5 else ""
            raise UsageError(
                f"backup id prefix {text} is ambiguous: {shown}{more}",
                hint="give more digits of the id",
            )
        return matches[0]

    # ------------------------------------------------------------------ reading

    def open(
        self, backup_id: str, *, offset: int = 0, length: int | None = None
    ) -> Iterator[bytes]:
        """Decrypt a backup as a stream of pieces (constant memory).

        With the defaults the whole plaintext is yielded and its SHA-256 is checked against the
        id at the end. ``offset``/``length`` yield a byte range of the plaintext, seeking to the
        chunks that hold it (each chunk is still authenticated; the whole-content hash is not
        computed). Any damage raises IntegrityError naming the backup and the chunk; pieces
        already yielded came from authenticated chunks, but the stream is complete only when
        it ends without an error (use :meth:`verify` before a destructive use of the whole).
        """
        self._check_id(backup_id)
        if offset < 0 or (length is not None and length < 0):
            raise UsageError(f"bad range {offset}+{length} in backup {backup_id[:12]}")
        key = self._load_key(create=False)
        path = self._blob_path(backup_id)
        if not path.is_file():
            raise UsageError(f"no backup {backup_id} in {self.data_dir}", hint=_LIST_HINT)
        # The file is opened when the stream starts, so an unread stream holds no descriptor.
        return self._decrypt(path, backup_id, key, offset, length)

    def _decrypt(
        self, path: Path, backup_id: str, key: bytes, offset: int, length: int | None
    ) -> Iterator[bytes]:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the with block below
        except OSError as e:
            raise SourceError(f"{path}: cannot read the backup: {e.strerror}") from e
        with f:
            header = f.read(HEADER_BYTES)
            if len(header) != HEADER_BYTES:
                raise IntegrityError(f"backup {backup_id}: the file is truncated (no header)")
            magic, version, chunk, kid, prefix, size, raw_id = _HEADER.unpack(header)
            if magic != _BLOB_MAGIC or version != _VERSION:
                raise IntegrityError(f"backup {backup_id}: not a vault blob (bad header)")
            if kid != _key_id(key):
                raise self._wrong_key(backup_id, kid, key)
            if raw_id.hex() != backup_id:
                raise IntegrityError(f"backup {backup_id}: the file holds backup {raw_id.hex()}")
            if not MIN_CHUNK_BYTES <= chunk <= MAX_CHUNK_BYTES:
                raise IntegrityError(f"backup {backup_id}: bad chunk size {chunk} in the header")
            count = _chunk_count(size, chunk)
            expected = HEADER_BYTES + size + count * TAG_BYTES
            actual = os.fstat(f.fileno()).st_size
            if actual != expected:
                what = "truncated" if actual < expected else "longer than its header says"
                raise IntegrityError(
                    f"backup {backup_id}: the file is {what} ({actual} bytes, {expected} "
                    f"expected for {size} bytes of content)"
                )
            if offset > size or (length is not None and offset + length > size):
                raise UsageError(
                    f"range {offset}+{length} is outside backup {backup_id[:12]} ({size} bytes)"
                )
            end = size if length is None else offset + length
            whole = offset == 0 and end == size
            if not whole and end == offset:
                return
            aes = AESGCM(key)

            def chunk_at(index: int) -> bytes:
                final = index == count - 1
                f.seek(HEADER_BYTES + index * (chunk + TAG_BYTES))
                sealed = f.read((size - index * chunk if final else chunk) + TAG_BYTES)
                try:
                    return aes.decrypt(
                        _nonce(prefix, index), sealed, _chunk_aad(index, final, header)
                    )
                except InvalidTag:
                    raise IntegrityError(
                        f"backup {backup_id}: chunk {index} (0-based) of {count} failed "
                        "authentication (the file was changed, truncated or reordered)",
                        hint="do not restore from this backup; use another copy",
                    ) from None

            digest = hashlib.sha256() if whole else None
            first = offset // chunk
            last = count - 1 if whole else (end - 1) // chunk
            if last != count - 1:
                # The final chunk authenticates the header (id, nonce prefix, size), and with
                # it every chunk decrypted under that prefix.
                chunk_at(count - 1)
            for index in range(first, last + 1):
                plain = chunk_at(index)
                if digest is not None:
                    digest.update(plain)
                    yield plain
                else:
                    base = index * chunk
                    lo = max(offset, base) - base
                    hi = min(end, base + len(plain)) - base
                    if hi > lo:
                        yield plain[lo:hi]
            if digest is not None and digest.hexdigest() != backup_id:
                raise IntegrityError(
                    f"backup {backup_id}: the decrypted content hashes to {digest.hexdigest()}",
                    hint="do not restore from this backup; use another copy",
                )

    def verify(self, backup_id: str) -> BackupRecord:
        """Decrypt the whole backup and check it against its id; the record when intact."""
        record = self.get(backup_id)
        total = 0
        for piece in self.open(backup_id):
            total += len(piece)
        if total != record.size_bytes:
            raise IntegrityError(
                f"backup {backup_id}: {total} bytes decrypted, the metadata says "
                f"{record.size_bytes}"
            )
        return record


def _json(value: Any) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise UsageError(f"backup metadata is not JSON-serialisable: {e}") from e


def _record(doc: dict[str, Any]) -> BackupRecord:
    takes = [dict(t) for t in doc["takes"]]
    latest = takes[-1]
    return BackupRecord(
        id=str(doc["id"]),
        size_bytes=int(doc["size_bytes"]),
        created_at=float(latest.get("stored_at", 0.0)),
        meta=latest,
        earlier=tuple(takes[:-1]),
    )


__all__ = ["CHUNK_BYTES", "HEADER_BYTES", "KEY_BYTES", "BackupRecord", "BackupVault"]
