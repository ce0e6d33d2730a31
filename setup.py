"""Packaging for imontage.

Installs the ``imontage`` package, the repository's top-level ``kernels/`` folder as
``imontage.kernels`` (``kernels`` is an unrelated PyPI distribution that other libraries import
when present, so it must not be shadowed), and ``megatron_patches``.
"""

from setuptools import find_packages, setup

imontage_packages = find_packages(include=["imontage", "imontage.*"])
kernel_packages = [
    "imontage.kernels" + name[len("kernels") :] for name in find_packages(include=["kernels", "kernels.*"])
]
patch_packages = find_packages(include=["megatron_patches", "megatron_patches.*"])

setup(
    name="imontage",
    version="0.1.0",
    description="Distributed training of diffusion transformers that generate and edit sets of images and videos",
    python_requires=">=3.10",
    packages=imontage_packages + kernel_packages + patch_packages,
    package_dir={"imontage.kernels": "kernels"},
    install_requires=[
        # The supported range: what CI runs (torch 2.13, triton 3.9) down to what the lent GPU machines
        # run (torch 2.11, triton 3.6); docs/kernels.md, "Supported versions", says how each end is checked.
        "torch>=2.11,<2.14",
        "deepspeed>=0.16",
        "megatron-core>=0.12",
        "triton>=3.6,<3.10",
        "webdataset>=0.2.90",
        "braceexpand>=0.1.7",
        "omegaconf>=2.3",
        "tensorboard>=2.14",
        "safetensors>=0.4",
        "numpy>=1.24",
        "pillow>=10.0",
        "av>=12.0",  # PyAV: mp4/webm decoding in the data pipeline, SAR videos written as MP4 (H.264)
        "tqdm>=4.66",
        "pytest>=8.0",
        # Pretrained families: model classes to import from and export to, VAEs and text
        # encoders for offline latent encoding. Both are pure Python.
        "diffusers>=0.35",
        "transformers>=4.50",
        "accelerate>=1.0",  # diffusers' from_pretrained of classes that keep modules in fp32 needs it
        "peft>=0.14",  # diffusers' LoRA loader (load_lora_adapter), which exported adapters are for
    ],
    extras_require={
        "dev": ["ruff>=0.6", "mypy>=1.10", "import-linter>=2.17", "pytest-xdist>=3.5"],
        "gpu": ["flash-attn>=2.6", "transformer-engine>=1.10"],
    },
    entry_points={
        "console_scripts": [
            "imontage-train=imontage.train.cli:main",
            "imontage-sample=imontage.sample.cli:main",
            "imontage-imagic=imontage.imagic.cli:main",
        ]
    },
)
