"""Compile the project's own .proto files into the package: ``make proto``.

``python proto/generate.py [OUT]`` runs grpcio-tools' protoc on every ``*.proto`` under
``proto/`` and writes ``_pb2.py``, ``_pb2.pyi`` and ``_pb2_grpc.py`` beside where the proto's
package says (``authz_server/v1/`` for ``authz_server.v1``) under OUT (default: the repository,
where the generated files are committed; tests/unit/test_proto.py regenerates into a
temporary directory and compares).

Envoy's ``CheckRequest`` comes from ``envoy/service/auth/v3/external_auth.proto``, which the
xds-protos package does not ship: it holds only the generated modules. Each of them carries
its file's descriptor, so protoc is handed the imports as a FileDescriptorSet built from the
installed package (``--descriptor_set_in``): the very messages the server parses at run time,
and no copy of Envoy's sources to keep in step.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
# Imported by our protos and found in no directory of ours.
IMPORTED = (external_auth_pb2.DESCRIPTOR,)
# grpcio-tools ships these as .proto files (its include path): not taken from the descriptors.
_BUNDLED = "google/protobuf/"


def import_set() -> descriptor_pb2.FileDescriptorSet:
    """The files ``IMPORTED`` need, each after its own imports, as protoc reads them."""
    ordered: dict[str, FileDescriptor] = {}

    def visit(file: FileDescriptor) -> None:
        if file.name in ordered:
            return
        for dependency in file.dependencies:
            visit(dependency)
        ordered[file.name] = file

    for file in IMPORTED:
        visit(file)
    descriptors = descriptor_pb2.FileDescriptorSet()
    for name, file in ordered.items():
        if not name.startswith(_BUNDLED):
            file.CopyToProto(descriptors.file.add())
    return descriptors


def generate(out: Path) -> list[Path]:
    """Compile every proto under ``proto/`` into ``out``. Returns the files written, relative
    to ``out``. Raises RuntimeError when protoc fails (its messages are on stderr)."""
    sources = sorted(p.relative_to(PROTO_DIR).as_posix() for p in PROTO_DIR.rglob("*.proto"))
    bundled = resources.files("grpc_tools") / "_proto"
    with tempfile.TemporaryDirectory(prefix="authz-proto-") as scratch:
        imports = Path(scratch) / "imports.pb"
        imports.write_bytes(import_set().SerializeToString())
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"--proto_path={PROTO_DIR}",
                f"--proto_path={bundled}",
                f"--descriptor_set_in={imports}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                *sources,
            ]
        )
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}) on {', '.join(sources)}")
    return [
        Path(source).with_name(Path(source).stem + suffix)
        for source in sources
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    ]


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else REPO_ROOT
    for path in generate(out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
