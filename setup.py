"""Packaging for sfs_fast.

The folders kernels/, export/, bench/ and training/ sit at the top of the repository but
install as subpackages of the one ``sfs_fast`` namespace (package_dir), so nothing named
``export`` or ``training`` lands in site-packages.
"""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    import pybind11
except ImportError:  # build isolation provides it (pyproject.toml); a bare build skips the op
    pybind11 = None


class BuildExt(build_ext):
    """Build the C++ shading kernels with OpenMP where the compiler has it, without otherwise.

    The extension is optional: if it cannot be built at all, the package still installs and
    ``sh_shade(backend="auto")`` falls back to the reference backend (with a warning).
    """

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # compile the four kernel files side by side
            self.parallel = True

    def build_extension(self, ext):
        openmp = ["-fopenmp"] if sys.platform != "win32" else ["/openmp"]
        try:
            ext.extra_compile_args += openmp
            ext.extra_link_args += openmp
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: retry without OpenMP
            print(f"warning: building {ext.name} with OpenMP failed ({exc}); building it single-threaded")
            for flag in openmp:
                ext.extra_compile_args.remove(flag)
                ext.extra_link_args.remove(flag)
            super().build_extension(ext)


def cpu_kernels():
    """The pybind11 module sfs_fast.kernels._cpu (raw buffers, no torch ABI coupling)."""
    if pybind11 is None:
        print("warning: pybind11 not found; the cpu shading backend will not be built")
        return []
    sources = [f"kernels/csrc/{name}.cpp" for name in
               ("sh_shade_module", "sh_shade_generic", "sh_shade_avx2", "sh_shade_avx512")]
    unix = sys.platform != "win32"
    return [Extension(
        "sfs_fast.kernels._cpu",
        sources=sources,
        include_dirs=[pybind11.get_include(), "kernels/csrc"],
        depends=["kernels/csrc/sh_shade.h", "kernels/csrc/sh_shade_impl.h"],
        language="c++",
        # -fno-math-errno lets GCC vectorize sqrt (5x faster loop), -fno-trapping-math lets it
        # if-convert the 16-bit conversions (no value changes); no -march=native, so the
        # wheel is portable: AVX2/AVX-512 variants are compiled separately and picked at run time.
        extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden", "-g0"] if unix else ["/O2", "/std:c++17"],
        extra_link_args=[],
        optional=True,
    )]

PACKAGE_DIR = {
    "sfs_fast": "sfs_fast",
    "sfs_fast.kernels": "kernels",
    "sfs_fast.export": "export",
    "sfs_fast.bench": "bench",
    "sfs_fast.training": "training",
}

setup(
    name="sfs_fast",
    version="0.1.0",
    description="Fast face decomposition (normals, albedo, SH light, shading, residue): "
    "SfSNet and the residue-network methods, fused shading kernels, ONNX export.",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIR) + ["sfs_fast.cli"],
    package_dir=PACKAGE_DIR,
    # The CUDA sources are compiled on first use on a GPU machine, so they ship with the package,
    # with csrc/sh_basis.h (the SH constants and basis), which the .cu includes as ../csrc/sh_basis.h.
    package_data={"sfs_fast": ["data/*", "data/yunet/*", "data/examples/*"], "sfs_fast.kernels": ["cuda/*.cu", "cuda/*.cpp", "csrc/*.h", "csrc/*.cpp"]},
    include_package_data=True,
    ext_modules=cpu_kernels(),
    cmdclass={"build_ext": BuildExt},
    install_requires=[
        # A range, not a pin: users bring the torch build that fits their machine.
        "torch>=2.3",
        "numpy>=1.23",
        "pillow>=9.0",
        "safetensors>=0.4",
        "h5py>=3.0",
        "tqdm>=4.60",
        # the download lock of the weights cache (already a torch dependency)
        "filelock>=3.0",
    ],
    extras_require={
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17", "onnxslim>=0.1.30"],
        # onnxruntime-gpu replaces onnxruntime: never install both in one environment
        # (the later install silently wins and the CUDA provider disappears).
        "gpu": ["onnx>=1.15", "onnxruntime-gpu>=1.17", "onnxslim>=0.1.30", "triton>=3.0"],
        "plot": ["matplotlib>=3.5"],
        # --backend openvino (Intel's runtime on the exported ONNX; auto's fastest bf16 path on
        # CPUs with AMX) and the OpenVINO peer rows of sfs-bench e2e
        "openvino": ["onnx>=1.15", "onnxruntime>=1.17", "onnxslim>=0.1.30", "openvino>=2024.0"],
        # face detection (YuNet through cv2.FaceDetectorYN) and alignment: sfs_fast.faces
        "faces": ["opencv-python-headless>=4.8"],
        # sfs-decompose --engine ray: Ray Data's actor pools (ActorPoolStrategy(size=...)) and map_batches
        "ray": ["ray[data]>=2.9"],
        "test": [
            "pytest>=7",
            "pybind11>=2.10",  # the CUDA binding's compile check needs its headers
            "onnx>=1.15",
            "onnxruntime>=1.17",
            "onnxslim>=0.1.30",
            "matplotlib>=3.5",
            "opencv-python-headless>=4.8",
            "openvino>=2024.0",
            "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
            "ray[data]>=2.9; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
    },
    entry_points={
        "console_scripts": [
            "sfs-convert=sfs_fast.cli.convert:main",
            "sfs-weights=sfs_fast.cli.weights:main",
            "sfs-decompose=sfs_fast.cli.decompose:main",
            "sfs-relight=sfs_fast.cli.relight:main",
            "sfs-interpolate=sfs_fast.cli.interpolate:main",
            "sfs-compare=sfs_fast.cli.compare:main",
            "sfs-export=sfs_fast.export.cli:main",
            "sfs-bench=sfs_fast.bench.cli:main",
            "sfs-train=sfs_fast.training.cli:train_main",
            "sfs-data=sfs_fast.training.cli:data_main",
        ],
    },
)
