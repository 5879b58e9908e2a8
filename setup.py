"""t2r-fairseq: a fairseq plugin (``--user-dir t2r_fairseq``) for T2R swap-then-finetune.

fairseq is installed as ``fairseq-fixed`` (the 0.12 code with the dataclass and
omegaconf fixes needed on Python 3.11; the upstream 0.12.2 wheel fails on
import there). It is an sdist whose build needs torch: build it with
``--no-build-isolation`` after torch is installed, as ``scripts/setup.sh`` does,
or pip pulls a second, multi-GB torch into its isolated build environment.
"""

from setuptools import find_packages, setup

setup(
    name="t2r-fairseq",
    version="0.1.0",
    description="Finetune pretrained softmax transformers into RNNs (T2R) as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["t2r_fairseq", "t2r_fairseq.*"]),
    install_requires=[
        # torch: 2.4 is the first with torch.serialization.add_safe_globals, without which fairseq
        # checkpoints cannot be loaded safely (t2r_fairseq.fairseq_compat.MIN_TORCH refuses older at
        # import); scripts/setup.sh pins the CPU build (torch==2.13.0) unless the venv already has a torch.
        "torch>=2.4,<3",
        "fairseq-fixed==0.12.3.1",
        "hydra-core==1.3.2",
        "omegaconf==2.3.0",
        "sacrebleu>=2.3",
        "sentencepiece>=0.1.99",
        "numpy",
        # recipes/ and data-prep/: fairseq's WMT pipeline (Moses tokenisation + joint BPE) from PyPI.
        "sacremoses>=0.1.1",
        "subword-nmt>=0.3.8",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "tensorboardX>=2.6"],
        "tensorboard": ["tensorboardX>=2.6"],
        "plots": ["matplotlib>=3.7"],
        # fla's Triton kernels for the chunkwise causal form (CUDA only; --linear-kernel fla: not yet verified
        # on a GPU, so --linear-kernel auto does not pick it).
        "fla": ["flash-linear-attention"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
