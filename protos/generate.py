"""Regenerate the committed Python modules of protos/*.proto.

Run `python -m protos.generate` from the repository root after editing a .proto file; tests/protos checks
that the committed modules match what this produces, so the result must be deterministic.

The .proto files are compiled with the repository root as the include path, so they are registered as
`protos/<name>.proto` and protoc itself writes the grpc module's import as `from protos import <name>_pb2`
(a bare `import <name>_pb2` would only work with protos/ on sys.path). `_check_imports` makes sure of it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent
PACKAGE_NAME = PROTOS_DIR.name  # "protos": the import prefix of the generated modules
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_BARE_IMPORT = re.compile(r"^import (\w+_pb2)\b", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTOS_DIR.glob("*.proto"))


def generated_names(proto: Path) -> list[str]:
    return [proto.stem + suffix for suffix in GENERATED_SUFFIXES]


def generate(out_dir: Path) -> list[Path]:
    """Compile every protos/*.proto into out_dir (flat: out_dir/<name>_pb2.py ...); returns the files written."""
    from grpc_tools import protoc  # a build/test dependency only, so imported here

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as staging:
        staging_dir = Path(staging)
        for proto in proto_files():
            relative = proto.relative_to(REPO_ROOT).as_posix()
            args = [
                "grpc_tools.protoc",
                f"--proto_path={REPO_ROOT}",
                f"--python_out={staging_dir}",
                f"--pyi_out={staging_dir}",
                f"--grpc_python_out={staging_dir}",
                relative,
            ]
            exit_code = protoc.main(args)
            if exit_code != 0:
                raise RuntimeError(f"protoc failed on {relative} (exit code {exit_code})")
            for name in generated_names(proto):
                produced = staging_dir / PACKAGE_NAME / name
                _check_imports(produced)
                target = out_dir / name
                shutil.copyfile(produced, target)
                written.append(target)
    return written


def _check_imports(path: Path) -> None:
    """Generated modules must import their siblings through the package, never as top-level modules."""
    bare = _BARE_IMPORT.findall(path.read_text())
    if bare:
        raise RuntimeError(f"{path.name}: protoc emitted bare imports {bare}; expected 'from {PACKAGE_NAME} import ...'")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=PROTOS_DIR, help="where to write (default: protos/)")
    args = parser.parse_args(argv)
    for path in generate(args.out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
