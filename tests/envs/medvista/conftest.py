"""A small generated MedVista data set shared by the MedVista tests (a few seconds)."""

import pytest

SYNTH_IMAGES = 30
SYNTH_SEED = 3


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from hiper_envs.medvista import synth

    root = tmp_path_factory.mktemp("medvista") / "data"
    synth.generate(str(root), synth.SynthConfig(num_images=SYNTH_IMAGES, seed=SYNTH_SEED), progress=False)
    return str(root)
