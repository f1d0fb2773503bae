"""ReportCache: the jobs of one command share one inspection of each image."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from unbrick.errors import SourceError
from unbrick.ops import images
from unbrick.ops.images import ReportCache


@pytest.mark.unit
def test_one_inspection_per_image_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = tmp_path / "fw.bin"
    img.write_bytes(os.urandom(300_000))
    calls: list[Path] = []
    real = images.inspect_path
    gate = threading.Event()

    def slow(path: Path, **kw: object) -> images.ImageReport:
        calls.append(path)
        gate.wait(5)
        return real(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(images, "inspect_path", slow)
    cache = ReportCache()
    got: list[images.ImageReport] = []
    threads = [threading.Thread(target=lambda: got.append(cache.inspect(img))) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and cache.inspected == 1
    assert len({r.sha256 for r in got}) == 1 and len(got) == 4
    before = got[0].sha256
    img.write_bytes(os.urandom(300_001))  # a changed image is inspected again
    after = cache.inspect(img)
    assert cache.inspected == 2 and after.sha256 != before
    with pytest.raises(SourceError, match="no such file"):
        cache.inspect(tmp_path / "missing.bin")
