"""Running services: `execute` with mounters, `poolfs run-local`, the examples the guide's way,
and `CliMounter` driving a stand-in `poolfs` (real mounts are in test_runtime_mount.py)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from poolfs.datapool import DataPool
from poolfs.refs import DataPoolRef, ExecutionBodyError
from poolfs.runtime import (
    OUTPUT_DIRECTORY_ENV,
    CliMounter,
    LocalDirMounter,
    LocalRunError,
    Mount,
    MountError,
    ResultNotSerializable,
    UnmountError,
    execute,
    result_to_json,
    run_local,
)
from tests.examples import EXAMPLES, ID1, ID2, ID3, examples_program

pytestmark = pytest.mark.core

CONCAT_RESULT = "Content from my_dataset: Hello\nContent from another_dataset: World"


def ref(pool_id: uuid.UUID, grant: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": str(pool_id), "ref": "DATAPOOL"}
    if grant is not None:
        body["grant"] = grant
    return body


def concat_body() -> dict[str, Any]:
    return {
        "data": {
            "file_to_read_from_my_dataset": "hello.txt",
            "file_to_read_from_another_dataset": "world.txt",
        },
        "my_dataset": ref(ID1),
        "another_dataset": ref(ID2),
        "output_datapool": ref(ID3),
    }


@pytest.fixture
def example_copy(tmp_path: Path) -> Callable[[str], Path]:
    """A fresh copy of an example project, so runs never write into the repository."""

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(
            EXAMPLES / name, target, ignore=shutil.ignore_patterns("__pycache__", "out")
        )
        return target

    return copy


class RecordingMounter(LocalDirMounter):
    """LocalDirMounter that records calls and fails on request."""

    def __init__(self, pools: dict[uuid.UUID, Path], **kwargs: Any) -> None:
        super().__init__(pools, **kwargs)
        self.events: list[tuple[str, str]] = []
        self.fail_mount: set[str] = set()
        self.fail_unmount: set[str] = set()
        self.refs: dict[str, DataPoolRef] = {}

    def mount(self, param_name: str, ref: DataPoolRef) -> Mount:
        self.events.append(("mount", param_name))
        self.refs[param_name] = ref
        if param_name in self.fail_mount:
            raise MountError(f"{param_name!r}: store unreachable")
        return super().mount(param_name, ref)

    def unmount(self, mount: Mount) -> None:
        self.events.append(("unmount", mount.param_name))
        super().unmount(mount)
        if mount.param_name in self.fail_unmount:
            raise UnmountError(f"{mount.param_name!r}: upload failed")


@pytest.fixture
def concat_mounter(example_copy: Callable[[str], Path]) -> RecordingMounter:
    inputs = example_copy("concat") / "input"
    return RecordingMounter(
        {
            ID1: inputs / "my_dataset",
            ID2: inputs / "another_dataset",
            ID3: inputs / "output_datapool",
        }
    )


# ------------------------------------------------------------------------------- execute


def test_execute_read_file_example(example_copy: Callable[[str], Path]) -> None:
    program = examples_program("read_file")
    mounter = RecordingMounter({ID1: example_copy("read_file") / "input" / "my_dataset"})
    body = {"data": {"file_to_read": "hello.txt"}, "my_dataset": ref(ID1)}
    assert json.loads(execute(program.run, body, mounter)) == "Hello"
    assert mounter.events == [("mount", "my_dataset"), ("unmount", "my_dataset")]
    assert mounter.active == []
    missing = {"data": {"file_to_read": "nope.txt"}, "my_dataset": ref(ID1)}
    assert json.loads(execute(program.run, json.dumps(missing), mounter)) == (
        "File 'nope.txt' not found in the Data Pool."
    )


def test_execute_concat_example_writes_the_output_pool(concat_mounter: RecordingMounter) -> None:
    program = examples_program("concat")
    result = execute(program.run, concat_body(), concat_mounter)
    assert json.loads(result) == CONCAT_RESULT
    output = Path(concat_mounter._pools[ID3]) / "concatenated_output.txt"
    assert output.read_text() == "HelloWorld"
    assert concat_mounter.events == [
        ("mount", "my_dataset"),
        ("mount", "another_dataset"),
        ("mount", "output_datapool"),
        ("unmount", "output_datapool"),
        ("unmount", "another_dataset"),
        ("unmount", "my_dataset"),
    ]
    assert concat_mounter.active == []


def test_injected_pools_carry_the_parameter_name_and_mount_path(tmp_path: Path) -> None:
    seen: dict[str, DataPool] = {}

    def run(first: DataPool, second: DataPool) -> list[str]:
        seen.update(first=first, second=second)
        return [first.name, second.name]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mounter = LocalDirMounter({str(ID1): tmp_path / "a", str(ID2).upper(): tmp_path / "b"})
    result = execute(run, {"first": ref(ID1), "second": ref(ID2)}, mounter)
    assert json.loads(result) == ["first", "second"]
    assert seen["first"].path == str(tmp_path / "a")
    assert seen["second"].path == str(tmp_path / "b")


def test_grants_and_refs_reach_the_mounter(concat_mounter: RecordingMounter) -> None:
    body = concat_body()
    body["output_datapool"] = ref(ID3, grant="token-for-output")
    execute(examples_program("concat").run, body, concat_mounter)
    assert concat_mounter.refs["output_datapool"].grant == "token-for-output"
    assert concat_mounter.refs["my_dataset"].grant is None


def test_mode_function_decides_per_pool(tmp_path: Path) -> None:
    modes: dict[str, str] = {}

    class Spy(LocalDirMounter):
        def mount(self, param_name: str, ref: DataPoolRef) -> Mount:
            mount = super().mount(param_name, ref)
            modes[param_name] = mount.mode
            return mount

    def run(src: DataPool, dst: DataPool) -> None:
        return None

    mounter = Spy(
        {ID1: tmp_path, ID2: tmp_path},
        mode=lambda name, ref: "rw" if ref.grant == "modify" else "ro",
    )
    assert execute(run, {"src": ref(ID1), "dst": ref(ID2, "modify")}, mounter) == "null"
    assert modes == {"src": "ro", "dst": "rw"}


def test_everything_is_unmounted_when_run_raises(concat_mounter: RecordingMounter) -> None:
    def run(data: dict[str, str], my_dataset: DataPool, another_dataset: DataPool) -> None:
        raise RuntimeError("service bug")

    body = {"data": {}, "my_dataset": ref(ID1), "another_dataset": ref(ID2)}
    with pytest.raises(RuntimeError, match="service bug"):
        execute(run, body, concat_mounter)
    assert concat_mounter.active == []
    assert [e for e in concat_mounter.events if e[0] == "unmount"] == [
        ("unmount", "another_dataset"),
        ("unmount", "my_dataset"),
    ]


def test_a_failed_mount_undoes_the_earlier_ones_and_run_is_not_called(
    concat_mounter: RecordingMounter,
) -> None:
    called = []

    def run(data: Any, my_dataset: DataPool, another_dataset: DataPool, output: DataPool) -> None:
        called.append(True)

    concat_mounter.fail_mount.add("another_dataset")
    body = {"data": 1, "my_dataset": ref(ID1), "another_dataset": ref(ID2), "output": ref(ID3)}
    with pytest.raises(MountError, match="another_dataset"):
        execute(run, body, concat_mounter)
    assert called == []
    assert concat_mounter.events == [
        ("mount", "my_dataset"),
        ("mount", "another_dataset"),
        ("unmount", "my_dataset"),
    ]
    assert concat_mounter.active == []


def test_unknown_pool_is_a_mount_error(tmp_path: Path) -> None:
    def run(pool: DataPool) -> None:
        return None

    with pytest.raises(MountError, match=f"no local directory for data pool {ID2}"):
        execute(run, {"pool": ref(ID2)}, LocalDirMounter({ID1: tmp_path}))


def test_an_invalid_body_mounts_nothing(concat_mounter: RecordingMounter) -> None:
    body = concat_body()
    body["another_dataset"] = {"id": "nope", "ref": "DATAPOOL"}
    with pytest.raises(ExecutionBodyError, match=r"another_dataset\.id: not a valid UUID"):
        execute(examples_program("concat").run, body, concat_mounter)
    assert concat_mounter.events == []


def test_an_unmount_failure_fails_a_successful_execution_after_unmounting_the_rest(
    concat_mounter: RecordingMounter,
) -> None:
    concat_mounter.fail_unmount.update({"output_datapool", "my_dataset"})
    with pytest.raises(UnmountError, match="'output_datapool': upload failed") as info:
        execute(examples_program("concat").run, concat_body(), concat_mounter)
    assert "'my_dataset': upload failed" in "".join(info.value.__notes__)
    assert [e for e in concat_mounter.events if e[0] == "unmount"] == [
        ("unmount", "output_datapool"),
        ("unmount", "another_dataset"),
        ("unmount", "my_dataset"),
    ]
    assert concat_mounter.active == []


def test_an_unmount_failure_after_run_raised_keeps_the_run_error(
    concat_mounter: RecordingMounter,
) -> None:
    def run(data: Any, my_dataset: DataPool) -> None:
        raise KeyError("the service's own error")

    concat_mounter.fail_unmount.add("my_dataset")
    with pytest.raises(KeyError, match="the service's own error") as info:
        execute(run, {"data": None, "my_dataset": ref(ID1)}, concat_mounter)
    assert any("'my_dataset': upload failed" in note for note in info.value.__notes__)
    assert concat_mounter.active == []


class Summary(BaseModel):
    files: dict[str, str]
    pool: uuid.UUID


def test_results_are_json(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")

    def run(data: dict[str, int], pool: DataPool) -> Summary:
        return Summary(files={k: "yes" for k in pool.list_files()}, pool=ID1)

    result = execute(run, {"data": {}, "pool": ref(ID1)}, LocalDirMounter({ID1: tmp_path}))
    assert json.loads(result) == {"files": {"f.txt": "yes"}, "pool": str(ID1)}
    assert result_to_json(None) == "null"
    assert result_to_json({"a": [1, 2.5, "x"]}) == '{"a":[1,2.5,"x"]}'


def test_a_result_that_is_not_json_is_an_error_and_pools_are_unmounted(tmp_path: Path) -> None:
    def run(pool: DataPool) -> object:
        return object()

    mounter = LocalDirMounter({ID1: tmp_path})
    with pytest.raises(ResultNotSerializable, match="not JSON"):
        execute(run, {"pool": ref(ID1)}, mounter)
    assert mounter.active == []


# ------------------------------------------------------------------ run_local (library)


def test_run_local_library_call(example_copy: Callable[[str], Path]) -> None:
    project = example_copy("concat")
    result = run_local(examples_program("concat").run, project / "input")
    assert json.loads(result) == CONCAT_RESULT
    assert (project / "input" / "output_datapool" / "concatenated_output.txt").exists()


def test_run_local_reports_every_missing_input_at_once(tmp_path: Path) -> None:
    def run(data: dict[str, int], first: DataPool, second: DataPool) -> None:
        return None

    (tmp_path / "second").mkdir()
    with pytest.raises(LocalRunError) as info:
        run_local(run, tmp_path)
    message = str(info.value)
    assert "data.json is missing" in message
    assert f"{tmp_path / 'first'}{os.sep} is missing" in message
    assert "DataPool parameter 'first'" in message
    assert "'second'" not in message


def test_run_local_without_data_needs_no_data_json(tmp_path: Path) -> None:
    def run(pool: DataPool, data: int = 7) -> int:
        return data

    (tmp_path / "pool").mkdir()
    assert run_local(run, tmp_path) == "7"


# --------------------------------------------------------------- poolfs run-local (CLI)


def poolfs(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != OUTPUT_DIRECTORY_ENV}
    return subprocess.run(
        [sys.executable, "-m", "poolfs", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_run_local_read_file(example_copy: Callable[[str], Path], tmp_path: Path) -> None:
    project = example_copy("read_file")
    result = poolfs("run-local", str(project), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == '"Hello"\n'
    assert (project / "out").is_dir()


def test_cli_run_local_concat(example_copy: Callable[[str], Path]) -> None:
    project = example_copy("concat")
    result = poolfs("run-local", ".", cwd=project)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == CONCAT_RESULT
    output = project / "input" / "output_datapool" / "concatenated_output.txt"
    assert output.read_text() == "HelloWorld"


@pytest.mark.parametrize("example", ["read_file", "concat"])
def test_examples_run_the_guides_way(example_copy: Callable[[str], Path], example: str) -> None:
    project = example_copy(example)
    result = subprocess.run(
        [sys.executable, "-m", "src"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    expected = "Hello" if example == "read_file" else CONCAT_RESULT
    assert json.loads(result.stdout) == expected


def make_project(root: Path, program: str, data: Any = None, pools: tuple[str, ...] = ()) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "src" / "__init__.py").write_text("")
    (root / "src" / "program.py").write_text(textwrap.dedent(program))
    (root / "input").mkdir()
    if data is not None:
        text = data if isinstance(data, str) else json.dumps(data)
        (root / "input" / "data.json").write_text(text)
    for pool in pools:
        (root / "input" / pool).mkdir()
    return root


ENV_PROGRAM = """
    import os

    from pydantic import BaseModel

    from poolfs.datapool import DataPool
    from poolfs.runtime import OUTPUT_DIRECTORY_ENV

    from .helper import GREETING


    class Params(BaseModel):
        count: int


    def run(data: Params, pool: DataPool) -> dict[str, object]:
        out = os.environ[OUTPUT_DIRECTORY_ENV]
        with open(os.path.join(out, "result.txt"), "w") as f:
            f.write(GREETING * data.count)
        return {"out": out, "cwd": os.getcwd(), "files": sorted(pool.list_files())}
"""


def test_cli_run_local_sets_the_output_directory(tmp_path: Path) -> None:
    project = make_project(tmp_path / "svc", ENV_PROGRAM, {"count": 2}, pools=("pool",))
    (project / "src" / "helper.py").write_text("GREETING = 'hi'\n")
    (project / "input" / "pool" / "x.txt").write_text("x")
    result = poolfs("run-local", str(project), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "out": str(project / "out"),
        "cwd": str(project),
        "files": ["x.txt"],
    }
    assert (project / "out" / "result.txt").read_text() == "hihi"


def test_cli_run_local_function_option(tmp_path: Path) -> None:
    program = """
        from poolfs.datapool import DataPool

        def main(data: list[int], numbers: DataPool) -> int:
            return sum(data) + len(numbers.list_files())
    """
    project = make_project(tmp_path / "svc", program, [1, 2, 3], pools=("numbers",))
    (project / "input" / "numbers" / "n").write_text("")
    result = poolfs("run-local", str(project), "--function", "src.program:main")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "7\n"


CONCAT_PROGRAM = (EXAMPLES / "concat" / "src" / "program.py").read_text()


@pytest.mark.parametrize(
    ("data", "pools", "messages"),
    [
        (None, ("my_dataset", "another_dataset", "output_datapool"), ["data.json is missing"]),
        (
            {"file_to_read_from_my_dataset": "a", "file_to_read_from_another_dataset": "b"},
            ("my_dataset",),
            [
                "DataPool parameter 'another_dataset'",
                "DataPool parameter 'output_datapool'",
            ],
        ),
        (
            {"file_to_read_from_my_dataset": 5},
            ("my_dataset", "another_dataset", "output_datapool"),
            [
                "file_to_read_from_my_dataset: Input should be a valid string",
                "file_to_read_from_another_dataset: Field required",
            ],
        ),
        ("{oops", ("my_dataset", "another_dataset", "output_datapool"), ["not valid JSON"]),
    ],
    ids=["no data.json", "missing pool dirs", "invalid data", "broken json"],
)
def test_cli_run_local_input_errors(
    tmp_path: Path, data: Any, pools: tuple[str, ...], messages: list[str]
) -> None:
    project = make_project(tmp_path / "svc", CONCAT_PROGRAM, data, pools)
    result = poolfs("run-local", str(project))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("poolfs run-local: cannot run locally")
    for message in messages:
        assert message in result.stderr


def test_cli_run_local_when_run_raises(tmp_path: Path) -> None:
    program = """
        from poolfs.datapool import DataPool

        def run(pool: DataPool) -> None:
            raise ValueError("boom in the service")
    """
    project = make_project(tmp_path / "svc", program, pools=("pool",))
    result = poolfs("run-local", str(project))
    assert result.returncode == 1
    assert "run() raised" in result.stderr
    assert "Traceback" in result.stderr
    assert "ValueError: boom in the service" in result.stderr


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing dir", "is not a directory"),
        ("no program", "cannot import 'src.program'"),
        ("syntax error", "SyntaxError"),
        ("bad signature", "'mystery' is neither `data` nor a DataPool"),
    ],
)
def test_cli_run_local_code_errors(tmp_path: Path, setup: str, message: str) -> None:
    project = tmp_path / "svc"
    if setup == "no program":
        project.mkdir()
    elif setup == "syntax error":
        make_project(project, "def run(:\n")
    elif setup == "bad signature":
        make_project(project, "def run(data, mystery):\n    pass\n")
    result = poolfs("run-local", str(project))
    assert result.returncode == 2
    assert message in result.stderr


def test_cli_run_local_help_documents_the_layout() -> None:
    result = poolfs("run-local", "--help")
    assert result.returncode == 0
    for text in ("src/program.py", "input/data.json", "input/<param_name>/", "src.program:run"):
        assert text in result.stdout
    assert OUTPUT_DIRECTORY_ENV in result.stdout


# ------------------------------------------------- CliMounter against a stand-in poolfs

FAKE_POOLFS = """\
#!{python}
# Stands in for `python -m poolfs` to test CliMounter's side of the mount CLI contract:
# "mount" copies <store>/<pool> (a file:// URL) into the mountpoint, "umount" copies it back.
import json, os, shutil, subprocess, sys, time

args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
assert args[:2] == ["-m", "poolfs"], args
command, rest = args[2], args[3:]
behaviour = os.environ.get("FAKE_BEHAVIOUR", "")
state_file = os.environ["FAKE_STATE"]
state = json.load(open(state_file)) if os.path.exists(state_file) else {{}}
if command == "mount":
    url, mountpoint = rest[0], rest[1]
    if behaviour == "fail" and url.endswith(os.environ["FAKE_TARGET"]):
        print("poolfs: checking the store", file=sys.stderr)
        print(f"poolfs: store {{url}} is unreachable", file=sys.stderr)
        sys.exit(1)
    if behaviour == "hang":
        time.sleep(60)
    if behaviour == "daemon":
        # A worker that keeps the inherited stdout/stderr open, as a mount worker may.
        worker = subprocess.Popen(["sleep", "60"])
        with open(os.environ["FAKE_PIDS"], "a") as pids:
            pids.write(f"{{worker.pid}}\\n")
    shutil.copytree(url.removeprefix("file://"), mountpoint, dirs_exist_ok=True)
    state[mountpoint] = url
    json.dump(state, open(state_file, "w"))
    sys.exit(0)
if command == "umount":
    mountpoint = rest[0]
    if behaviour == "umount-fail":
        print("poolfs: upload of big.bin failed: EIO", file=sys.stderr)
        sys.exit(1)
    url = state.pop(mountpoint)
    shutil.copytree(mountpoint, url.removeprefix("file://"), dirs_exist_ok=True)
    for name in os.listdir(mountpoint):
        path = os.path.join(mountpoint, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    json.dump(state, open(state_file, "w"))
    sys.exit(0)
sys.exit(f"unexpected command {{command}}")
"""


class FakeCli:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.python = root / "fake-python"
        self.python.write_text(FAKE_POOLFS.format(python=sys.executable))
        self.python.chmod(0o755)
        self.log = root / "calls.jsonl"
        self.store = root / "store"
        self.mount_root = root / "mnt"

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def seed(self, pool_id: uuid.UUID, files: dict[str, str]) -> None:
        (self.store / str(pool_id)).mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            path = self.store / str(pool_id) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)

    def mounter(self, mode_for: Callable[[str, DataPoolRef], Any], **kwargs: Any) -> CliMounter:
        return CliMounter(
            f"file://{self.store}/",
            self.mount_root,
            mode_for,
            python=str(self.python),
            **kwargs,
        )


@pytest.fixture
def fake_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCli]:
    fake = FakeCli(tmp_path)
    monkeypatch.setenv("FAKE_LOG", str(fake.log))
    monkeypatch.setenv("FAKE_STATE", str(tmp_path / "state.json"))
    monkeypatch.setenv("FAKE_PIDS", str(tmp_path / "pids"))
    yield fake
    pids = tmp_path / "pids"
    if pids.exists():
        for pid in pids.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def concat_modes(param: str, ref: DataPoolRef) -> Any:
    return "rw" if param == "output_datapool" else "ro"


def test_cli_mounter_runs_the_concat_example(fake_cli: FakeCli) -> None:
    fake_cli.seed(ID1, {"hello.txt": "Hello"})
    fake_cli.seed(ID2, {"world.txt": "World"})
    fake_cli.seed(ID3, {})
    mounter = fake_cli.mounter(concat_modes)
    result = execute(examples_program("concat").run, concat_body(), mounter)
    assert json.loads(result) == CONCAT_RESULT
    store = f"file://{fake_cli.store}"
    mnt = fake_cli.mount_root
    assert fake_cli.calls() == [
        ["-m", "poolfs", "mount", f"{store}/{ID1}", f"{mnt}/my_dataset", "--read-only"],
        ["-m", "poolfs", "mount", f"{store}/{ID2}", f"{mnt}/another_dataset", "--read-only"],
        ["-m", "poolfs", "mount", f"{store}/{ID3}", f"{mnt}/output_datapool"],
        ["-m", "poolfs", "umount", f"{mnt}/output_datapool"],
        ["-m", "poolfs", "umount", f"{mnt}/another_dataset"],
        ["-m", "poolfs", "umount", f"{mnt}/my_dataset"],
    ]
    # Written through the output pool's mount, durable in the store after umount.
    assert (fake_cli.store / str(ID3) / "concatenated_output.txt").read_text() == "HelloWorld"
    # Mountpoints are made for the execution and removed after it.
    assert list(mnt.iterdir()) == []


def test_cli_mounter_reports_the_mount_error_line_and_undoes_earlier_mounts(
    fake_cli: FakeCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cli.seed(ID1, {"hello.txt": "Hello"})
    fake_cli.seed(ID2, {})
    monkeypatch.setenv("FAKE_BEHAVIOUR", "fail")
    monkeypatch.setenv("FAKE_TARGET", str(ID2))
    body = {"data": {}, "my_dataset": ref(ID1), "another_dataset": ref(ID2)}

    def run(data: Any, my_dataset: DataPool, another_dataset: DataPool) -> None:
        raise AssertionError("not reached")

    with pytest.raises(MountError) as info:
        execute(run, body, fake_cli.mounter(lambda p, r: "ro"))
    assert str(info.value) == (
        f"'another_dataset': mounting data pool {ID2} failed: "
        f"poolfs: store file://{fake_cli.store}/{ID2} is unreachable"
    )
    assert [c[2:4] for c in fake_cli.calls()] == [
        ["mount", f"file://{fake_cli.store}/{ID1}"],
        ["mount", f"file://{fake_cli.store}/{ID2}"],
        ["umount", f"{fake_cli.mount_root}/my_dataset"],
    ]
    assert list(fake_cli.mount_root.iterdir()) == []


def test_cli_mounter_reports_an_unmount_failure(
    fake_cli: FakeCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cli.seed(ID1, {"hello.txt": "Hello"})
    mounter = fake_cli.mounter(lambda p, r: "rw")
    mount = mounter.mount("pool", DataPoolRef(id=ID1, ref="DATAPOOL"))
    assert mount.mode == "rw"
    assert Path(mount.path, "hello.txt").read_text() == "Hello"
    monkeypatch.setenv("FAKE_BEHAVIOUR", "umount-fail")
    with pytest.raises(UnmountError, match=r"upload of big\.bin failed: EIO"):
        mounter.unmount(mount)
    monkeypatch.delenv("FAKE_BEHAVIOUR")
    mounter.unmount(mount)
    assert not Path(mount.path).exists()


def test_cli_mounter_refuses_a_busy_mountpoint(fake_cli: FakeCli) -> None:
    (fake_cli.mount_root / "pool").mkdir(parents=True)
    (fake_cli.mount_root / "pool" / "leftover").write_text("x")
    with pytest.raises(MountError, match="busy"):
        fake_cli.mounter(lambda p, r: "ro").mount("pool", DataPoolRef(id=ID1, ref="DATAPOOL"))
    assert fake_cli.calls() == []


def test_cli_mounter_reuses_an_empty_mountpoint_directory(fake_cli: FakeCli) -> None:
    fake_cli.seed(ID1, {"a": "1"})
    (fake_cli.mount_root / "pool").mkdir(parents=True)
    mounter = fake_cli.mounter(lambda p, r: "ro")
    mount = mounter.mount("pool", DataPoolRef(id=ID1, ref="DATAPOOL"))
    assert mount.path == str(fake_cli.mount_root / "pool")
    mounter.unmount(mount)


def test_cli_mounter_times_out(fake_cli: FakeCli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_BEHAVIOUR", "hang")
    started = time.monotonic()
    with pytest.raises(MountError, match=r"timed out after 1\.5 s"):
        fake_cli.mounter(lambda p, r: "ro", timeout=1.5).mount(
            "pool", DataPoolRef(id=ID1, ref="DATAPOOL")
        )
    assert time.monotonic() - started < 20
    # After a timeout it tries to unmount, in case the mount came up late.
    assert [c[2] for c in fake_cli.calls()] == ["mount", "umount"]


def test_cli_mounter_does_not_wait_for_a_worker_holding_its_output(
    fake_cli: FakeCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cli.seed(ID1, {"hello.txt": "Hello"})
    monkeypatch.setenv("FAKE_BEHAVIOUR", "daemon")
    started = time.monotonic()
    mounter = fake_cli.mounter(lambda p, r: "ro")
    mount = mounter.mount("pool", DataPoolRef(id=ID1, ref="DATAPOOL"))
    assert time.monotonic() - started < 30
    monkeypatch.delenv("FAKE_BEHAVIOUR")
    mounter.unmount(mount)


def test_cli_mounter_checks_the_mode_function(fake_cli: FakeCli) -> None:
    with pytest.raises(ValueError, match="'ro' or 'rw'"):
        fake_cli.mounter(lambda p, r: "readonly").mount("pool", DataPoolRef(id=ID1, ref="DATAPOOL"))
    assert fake_cli.calls() == []
