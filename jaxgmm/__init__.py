"""jaxgmm: Gaussian mixture models in JAX, as pure functions over pytrees."""

from ._fit import FitResult as FitResult
from ._fit import em_step as em_step
from ._fit import em_steps as em_steps
from ._fit import fit as fit
from ._gmm import GMM as GMM
from ._io import load as load
from ._io import save as save
from ._kmeans import kmeans as kmeans
from ._selection import Selection as Selection
from ._selection import aic as aic
from ._selection import anomaly_threshold as anomaly_threshold
from ._selection import bic as bic
from ._selection import select_n_components as select_n_components
from ._stats import Stats as Stats
from ._status import Status as Status

__version__ = "0.1.0"
