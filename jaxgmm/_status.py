"""Failures are data: status codes carried by fit results (as lineax's RESULTS)."""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """Outcome of a fit, stored as an int32 in ``result.status``.

    ``Status.success`` is 0. Every other member names a problem with the
    input or the fit; with ``throw=False`` the fit still returns finite
    parameters (fitted to the usable rows with their weights, or to all
    finite rows with unit weight when too few are usable; equal weights,
    means at the data centre and unit covariances when the fit's own
    parameters are not finite) so that one bad data set never spoils a
    batch.
    """

    success = 0
    nonfinite_input = 1
    negative_weights = 2
    too_few_weighted_rows = 3
    nonfinite_parameters = 4
    precision_loss = 5

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.success: "success",
    Status.nonfinite_input: (
        "`x` contains NaN or infinite values in rows with non-zero "
        "`sample_weight`; drop those rows or give them weight 0"
    ),
    Status.negative_weights: "`sample_weight` must be finite and non-negative",
    Status.too_few_weighted_rows: (
        "`n_components` is larger than the number of rows of `x` with positive "
        "`sample_weight`; use fewer components or more data"
    ),
    Status.nonfinite_parameters: (
        "the fitted parameters are not finite; try a larger `reg_covar` or set "
        "`max_condition`"
    ),
    Status.precision_loss: (
        "float32 matrix-product E-steps lost more than 1e-3 of these components' "
        "precision (tight clusters far apart); pass e_step='anchored', call fit "
        "outside jax.jit (it then refits anchored by itself), or fit in float64"
    ),
}

MESSAGES = [Status(code).message for code in range(len(Status))]
