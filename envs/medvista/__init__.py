"""MedVista: tool-integrated visual question answering on medical images (``hiper/MedVista-v0``).

- `MedVistaEnv` (`env`): one question about one image; zoom/contrast tools, then an answer.
- `synth`: the offline default data (pydicom's bundled CT/MR slices and phantoms with planted
  findings), written in SLAKE's layout; `loaders`: SLAKE, VQA-RAD and PathVQA official layouts.
- `scoring`: the benchmarks' scoring (closed: exact match; open: token recall).
- `oracle`: the oracle, a fixed threshold detector, Plan-Execute demonstrations (JSONL).

Needs the `[medvista]` extra (pydicom) for the default data; importing this package does not.
"""

ENV_ID = "hiper/MedVista-v0"  # registered by `hiper_envs` (envs/__init__.py)


def __getattr__(name):
    # Image-backed parts import on first use, so `import hiper_envs.medvista` stays light.
    if name == "MedVistaEnv":
        from hiper_envs.medvista.env import MedVistaEnv

        return MedVistaEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ENV_ID", "MedVistaEnv"]
