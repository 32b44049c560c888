from setuptools import find_packages, setup

setup(
    name="llava-fitprune",
    version="0.1.0",
    description="Visual-token pruning (FitPrune, LVPruning and baselines) as a plugin for haotian-liu/LLaVA",
    packages=find_packages(include=["llava_fitprune", "llava_fitprune.*"]),
    package_data={"llava_fitprune.core": ["recipes/*.json"]},
    python_requires=">=3.10",
    # llava-torch is installed separately with --no-deps (its metadata pins torch 2.0.1 and gradio);
    # see docs/speed.md "Install on a GPU machine".
    install_requires=[
        "torch>=2.1",
        "transformers==4.37.2",
        "tokenizers==0.15.1",
        "sentencepiece",
        "protobuf",
        "accelerate==0.21.0",
        "pillow",
        "shortuuid",
        "tqdm",
        "numpy",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.5"],
        "train": ["deepspeed"],
        "test": ["pytest"],
    },
    entry_points={
        "console_scripts": ["llava-fitprune=llava_fitprune.cli:main"],
        # lmms-eval (>= 0.6) reads this group for external models: `--model fitprune_llava_hf` etc.
        "lmms_eval.models": ["llava_fitprune = llava_fitprune.lmms_eval_plugin:manifests"],
    },
)
