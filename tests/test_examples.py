"""The example scripts run and give sensible answers."""

import runpy
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_example_recovers_two_blobs():
    namespace = runpy.run_path(str(EXAMPLES / "quickstart.py"))
    out = namespace["main"]()
    means = np.sort(np.asarray(out["gmm"].means), axis=0)
    np.testing.assert_allclose(means, [[0.0, 0.0], [4.0, 4.0]], atol=0.2)
    assert out["selection"].n_components == 2
    assert out["batch"].gmm.means.shape == (256, 3, 2)
    np.testing.assert_allclose(
        out["loaded"].means, out["selection"].result.gmm.means, rtol=0, atol=0
    )
    assert out["samples"].shape == (5, 2)
