"""Packaging for sfs_fast.

The folders kernels/, export/, bench/ and training/ sit at the top of the repository but
install as subpackages of the one ``sfs_fast`` namespace (package_dir), so nothing named
``export`` or ``training`` lands in site-packages.
"""
from setuptools import setup

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
    package_data={"sfs_fast": ["data/*"]},
    include_package_data=True,
    install_requires=[
        # A range, not a pin: users bring the torch build that fits their machine.
        "torch>=2.3",
        "numpy>=1.23",
        "pillow>=9.0",
        "safetensors>=0.4",
        "h5py>=3.0",
        "tqdm>=4.60",
    ],
    extras_require={
        "onnx": ["onnx>=1.15", "onnxruntime>=1.17", "onnxslim>=0.1.30"],
        # onnxruntime-gpu replaces onnxruntime: never install both in one environment
        # (the later install silently wins and the CUDA provider disappears).
        "gpu": ["onnx>=1.15", "onnxruntime-gpu>=1.17", "onnxslim>=0.1.30", "triton>=3.0"],
        "plot": ["matplotlib>=3.5"],
        "test": [
            "pytest>=7",
            "onnx>=1.15",
            "onnxruntime>=1.17",
            "onnxslim>=0.1.30",
            "matplotlib>=3.5",
            "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
    },
    entry_points={
        "console_scripts": [
            "sfs-convert=sfs_fast.cli.convert:main",
            "sfs-decompose=sfs_fast.cli.decompose:main",
            "sfs-interpolate=sfs_fast.cli.interpolate:main",
            "sfs-export=sfs_fast.export.cli:main",
            "sfs-bench=sfs_fast.bench.cli:main",
            "sfs-train=sfs_fast.training.cli:train_main",
            "sfs-data=sfs_fast.training.cli:data_main",
        ],
    },
)
