"""Generates the gRPC stubs into proto/ before the wheel is built (pyproject.toml has the rest).

The stubs are generated, never committed, so `pip install .` from a clean clone must make them.
`-Iheadroom_sidecar/proto=proto` gives them the installed import path
(`from headroom_sidecar.proto import headroom_pb2`) while the file stays at proto/headroom.proto.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
STUBS = ("headroom_pb2.py", "headroom_pb2.pyi", "headroom_pb2_grpc.py")


def generate_stubs(root: Path = ROOT) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    with tempfile.TemporaryDirectory() as out:
        args = ["protoc", f"-Iheadroom_sidecar/proto={root / 'proto'}", f"--python_out={out}",
                f"--pyi_out={out}", f"--grpc_python_out={out}", str(root / "proto" / "headroom.proto")]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {root / 'proto' / 'headroom.proto'}")
        for name in STUBS:
            shutil.copyfile(Path(out, "headroom_sidecar", "proto", name), root / "proto" / name)


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


if __name__ == "__main__":
    setup(cmdclass={"build_py": BuildPyWithStubs})
