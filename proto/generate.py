"""Regenerate the protobuf/gRPC modules beside cluster_agent.proto.

Usage:  python proto/generate.py           (writes the modules)
        python proto/generate.py --check   (exit 1 if the committed modules are stale)

Needs grpcio-tools (a dev-only dependency). The generated code is committed so
that installing the agent never needs protoc.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

PROTO_DIR = pathlib.Path(__file__).resolve().parent
PROTO_FILE = "cluster_agent.proto"
GENERATED = ("cluster_agent_pb2.py", "cluster_agent_pb2.pyi", "cluster_agent_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> dict[str, str]:
    """Run protoc into out_dir and return {file name: text} of the generated modules."""
    import grpc_tools
    from grpc_tools import protoc  # dev-only dependency

    include = str(pathlib.Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main([
        "protoc", f"-I{PROTO_DIR}", f"-I{include}",
        f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO_FILE),
    ])
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    texts = {name: (out_dir / name).read_text() for name in GENERATED}
    # protoc writes an absolute import; the modules live in a package, so make it relative.
    texts["cluster_agent_pb2_grpc.py"] = texts["cluster_agent_pb2_grpc.py"].replace(
        "import cluster_agent_pb2 as cluster__agent__pb2",
        "from . import cluster_agent_pb2 as cluster__agent__pb2",
    )
    return texts


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        texts = generate(pathlib.Path(tmp))
    if "--check" in argv:
        stale = [n for n, t in texts.items() if (PROTO_DIR / n).read_text() != t]
        if stale:
            print(f"stale generated code: {', '.join(stale)}; run: python proto/generate.py")
            return 1
        print("generated code is up to date")
        return 0
    for name, text in texts.items():
        (PROTO_DIR / name).write_text(text)
    print(f"wrote {', '.join(GENERATED)} in {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
