"""moco-zoo: a timm-style model zoo and transfer toolkit for Momentum Contrast (MoCo v1/v2/v3)."""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="moco-zoo",
    version="0.1.0",
    description="MoCo pretraining engine, timm/torchvision/detectron2 model zoo and downstream transfer toolkit",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["moco_zoo", "moco_zoo.*"]),
    package_data={"moco_zoo.transfer": ["configs/*/*.yaml"], "moco_zoo.pretrain": ["configs/*.yaml"],
                  "moco_zoo.evaluation": ["configs/*.yaml"]},
    # hub_configs/ is the zoo's source of truth; ship it inside the package for non-editable installs.
    data_files=[("share/moco-zoo/hub_configs", [str(p.relative_to(ROOT)) for p in sorted((ROOT / "hub_configs").glob("*.yaml"))])],
    install_requires=[
        # No upper pins: the Makefile chooses the exact torch build for the machine it runs on.
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0",
        "huggingface_hub>=0.23",
        "safetensors>=0.4",
        "pycocotools>=2.0.7",
        "tqdm>=4.60",
        "pillow>=9.0",
        "numpy>=1.23",
        "matplotlib>=3.6",
        "pyyaml>=6.0",
        "omegaconf>=2.3",
        "tensorboard>=2.14",
        "scikit-learn>=1.1",  # few-shot logistic regression (moco_zoo.evaluation.fewshot)
    ],
    extras_require={
        # transformers: the test that a published folder loads through TimmWrapperModel
        "test": ["pytest>=7.0", "pytest-timeout>=2.1", "transformers>=4.47"],
        # bench/pretrain_throughput.py: lightly peers (MoCo head, memory bank, momentum); psutil: worker USS/PSS
        "bench": ["lightly>=1.6", "psutil>=5.9"],
    },
    entry_points={"console_scripts": ["moco-zoo=moco_zoo.cli:main"]},
)
