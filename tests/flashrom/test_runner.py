"""The flashrom wrapper without flashrom: argument lists, URIs, timeouts, a faked program."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unbrick.errors import DeviceError, ToolError, UsageError
from unbrick.model.uri import parse_device_uri
from unbrick.tools import ToolResult
from unbrick.transports.flashrom.runner import (
    Flashrom,
    Include,
    Operation,
    Programmer,
    Request,
    TimeoutPolicy,
    build_argv,
)

pytestmark = pytest.mark.unit

FOUND = 'Found Winbond flash chip "W25Q128.V" (16384 kB, SPI) on dummy.\n'


def test_uri_query_becomes_programmer_parameters_in_order() -> None:
    address = parse_device_uri("flashrom://dummy?emulate=W25Q128FV&image=/tmp/x.bin")
    programmer = Programmer.from_address(address)
    assert programmer.argument == "dummy:emulate=W25Q128FV,image=/tmp/x.bin"
    assert programmer.chip is None
    assert build_argv(Request(programmer)) == ["-p", "dummy:emulate=W25Q128FV,image=/tmp/x.bin"]


def test_chip_and_expect_are_not_programmer_parameters() -> None:
    uri = "flashrom://dummy?emulate=MX25L6436&chip=MX25L6436E/MX25L6445E&expect=MX25L6436E"
    programmer = Programmer.from_address(parse_device_uri(uri))
    assert programmer.argument == "dummy:emulate=MX25L6436"
    assert programmer.chip == "MX25L6436E/MX25L6445E"
    assert build_argv(Request(programmer)) == [
        "-p",
        "dummy:emulate=MX25L6436",
        "-c",
        "MX25L6436E/MX25L6445E",
    ]


def test_programmer_without_parameters() -> None:
    programmer = Programmer.from_address(parse_device_uri("flashrom://ch341a_spi"))
    assert build_argv(Request(programmer, Operation.READ, image=Path("/b/x.bin"))) == [
        "-p",
        "ch341a_spi",
        "-r",
        "/b/x.bin",
    ]


@pytest.mark.parametrize(
    "uri",
    [
        "flashrom://dummy?image=/tmp/a,b.bin",  # flashrom splits parameters at commas
        "flashrom://dummy?bad%20key=1",
        "flashrom://dum-my",
        "flashrom://dummy?chip=",
    ],
)
def test_bad_programmer_addresses(uri: str) -> None:
    address = parse_device_uri(uri)
    if address.param("chip") == "":
        assert Programmer.from_address(address).chip is None
        return
    with pytest.raises(UsageError):
        Programmer.from_address(address)


def test_not_a_flashrom_address() -> None:
    with pytest.raises(UsageError, match="not a flashrom"):
        Programmer.from_address(parse_device_uri("block:///dev/sdb"))


def test_argv_of_every_operation() -> None:
    p = Programmer("dummy", (("emulate", "W25Q128FV"),))
    lay = Path("/w/layout.txt")
    assert build_argv(
        Request(
            p,
            Operation.WRITE,
            image=Path("/w/blank.bin"),
            layout_file=lay,
            include=(Include("0x10-0x1f", Path("/w/data.bin")),),
        )
    ) == [
        "-p",
        "dummy:emulate=W25Q128FV",
        "-l",
        "/w/layout.txt",
        "-i",
        "0x10-0x1f:/w/data.bin",
        "-w",
        "/w/blank.bin",
    ]
    assert build_argv(Request(p, Operation.ERASE, layout_file=lay, include=(Include("a"),)))[
        -3:
    ] == ["-i", "a", "-E"]
    assert build_argv(Request(p, Operation.VERIFY, image=Path("/x")))[-2:] == ["-v", "/x"]
    assert build_argv(Request(p, layout_from="fmap", verbose=True, wp_status=True))[2:] == [
        "--fmap",
        "-V",
        "--wp-status",
    ]
    assert build_argv(Request(p, flash_name=True, flash_size=True, log_file=Path("/l")))[2:] == [
        "--flash-name",
        "--flash-size",
        "-o",
        "/l",
    ]
    assert build_argv(Request(p, Operation.WRITE, image=Path("/x"), noverify=True))[-1] == "-n"


@pytest.mark.parametrize(
    "request_",
    [
        Request(Programmer("dummy"), Operation.READ),
        Request(Programmer("dummy"), Operation.ERASE, image=Path("/x")),
        Request(Programmer("dummy"), include=(Include("a"),)),
        Request(Programmer("dummy"), layout_file=Path("/l"), layout_from="fmap"),
        Request(Programmer("dummy"), layout_from="gpt"),
        Request(Programmer("dummy"), Operation.READ, image=Path("/x"), noverify=True),
    ],
)
def test_inconsistent_requests_are_refused(request_: Request) -> None:
    with pytest.raises(UsageError):
        build_argv(request_)


def test_region_names_flashrom_cannot_take() -> None:
    for name in ("a:b", "a b", ""):
        with pytest.raises(UsageError):
            Include(name)


def test_timeouts_grow_with_the_chip() -> None:
    policy = TimeoutPolicy(base_s=60, read_bytes_per_s=16384, write_bytes_per_s=4096)
    assert policy.seconds(Operation.PROBE, 16 << 20) == 60
    assert policy.seconds(Operation.READ, 16 << 20) == 60 + 1024
    assert policy.seconds(Operation.WRITE, 16 << 20) == 60 + 4096
    assert policy.seconds(Operation.WRITE, None) == 60
    with pytest.raises(UsageError):
        TimeoutPolicy(read_bytes_per_s=0)


class FakeTool:
    """Stands in for the flashrom program: answers from a script, records the calls."""

    def __init__(self, answers: list[ToolResult | BaseException]) -> None:
        self.answers = answers
        self.calls: list[tuple[list[str], float]] = []

    def run(
        self,
        args: Sequence[str],
        *,
        timeout_s: float = 60.0,
        check: bool = True,
        input_bytes: bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> ToolResult:
        self.calls.append((list(args), timeout_s))
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def result(out: str, err: str = "", rc: int = 0) -> ToolResult:
    return ToolResult(("flashrom",), rc, out.encode(), err.encode())


def test_run_sizes_the_timeout_and_returns_the_report() -> None:
    tool = FakeTool([result(FOUND + "Reading flash... done.\n")])
    runner = Flashrom(tool, timeouts=TimeoutPolicy(base_s=10, read_bytes_per_s=1 << 20))
    report = runner.run(
        Request(Programmer("dummy"), Operation.READ, image=Path("/x")), size_bytes=16 << 20
    )
    assert report.read_done
    assert tool.calls == [(["-p", "dummy", "-r", "/x"], 26.0)]
    assert runner.stats.runs == {"read": 1}
    tool.answers.append(result(FOUND + "Adding fmap layout to global layout.\n"))
    runner.execute(Request(Programmer("dummy"), layout_from="fmap"), size_bytes=16 << 20)
    assert tool.calls[-1][1] == 26.0  # looking for the layout may read the whole chip


def test_a_hung_write_is_a_device_error_saying_the_chip_may_be_changed() -> None:
    hung = ToolError("'flashrom' did not finish within 5 s")
    hung.__cause__ = subprocess.TimeoutExpired(["flashrom"], 5)
    runner = Flashrom(FakeTool([hung]))
    with pytest.raises(DeviceError) as e:
        runner.run(Request(Programmer("dummy"), Operation.WRITE, image=Path("/x")))
    assert "was stopped" in e.value.message and "partly changed" in e.value.message
    assert "restore the backup" in e.value.hint


def test_a_missing_program_stays_a_tool_error() -> None:
    runner = Flashrom(FakeTool([ToolError("program 'flashrom' is not installed")]))
    with pytest.raises(ToolError, match="not installed"):
        runner.run(Request(Programmer("dummy")))


def test_missing_flashrom_through_the_real_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ToolError) as e:
        Flashrom().run(Request(Programmer("dummy")))
    assert "flashrom" in e.value.message and "flashrom" in e.value.hint


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
            st.text(alphabet=st.characters(blacklist_characters=",\n\0"), max_size=12),
        ),
        max_size=5,
    )
)
def test_programmer_argument_keeps_every_parameter(params: list[tuple[str, str]]) -> None:
    programmer = Programmer("dummy", tuple(params))
    arg = programmer.argument
    if params:
        assert arg.startswith("dummy:")
        assert arg[len("dummy:") :].split(",") == [f"{k}={v}" for k, v in params]
    else:
        assert arg == "dummy"
