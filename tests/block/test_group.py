"""WriteGroup: several jobs' targets take one read of the same image."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.block.conftest import MiB, make_image, read
from unbrick.errors import ImageError, UsageError
from unbrick.transports.block.group import WriteGroup
from unbrick.transports.block.target import BlockTarget, open_target
from unbrick.transports.block.writer import TargetResult, WriteProgress


def run_members(
    group: WriteGroup, members: dict[str, tuple[BlockTarget, Path]]
) -> dict[str, TargetResult | BaseException]:
    out: dict[str, TargetResult | BaseException] = {}
    seen: dict[str, set[str]] = {k: set() for k in members}

    def one(key: str, target: BlockTarget, image: Path) -> None:
        def progress(p: WriteProgress) -> None:
            seen[key].add(p.phase)

        try:
            out[key] = group.write(key, target, image, bmap=None, progress=progress)
        except BaseException as e:  # the test looks at it
            out[key] = e

    threads = [threading.Thread(target=one, args=(k, t, i)) for k, (t, i) in members.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a member is still waiting"
    for key, phases in seen.items():
        if isinstance(out[key], TargetResult):
            assert "write" in phases and "done" in phases, (key, phases)
    return out


@pytest.mark.unit
def test_members_wait_for_each_other_and_one_read_serves_all(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    content = make_image(img, 2 * MiB, [(0, MiB), (MiB + 100, 200)])
    group = WriteGroup(3)
    targets = {k: open_target(tmp_path / f"{k}.img") for k in "abc"}
    try:
        out = run_members(group, {k: (t, img) for k, t in targets.items()})
    finally:
        for t in targets.values():
            t.close()
    assert group.writes == 1
    for k in "abc":
        r = out[k]
        assert isinstance(r, TargetResult) and r.ok and r.target == str(tmp_path / f"{k}.img")
        assert read(tmp_path / f"{k}.img") == content


@pytest.mark.unit
def test_a_member_that_leaves_does_not_hold_the_others(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    content = make_image(img, MiB, [(0, 4096)])
    group = WriteGroup(3)
    a = open_target(tmp_path / "a.img")
    try:
        done = threading.Event()
        result: list[TargetResult] = []
        t = threading.Thread(
            target=lambda: (result.append(group.write("a", a, img, bmap=None)), done.set())
        )
        t.start()
        assert not done.wait(0.3), "wrote before the others joined or left"
        group.leave("b")
        assert not done.wait(0.3)
        group.leave("c")  # the last one out writes for the member that waits
        assert done.wait(30)
        t.join()
    finally:
        a.close()
    assert result[0].ok and read(tmp_path / "a.img") == content
    group.leave("a")  # after the write: nothing happens
    with pytest.raises(UsageError, match="already written"):
        group.write("d", a, img, bmap=None)


@pytest.mark.unit
def test_the_image_error_reaches_every_member_and_nothing_is_written(tmp_path: Path) -> None:
    bad = tmp_path / "bad.img.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"not deflate data at all" * 100)
    group = WriteGroup(2)
    targets = {k: open_target(tmp_path / f"{k}.img") for k in "ab"}
    try:
        out = run_members(group, {k: (t, bad) for k, t in targets.items()})
    finally:
        for t in targets.values():
            t.close()
    assert all(isinstance(out[k], ImageError) for k in "ab"), out
    assert all(read(tmp_path / f"{k}.img") == b"" for k in "ab")


@pytest.mark.unit
def test_one_image_per_group(tmp_path: Path) -> None:
    one, two = tmp_path / "one.img", tmp_path / "two.img"
    make_image(one, MiB, [(0, 4096)])
    make_image(two, MiB, [(0, 4096)])
    group = WriteGroup(2)
    targets = {k: open_target(tmp_path / f"{k}.img") for k in "ab"}
    try:
        out = run_members(group, {"a": (targets["a"], one), "b": (targets["b"], two)})
    finally:
        for t in targets.values():
            t.close()
    # One of them joined first and waits for a second member that can never match: the
    # mismatching one is refused, and then leaves, which lets the first write alone.
    errors = [v for v in out.values() if isinstance(v, UsageError)]
    assert len(errors) == 1 and "one image" in str(errors[0])
    with pytest.raises(UsageError, match="at least one"):
        WriteGroup(0)
