"""The committed protos/*_pb2*.py modules must be exactly what protos/generate.py produces now."""

import subprocess
import sys
from pathlib import Path

import pytest

from protos import generate as protos_generate

REPO_ROOT = Path(protos_generate.__file__).resolve().parent.parent


def test_regenerating_gives_byte_identical_modules(tmp_path):
    written = protos_generate.generate(tmp_path)
    assert {path.name for path in written} == {f"{name}{suffix}" for name in ("admin", "generation")
                                               for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")}
    for path in written:
        committed = protos_generate.PROTOS_DIR / path.name
        assert committed.exists(), f"{path.name} is not committed; run `python -m protos.generate`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"protos/{path.name} is stale; run `python -m protos.generate` and commit the result"
        )


def test_generated_modules_import_through_the_package():
    # A fresh interpreter with only the repository root on the path, as an installed package would see it.
    code = (
        "from protos import generation_pb2, generation_pb2_grpc\n"
        "assert generation_pb2_grpc.protos_dot_generation__pb2 is generation_pb2\n"
        "assert generation_pb2.DESCRIPTOR.package == 'pdcluster.v1'\n"
        "assert 'Generate' in generation_pb2.DESCRIPTOR.services_by_name['Generation'].methods_by_name\n"
        "assert hasattr(generation_pb2_grpc, 'GenerationStub')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr


def test_bare_import_is_detected(tmp_path):
    bad = tmp_path / "x_pb2_grpc.py"
    bad.write_text("import grpc\nimport generation_pb2 as generation__pb2\n")
    with pytest.raises(RuntimeError, match="generation_pb2"):
        protos_generate._check_imports(bad)
