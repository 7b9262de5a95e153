"""Execution bodies and the OpenAPI request schema, checked against the platform guide's examples.

This module uses `from __future__ import annotations`, so its run() functions have string
annotations; the examples' program.py files (loaded in `examples_program`) have real ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate as validate_openapi
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from pydantic import BaseModel, ValidationError

from poolfs.datapool import DataPool
from poolfs.refs import (
    DATAPOOL_REF_SCHEMA,
    DataPoolRef,
    ExecutionBodyError,
    RunSignatureError,
    inspect_run,
    openapi_document,
    parse_execution_body,
    request_schema,
)
from tests import examples
from tests.examples import EXAMPLES, examples_program

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.core

ID1, ID2, ID3 = str(examples.ID1), str(examples.ID2), str(examples.ID3)


# The guide's request bodies, verbatim.
GUIDE_BODY_1 = {
    "data": {"file_to_read": "hello.txt"},
    "my_dataset": {"id": ID1, "ref": "DATAPOOL"},
}
GUIDE_BODY_2 = {
    "data": {
        "file_to_read_from_my_dataset": "hello.txt",
        "file_to_read_from_another_dataset": "world.txt",
    },
    "my_dataset": {"id": ID1, "ref": "DATAPOOL"},
    "another_dataset": {"id": ID2, "ref": "DATAPOOL"},
    "output_datapool": {"id": ID3, "ref": "DATAPOOL"},
}
GUIDE_BODY_GRANT = {
    "data": {"file_to_read": "hello.txt"},
    "my_dataset": {"id": ID1, "ref": "DATAPOOL", "grant": "eyJhbGciOiJIUzI1NiJ9..."},
}
# The guide's generated schema for `my_dataset: DataPool`, verbatim.
GUIDE_SCHEMA_YAML = """
my_dataset:
  type: object
  properties:
    id:
      type: string
      format: uuid
      description: UUID of the Data Pool to mount
    ref:
      type: string
      enum: [DATAPOOL]
      description: Reference type indicating this is a Data Pool
  required:
    - id
    - ref
  additionalProperties: false
"""


class Point(BaseModel):
    x: int
    y: int


class Shape(BaseModel):
    name: str
    points: list[Point]
    tags: dict[str, str] = {}
    comment: str | None = None


class Tree(BaseModel):
    value: int
    children: list[Tree] = []


def shape_run(data: Shape, source: DataPool, target: DataPool) -> Shape:
    return data


def tree_run(data: Tree, pool: DataPool) -> int:
    return data.value


def no_data_run(pool: DataPool) -> str:
    return pool.name


def default_data_run(pool: DataPool, data: Point | None = None, scale: int = 2) -> int:
    return scale


def dict_data_run(data: dict[str, int], pool: DataPool) -> int:
    return len(data)


# ----------------------------------------------------------------------------- DataPoolRef


def test_datapool_ref_model() -> None:
    ref = DataPoolRef.model_validate({"id": ID1, "ref": "DATAPOOL"})
    assert ref.id == uuid.UUID(ID1)
    assert ref.ref == "DATAPOOL"
    assert ref.grant is None
    assert DataPoolRef.model_validate(GUIDE_BODY_GRANT["my_dataset"]).grant == (
        "eyJhbGciOiJIUzI1NiJ9..."
    )
    for bad in (
        {"id": ID1, "ref": "DATAPOOL", "extra": 1},
        {"id": ID1, "ref": "VOLUME"},
        {"id": "nope", "ref": "DATAPOOL"},
        {"ref": "DATAPOOL"},
        {"id": ID1},
        {"id": ID1, "ref": "DATAPOOL", "grant": 5},
    ):
        with pytest.raises(ValidationError):
            DataPoolRef.model_validate(bad)


# ---------------------------------------------------------------------------- inspect_run


def test_inspect_run_on_the_guide_examples() -> None:
    first = inspect_run(examples_program("read_file").run)
    assert first.data_param == "data"
    assert first.data_required
    assert first.pool_params == ("my_dataset",)
    second = inspect_run(examples_program("concat").run)
    assert second.pool_params == ("my_dataset", "another_dataset", "output_datapool")
    assert second.return_type is str


def test_inspect_run_resolves_string_annotations() -> None:
    signature = inspect_run(shape_run)
    assert signature.pool_params == ("source", "target")
    assert signature.data_type is Shape
    defaults = inspect_run(default_data_run)
    assert defaults.pool_params == ("pool",)
    assert defaults.data_param == "data"
    assert not defaults.data_required
    assert inspect_run(no_data_run).data_param is None


def test_unresolvable_annotation_is_a_clear_error() -> None:
    def run(data: Shape, pool: NotImported) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    with pytest.raises(RunSignatureError, match="NotImported"):
        inspect_run(run)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def run(data, other): pass", "'other' is neither `data` nor a DataPool"),
        ("def run(data, pool: DataPool | None): pass", "exactly `DataPool`"),
        ("def run(data, pools: list[DataPool]): pass", "exactly `DataPool`"),
        ("def run(pool: DataPool, /, data=None): pass", "positional-only"),
        ("def run(data: type(lambda: 0)): pass", "cannot validate"),
    ],
)
def test_unusable_run_signatures(source: str, message: str) -> None:
    namespace: dict[str, Any] = {"DataPool": DataPool}
    exec(source, namespace)
    with pytest.raises(RunSignatureError, match=message):
        inspect_run(namespace["run"])


def test_extra_parameters_with_defaults_and_varargs_are_fine() -> None:
    def run(data: Point, pool: DataPool, *args: Any, verbose: bool = False, **kw: Any) -> None:
        pass

    assert inspect_run(run).pool_params == ("pool",)


# -------------------------------------------------------------------- parse_execution_body


def test_parses_the_guide_bodies() -> None:
    read_file = examples_program("read_file")
    request = parse_execution_body(read_file.run, GUIDE_BODY_1)
    assert request.has_data
    assert request.data == read_file.InputData(file_to_read="hello.txt")
    assert request.refs == {"my_dataset": DataPoolRef(id=uuid.UUID(ID1), ref="DATAPOOL")}

    concat = examples_program("concat")
    request = parse_execution_body(concat.run, GUIDE_BODY_2)
    assert list(request.refs) == ["my_dataset", "another_dataset", "output_datapool"]
    assert [r.id for r in request.refs.values()] == [uuid.UUID(i) for i in (ID1, ID2, ID3)]
    assert request.data.file_to_read_from_another_dataset == "world.txt"

    with_grant = parse_execution_body(read_file.run, GUIDE_BODY_GRANT)
    assert with_grant.refs["my_dataset"].grant == "eyJhbGciOiJIUzI1NiJ9..."


def test_parses_json_text() -> None:
    request = parse_execution_body(shape_run, json.dumps(shape_body()).encode())
    assert request.data.points == [Point(x=1, y=2)]
    assert parse_execution_body(shape_run, json.dumps(shape_body())).refs.keys() == {
        "source",
        "target",
    }


def shape_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "data": {"name": "s", "points": [{"x": 1, "y": 2}]},
        "source": {"id": ID1, "ref": "DATAPOOL"},
        "target": {"id": ID2, "ref": "DATAPOOL", "grant": "g"},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def problems_of(run: Callable[..., Any], body: Any) -> list[str]:
    with pytest.raises(ExecutionBodyError) as info:
        parse_execution_body(run, body)
    assert isinstance(info.value, ValueError)
    for problem in info.value.problems:
        assert str(problem) in str(info.value)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"source": ...}, "source: missing DataPool reference"),
        ({"source": {"id": "not-a-uuid", "ref": "DATAPOOL"}}, "source.id: not a valid UUID"),
        ({"source": {"id": 42, "ref": "DATAPOOL"}}, "source.id: not a valid UUID"),
        ({"source": {"ref": "DATAPOOL"}}, "source.id: missing"),
        ({"source": {"id": ID1}}, "source.ref: missing"),
        ({"source": {"id": ID1, "ref": "datapool"}}, 'source.ref: must be "DATAPOOL"'),
        ({"source": {"id": ID1, "ref": "DATAPOOL", "mode": "rw"}}, "source.mode: unknown key"),
        ({"source": {"id": ID1, "ref": "DATAPOOL", "grant": 1}}, "source.grant: must be a string"),
        ({"source": ID1}, "source: must be an object like"),
        ({"source": None}, "source: must be an object like"),
        ({"data": ...}, "data: missing"),
        ({"data": {"name": "s"}}, "data.points: Field required"),
        ({"data": {"name": "s", "points": [{"x": "a", "y": 1}]}}, "data.points.0.x: Input should"),
        ({"extra": 1}, "extra: unknown key (expected: data, source, target)"),
    ],
)
def test_each_problem_names_the_parameter_and_what_is_wrong(
    changes: dict[str, Any], expected: str
) -> None:
    problems = problems_of(shape_run, shape_body(**changes))
    assert len(problems) == 1
    assert problems[0].startswith(expected), problems


def test_every_problem_is_reported_at_once() -> None:
    body = {
        "data": {"name": 1},
        "source": {"id": "zz", "ref": "X", "foo": 1},
        "bogus": True,
    }
    problems = problems_of(shape_run, body)
    locations = [p.split(":")[0] for p in problems]
    assert locations == [
        "data.name",
        "data.points",
        "source.id",
        "source.ref",
        "source.foo",
        "target",
        "bogus",
    ]


@pytest.mark.parametrize("body", ["{not json", b"[1, 2]", [1], "null"])
def test_body_must_be_a_json_object(body: Any) -> None:
    (problem,) = problems_of(shape_run, body)
    assert problem.startswith("body: ")


def test_run_without_data_parameter() -> None:
    ref = {"id": ID1, "ref": "DATAPOOL"}
    for body in ({"pool": ref}, {"pool": ref, "data": {}}, {"pool": ref, "data": None}):
        request = parse_execution_body(no_data_run, body)
        assert not request.has_data
    assert problems_of(no_data_run, {"pool": ref, "data": {"x": 1}}) == [
        "data: no_data_run takes no data; send {} or omit it"
    ]


def test_data_with_a_default_may_be_omitted() -> None:
    ref = {"id": ID1, "ref": "DATAPOOL"}
    assert not parse_execution_body(default_data_run, {"pool": ref}).has_data
    request = parse_execution_body(default_data_run, {"pool": ref, "data": {"x": 1, "y": 2}})
    assert request.data == Point(x=1, y=2)
    assert parse_execution_body(default_data_run, {"pool": ref, "data": None}).data is None


def test_data_of_a_plain_type() -> None:
    ref = {"id": ID1, "ref": "DATAPOOL"}
    assert parse_execution_body(dict_data_run, {"data": {"a": 1}, "pool": ref}).data == {"a": 1}
    assert problems_of(dict_data_run, {"data": {"a": "x"}, "pool": ref})[0].startswith("data.a:")


# ------------------------------------------------------------------------------- schemas


def body_validator(run: Callable[..., Any]) -> jsonschema.protocols.Validator:
    """A JSON Schema validator for run's body, with the components its $refs point to."""
    schema = request_schema(run)
    root = dict(schema.body)
    root["components"] = {"schemas": schema.components}
    jsonschema.Draft202012Validator.check_schema(root)
    return jsonschema.Draft202012Validator(root)


def test_pool_parameter_schema_is_the_guides() -> None:
    guide = yaml.safe_load(GUIDE_SCHEMA_YAML)["my_dataset"]
    ours = request_schema(examples_program("read_file").run).body["properties"]["my_dataset"]
    # Exactly the guide's object, plus the optional grant the guide's grant section adds.
    assert {k: v for k, v in ours.items() if k != "properties"} == {
        k: v for k, v in guide.items() if k != "properties"
    }
    assert ours["properties"]["id"] == guide["properties"]["id"]
    assert ours["properties"]["ref"] == guide["properties"]["ref"]
    assert set(ours["properties"]) == {"id", "ref", "grant"}
    assert ours["properties"]["grant"]["type"] == "string"
    assert ours == DATAPOOL_REF_SCHEMA


def test_body_schema_requires_data_and_every_pool() -> None:
    body = request_schema(examples_program("concat").run).body
    assert body["type"] == "object"
    assert body["additionalProperties"] is False
    assert body["required"] == ["data", "my_dataset", "another_dataset", "output_datapool"]
    data = body["properties"]["data"]
    assert data["type"] == "object"
    assert set(data["properties"]) == {
        "file_to_read_from_my_dataset",
        "file_to_read_from_another_dataset",
    }
    assert "DataPool" not in json.dumps(body).replace("DATAPOOL", "").replace("Data Pool", "")


def test_optional_data_is_not_required() -> None:
    body = request_schema(default_data_run).body
    assert body["required"] == ["pool"]
    assert "data" not in request_schema(no_data_run).body["properties"]


def test_guide_bodies_fit_the_schema_and_bad_ones_do_not() -> None:
    read_file = body_validator(examples_program("read_file").run)
    read_file.validate(GUIDE_BODY_1)
    read_file.validate(GUIDE_BODY_GRANT)
    body_validator(examples_program("concat").run).validate(GUIDE_BODY_2)
    for bad in (
        {"data": {"file_to_read": "x"}},
        {**GUIDE_BODY_1, "my_dataset": {"id": ID1, "ref": "OTHER"}},
        {**GUIDE_BODY_1, "my_dataset": {"id": ID1, "ref": "DATAPOOL", "x": 1}},
        {**GUIDE_BODY_1, "other": {}},
        {**GUIDE_BODY_1, "data": {}},
    ):
        assert not read_file.is_valid(bad), bad


def test_nested_models_go_to_components() -> None:
    schema = request_schema(shape_run)
    assert "Point" in schema.components
    assert "$defs" not in json.dumps(schema.body)
    assert "#/components/schemas/Point" in json.dumps(schema.body)
    validator = body_validator(shape_run)
    validator.validate(shape_body())
    assert not validator.is_valid(shape_body(data={"name": "s", "points": [{"x": "a"}]}))
    # A recursive model refers to itself through components.
    tree = body_validator(tree_run)
    nested = {"value": 1, "children": [{"value": 2, "children": [{"value": 3}]}]}
    tree.validate({"data": nested, "pool": {"id": ID1, "ref": "DATAPOOL"}})
    assert not tree.is_valid(
        {"data": {"value": 1, "children": [{"value": "x"}]}, "pool": {"id": ID1, "ref": "DATAPOOL"}}
    )


@pytest.mark.parametrize(
    "run",
    [shape_run, tree_run, no_data_run, default_data_run, dict_data_run],
    ids=lambda f: f.__name__,
)
def test_openapi_document_is_valid(run: Callable[..., Any]) -> None:
    document = openapi_document(run, title="svc", version="1.2.3")
    validate_openapi(document)
    assert document["openapi"].startswith("3.1")
    assert document["info"] == {"title": "svc", "version": "1.2.3"}
    (operation,) = (op for path in document["paths"].values() for op in path.values())
    assert operation["requestBody"]["content"]["application/json"]["schema"] == (
        request_schema(run).body
    )


@pytest.mark.parametrize("example", ["read_file", "concat"])
def test_openapi_document_of_the_examples_is_valid(example: str) -> None:
    document = openapi_document(examples_program(example).run)
    validate_openapi(document)
    response = document["paths"]["/service-executions"]["post"]["responses"]["200"]
    assert response["content"]["application/json"]["schema"] == {"type": "string"}


def test_the_validator_catches_a_broken_document() -> None:
    document = openapi_document(shape_run)
    document["paths"]["/service-executions"]["post"]["requestBody"]["content"] = "nope"
    with pytest.raises(OpenAPIValidationError):
        validate_openapi(document)
    document = openapi_document(shape_run)
    del document["info"]
    with pytest.raises(OpenAPIValidationError):
        validate_openapi(document)


# ---------------------------------------------------------------------- poolfs openapi CLI


def poolfs(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poolfs", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_cli_openapi_prints_a_valid_json_document() -> None:
    result = poolfs("openapi", "src.program:run", cwd=EXAMPLES / "concat")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    validate_openapi(document)
    body = document["paths"]["/service-executions"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert schema["required"] == ["data", "my_dataset", "another_dataset", "output_datapool"]
    assert schema["properties"]["output_datapool"] == DATAPOOL_REF_SCHEMA


def test_cli_openapi_yaml_is_the_same_document() -> None:
    code_dir = str(EXAMPLES / "read_file")
    as_json = poolfs("openapi", "--code-dir", code_dir, "src.program:run")
    as_yaml = poolfs("openapi", "--code-dir", code_dir, "src.program:run", "--yaml")
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert yaml.safe_load(as_yaml.stdout) == json.loads(as_json.stdout)
    assert "my_dataset:" in as_yaml.stdout
    assert "- DATAPOOL" in as_yaml.stdout


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("src.program", "expected MODULE:FUNCTION"),
        ("src.nothing:run", "cannot import 'src.nothing'"),
        ("src.program:walk", "has no 'walk'"),
        ("src.program:InputData", "neither `data` nor a DataPool"),
    ],
)
def test_cli_openapi_errors(spec: str, message: str) -> None:
    result = poolfs("openapi", spec, cwd=EXAMPLES / "read_file")
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
