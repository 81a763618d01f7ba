"""Build script of MosaicDiff: the `mosaicdiff` and `mosaic_kernels` packages and the optional
compiled extension `mosaic_kernels._C`.

Static metadata lives in pyproject.toml. This file adds what is decided at build time: the
version (read from python/mosaicdiff/_version.py), the torch requirement (pinned to the exact
torch that `_C` is compiled against) and the CMake build of `_C` (CMakeLists.txt, csrc/).

Environment variables:
    MOSAIC_BUILD_EXT: ``auto`` (default) builds `_C` when nvcc and a CUDA build of torch are
        found and otherwise installs the pure-Python package, saying so in one line; ``1``
        requires the build (a missing toolchain or a failed compile is an error); ``0`` skips it.
    TORCH_CUDA_ARCH_LIST: compute capabilities, default ``8.0;9.0`` (A100, H100). ``9.0a``
        enables Hopper-only instructions.
    CUDA_HOME: CUDA toolkit root; defaults to /usr/local/cuda when it exists. CUDACXX may
        name nvcc directly.
    MAX_JOBS: parallel compile jobs (default 2).
    CMAKE_BUILD_TYPE: Release (default), RelWithDebInfo or Debug.

`pip install .` builds against the torch pinned in pyproject.toml's build requirements (build
isolation). To build against the torch already installed in the environment, use
`pip install --no-build-isolation .` (setuptools>=64, wheel, cmake>=3.26 and ninja must be
installed there). Note that pip shows the build's messages only with `-v`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
EXT_NAME = "mosaic_kernels._C"
BUILD_INFO = "_build_info.json"
DEFAULT_ARCH_LIST = "8.0;9.0"
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")
UNPINNED_TORCH = "torch>=2.4"
#: Every package the code imports (tests/test_declared_dependencies.py checks it), torch apart.
RUNTIME_REQUIRES = [
    "diffusers>=0.30",
    "safetensors",
    "numpy",
    "scipy",  # eval: pixel metrics (scipy.stats)
    "Pillow",  # PNG grids and images (app.outputs, eval.plots)
    "tqdm",
    "scikit-learn",
    "matplotlib",
]


def log(message: str) -> None:
    """Prints one build message (pip shows them with `pip install -v`)."""
    print(f"mosaicdiff: {message}", file=sys.stderr, flush=True)


def read_version() -> str:
    """Returns ``__version__`` from python/mosaicdiff/_version.py (the single source)."""
    text = (ROOT / "python" / "mosaicdiff" / "_version.py").read_text()
    match = re.search(r"^__version__\s*=\s*[\"']([^\"']+)[\"']", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("python/mosaicdiff/_version.py must define __version__ = \"X.Y.Z\"")
    return match.group(1)


@dataclass(frozen=True)
class ExtensionPlan:
    """Whether and how to build `mosaic_kernels._C`.

    Attributes:
        build: build the extension.
        required: a failed build is an error (MOSAIC_BUILD_EXT=1), not a fallback.
        reason: why the extension is not built (empty when it is).
        torch_version: version of the torch to build against (None when it is not importable).
        nvcc: path of nvcc.
        cuda_home: CUDA toolkit root.
    """

    build: bool
    required: bool
    reason: str = ""
    torch_version: str | None = None
    nvcc: str | None = None
    cuda_home: str | None = None


def _build_mode() -> str:
    value = os.environ.get("MOSAIC_BUILD_EXT", "auto").strip().lower()
    aliases = {"": "auto", "auto": "auto", "1": "1", "true": "1", "on": "1", "yes": "1",
               "0": "0", "false": "0", "off": "0", "no": "0"}
    if value not in aliases:
        raise SystemExit(f"mosaicdiff: MOSAIC_BUILD_EXT must be auto, 1 or 0, got {value!r}")
    return aliases[value]


def _find_cuda() -> tuple[str | None, str | None]:
    """Returns (nvcc, cuda_home); sets CUDA_HOME to /usr/local/cuda when unset and present."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not cuda_home and DEFAULT_CUDA_HOME.is_dir():
        cuda_home = str(DEFAULT_CUDA_HOME)
        # torch's own helpers otherwise guess /usr/local, and linking fails.
        os.environ["CUDA_HOME"] = cuda_home
    nvcc = os.environ.get("CUDACXX")
    if not nvcc and cuda_home:
        nvcc = str(Path(cuda_home) / "bin" / "nvcc")
    if not nvcc:
        nvcc = shutil.which("nvcc")
    if nvcc and not cuda_home:
        cuda_home = str(Path(nvcc).resolve().parent.parent)
    return nvcc, cuda_home


def plan_extension() -> ExtensionPlan:
    """Decides whether to build `_C` from MOSAIC_BUILD_EXT, torch and nvcc.

    Raises:
        SystemExit: MOSAIC_BUILD_EXT=1 and the toolchain is incomplete, or the variable is
            invalid.
    """
    mode = _build_mode()
    if mode == "0":
        log("MOSAIC_BUILD_EXT=0: installing without the compiled extension mosaic_kernels._C")
        return ExtensionPlan(build=False, required=False, reason="MOSAIC_BUILD_EXT=0")
    required = mode == "1"
    torch_version = None
    nvcc, cuda_home = _find_cuda()
    try:
        with warnings.catch_warnings():  # e.g. "Failed to initialize NumPy" in a build env
            warnings.simplefilter("ignore")
            import torch
    except ImportError as exc:
        reason = f"torch is not importable ({exc})"
    else:
        torch_version = torch.__version__
        if torch.version.cuda is None:
            reason = f"torch {torch_version} is not a CUDA build"
        elif nvcc is None:
            reason = "nvcc not found (set CUDA_HOME or CUDACXX)"
        elif not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
            reason = f"nvcc not found at {nvcc} (set CUDA_HOME or CUDACXX)"
        else:
            reason = ""
    if reason:
        if required:
            raise SystemExit(
                f"mosaicdiff: MOSAIC_BUILD_EXT=1 but mosaic_kernels._C cannot be built: {reason}"
            )
        log(
            f"installing without the compiled extension mosaic_kernels._C: {reason} "
            "(the Triton and torch backends are used; MOSAIC_BUILD_EXT=1 makes this an error)"
        )
        return ExtensionPlan(build=False, required=False, reason=reason,
                             torch_version=torch_version)
    return ExtensionPlan(build=True, required=required, torch_version=torch_version,
                         nvcc=nvcc, cuda_home=cuda_home)


def torch_requirement(plan: ExtensionPlan) -> str:
    """The runtime torch requirement: the exact release `_C` is built against, if built."""
    if plan.build and plan.torch_version:
        return f"torch=={plan.torch_version.split('+')[0]}"
    return UNPINNED_TORCH


def _cmake_executable() -> str:
    try:
        import cmake  # the `cmake` wheel from the build requirements (>= 3.26)

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except (ImportError, AttributeError):
        found = shutil.which("cmake")
        if found is None:
            raise CompileError("cmake not found: pip install 'cmake>=3.26' ninja") from None
        return found


def _ninja_executable() -> str | None:
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except (ImportError, AttributeError):
        return shutil.which("ninja")


def _remove_built_artifacts(package_dir: Path) -> None:
    for path in [*package_dir.glob("_C.*.so"), *package_dir.glob("_C.*.pyd"),
                 package_dir / BUILD_INFO]:
        path.unlink(missing_ok=True)


class CMakeExtension(Extension):
    """An extension that CMakeLists.txt builds (setuptools compiles nothing itself)."""

    def __init__(self, name: str, optional: bool) -> None:
        super().__init__(name, sources=[], optional=optional)


class CMakeBuild(build_ext):
    """Configures and builds `_C` with CMake, then copies it and its build info in place.

    The CMake tree is build/temp.*/cmake (incremental across builds with the same torch). For
    editable installs setuptools copies the module into the source tree; `copy_extensions_to_source`
    copies `_build_info.json` alongside it.
    """

    def build_extension(self, ext: Extension) -> None:
        dest = Path(self.get_ext_fullpath(ext.name)).resolve()
        # Nothing from an earlier build survives a failed one.
        _remove_built_artifacts(dest.parent)
        try:
            self._build_with_cmake(dest)
        except (subprocess.CalledProcessError, OSError, CompileError) as exc:
            _remove_built_artifacts(dest.parent)
            if ext.optional:
                log(
                    f"building mosaic_kernels._C failed ({exc}); installing without it "
                    "(MOSAIC_BUILD_EXT=1 makes this an error, MOSAIC_BUILD_EXT=0 skips the build)"
                )
            raise CompileError(f"building mosaic_kernels._C failed: {exc}") from exc

    def _build_with_cmake(self, dest: Path) -> None:
        import torch

        plan = PLAN
        build_dir = (Path(self.build_temp) / "cmake").resolve()
        # A CMake cache made with another torch (each isolated build gets a new temp env) or
        # another nvcc holds stale paths: start over.
        stamp = build_dir / "mosaic_toolchain_stamp.txt"
        identity = "\n".join([sys.executable, str(Path(torch.__file__).resolve().parent),
                               torch.__version__, str(plan.nvcc), str(plan.cuda_home)]) + "\n"
        if build_dir.exists() and (not stamp.exists() or stamp.read_text() != identity):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(identity)

        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
        build_type = os.environ.get("CMAKE_BUILD_TYPE", "").strip() or "Release"
        jobs = os.environ.get("MAX_JOBS", "").strip() or "2"
        cmake = _cmake_executable()
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_CUDA_COMPILER={plan.nvcc}",
            f"-DCUDA_TOOLKIT_ROOT_DIR={plan.cuda_home}",
            f"-DTORCH_CUDA_ARCH_LIST={arch_list}",
        ]
        ninja = _ninja_executable()
        if ninja is not None and not (build_dir / "CMakeCache.txt").exists():
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        env = {**os.environ, "CUDA_HOME": str(plan.cuda_home), "TORCH_CUDA_ARCH_LIST": arch_list}

        log(f"building mosaic_kernels._C with CMake: torch {torch.__version__}, "
            f"CUDA arches {arch_list}, {build_type}, MAX_JOBS={jobs}")
        start = time.monotonic()
        subprocess.run(configure, check=True, env=env)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "_C", "--config",
                        build_type, "-j", jobs], check=True, env=env)

        built_dir = build_dir / "mosaic_kernels"
        modules = sorted(built_dir.glob("_C.*.so"))
        if len(modules) != 1 or not (built_dir / BUILD_INFO).exists():
            raise CompileError(f"expected one _C module and {BUILD_INFO} in {built_dir}, "
                               f"found {[p.name for p in built_dir.iterdir()]}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules[0], dest)
        os.chmod(dest, 0o755)
        shutil.copyfile(built_dir / BUILD_INFO, dest.parent / BUILD_INFO)
        log(f"built mosaic_kernels._C in {time.monotonic() - start:.0f} s -> {dest}")

    def _inplace_and_regular(self, ext: Extension) -> tuple[Path, Path]:
        """(source-tree path, build/ path) of the module; called while self.inplace is set."""
        inplace = Path(self.get_ext_fullpath(ext.name))
        self.inplace = False
        try:
            regular = Path(self.get_ext_fullpath(ext.name))
        finally:
            self.inplace = True
        return inplace, regular

    def copy_extensions_to_source(self) -> None:
        """Editable installs: also put `_build_info.json` next to the in-place module.

        After a failed optional build, the in-place module of an earlier build is removed, so
        the source tree never holds a module that does not match its sources.
        """
        paths = [self._inplace_and_regular(ext) for ext in self.extensions]
        for inplace, regular in paths:
            if not regular.exists():
                _remove_built_artifacts(inplace.parent)
        super().copy_extensions_to_source()
        for inplace, regular in paths:
            info = regular.parent / BUILD_INFO
            if regular.exists() and info.exists():
                shutil.copyfile(info, inplace.parent / BUILD_INFO)
                log(f"in-place build: mosaic_kernels._C and {BUILD_INFO} copied to "
                    f"{inplace.parent}")


class BuildPy(build_py):
    """Keeps a pure-Python build free of `_C` files left in build/ by an earlier build."""

    def run(self) -> None:
        super().run()
        if not PLAN.build:
            _remove_built_artifacts(Path(self.build_lib) / "mosaic_kernels")


PLAN = plan_extension()

setup(
    version=read_version(),
    packages=[
        *find_packages(where=".", include=["mosaic_kernels", "mosaic_kernels.*"]),
        *find_packages(where="python", include=["mosaicdiff", "mosaicdiff.*"]),
    ],
    package_dir={"mosaic_kernels": "mosaic_kernels", "mosaicdiff": "python/mosaicdiff"},
    install_requires=[torch_requirement(PLAN), *RUNTIME_REQUIRES],
    ext_modules=[CMakeExtension(EXT_NAME, optional=not PLAN.required)] if PLAN.build else [],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
)
