from setuptools import find_packages, setup

setup(
    name="mdistiller_lakd",
    version="0.1.0",
    description="LAKD (local attention knowledge distillation) and its baselines, mdistiller-compatible",
    packages=find_packages(include=["mdistiller_lakd", "mdistiller_lakd.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch",
        "torchvision",
        "yacs",
        "tensorboardX",
        "scipy",
        "tqdm",
    ],
    extras_require={
        # onnx: tools/export.py --format onnx (onnx + onnxscript: torch's exporter; onnxruntime: the check)
        "onnx": ["onnx", "onnxscript", "onnxruntime"],
        "test": ["pytest", "matplotlib", "onnx", "onnxscript", "onnxruntime", "submitit"],
        "viz": ["matplotlib"],
        "slurm": ["submitit"],  # tools/grid.py --executor slurm
    },
)
