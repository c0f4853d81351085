"""Build glue that pyproject.toml cannot express: the source folders map to `bitnet_grpc.*`, each
Cython kernel compiles with its hand-written C files, and the gRPC stubs are generated from `protos/` at
build time so the proto file stays their only source."""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent.resolve()
PROTO_DIR = Path("protos") / "bitnet" / "v1"

PACKAGE_DIRS = {
    "bitnet_grpc.server": "server",
    "bitnet_grpc.client": "client",
    "bitnet_grpc.cyext": "cyext",
}


class BuildPyWithProtos(build_py):
    """Generate `bitnet_grpc.proto.*_pb2` modules next to the other packages in the build tree."""

    def run(self) -> None:
        super().run()
        from grpc_tools import protoc

        out_dir = Path(self.build_lib)
        proto_files = sorted(PROTO_DIR.glob("*.proto"))
        # The virtual path maps protos/bitnet/v1 to bitnet_grpc/proto, so generated imports read
        # `from bitnet_grpc.proto import ...` while the proto package stays `bitnet.v1`.
        include = protoc._get_resource_file_name("grpc_tools", "_proto")
        for proto in proto_files:
            args = [
                "grpc_tools.protoc",
                f"-Ibitnet_grpc/proto={PROTO_DIR}",
                f"-I{include}",
                f"--python_out={out_dir}",
                f"--pyi_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                f"bitnet_grpc/proto/{proto.name}",
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed on {proto}")
        pkg = out_dir / "bitnet_grpc" / "proto"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").touch()
        # Ship the .proto sources too, so clients in other languages can find them in the install.
        for proto in proto_files:
            (pkg / proto.name).write_bytes(proto.read_bytes())


def extensions() -> list[Extension]:
    # No OpenMP: the kernels run on their own worker pool (cyext/ternary_pool.c, shared via task_pool.h).
    compile_args = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wno-unused-function"]
    link_args = ["-pthread"]
    exts = []
    for pyx in sorted(Path("cyext").glob("*.pyx")):
        c_sources = [str(p) for p in sorted(Path("cyext").glob(f"{pyx.stem}_*.c"))]
        exts.append(
            Extension(
                f"bitnet_grpc.cyext.{pyx.stem}",
                [str(pyx), *c_sources],
                include_dirs=["cyext"],
                extra_compile_args=compile_args,
                extra_link_args=link_args,
            )
        )
    return cythonize(
        exts,
        language_level=3,
        build_dir="build/cython",
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        annotate=os.environ.get("BITNET_GRPC_ANNOTATE") == "1",
    )


setup(
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"bitnet_grpc.cyext": ["*.pyx", "*.pxd", "*.h"], "bitnet_grpc.server": ["data/*"]},
    ext_modules=extensions(),
    cmdclass={"build_py": BuildPyWithProtos},
)
