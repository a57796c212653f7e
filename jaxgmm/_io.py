"""Saving and loading mixtures as safetensors files.

A jaxgmm file is a plain safetensors file: an 8-byte little-endian header
length, a JSON header, then the raw tensor bytes. It holds exactly three
tensors, the stored form of a :class:`~jaxgmm.GMM` (``weights``, ``means`` and
``precisions_cholesky``, scikit-learn shaped), and the string metadata

- ``format``: ``"jaxgmm"``
- ``format_version``: ``"1"``
- ``covariance_type``: ``"full"``, ``"diag"``, ``"spherical"`` or ``"tied"``
- ``dtype``: ``"float32"`` or ``"float64"``

so any safetensors reader (Python, Rust, JavaScript) can open it. No pickle is
involved anywhere. Other metadata keys are ignored on loading, so a file may
carry notes; other tensors are refused.

Files are untrusted input. :func:`load` parses the length prefix and the JSON
header itself and checks every field, every size and every value before it
hands bytes to safetensors or builds a model, so a malformed or hostile file
raises ``ValueError`` rather than an arbitrary exception, a huge allocation or
a model that silently computes NaN.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct

import jax
import numpy as np
import safetensors.numpy

from ._covariance import COVARIANCE_TYPES, structure_for
from ._gmm import GMM, is_concrete

FORMAT_NAME = "jaxgmm"
FORMAT_VERSION = 1

_TENSOR_NAMES = ("weights", "means", "precisions_cholesky")
_METADATA_KEYS = ("format", "format_version", "covariance_type", "dtype")
# dtype name in the metadata -> (safetensors dtype code, numpy dtype).
_DTYPES = {
    "float32": ("F32", np.dtype(np.float32)),
    "float64": ("F64", np.dtype(np.float64)),
}
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}
_LENGTH_PREFIX_BYTES = 8
# Our headers are a few hundred bytes. The cap is checked before anything is
# read, so a hostile length field cannot make us allocate; it still leaves
# room for future metadata. (safetensors' own cap is 100 MB.)
_MAX_HEADER_BYTES = 1 << 20


def save(path: str | os.PathLike, gmm: GMM) -> None:
    """Write a mixture to a safetensors file.

    The file holds ``weights`` (K,), ``means`` (K, D) and
    ``precisions_cholesky`` (scikit-learn shaped for the covariance type) in
    the model's own dtype, float32 or float64, with a JSON metadata header
    naming the format, its version, the covariance type and the dtype.
    Loading it back gives a bit-identical model.

    Args:
        path: file to write (``str`` or ``os.PathLike``); replaced if it exists.
        gmm: one mixture with concrete float32 or float64 leaves. A batched
            ``GMM`` (leaves with leading batch axes, as ``jax.vmap`` makes) is
            refused: save each mixture on its own, e.g.
            ``jax.tree.map(lambda leaf: leaf[i], gmms)``.

    Raises:
        TypeError: ``gmm`` is not a ``jaxgmm.GMM``.
        ValueError: ``gmm`` is batched, traced, not float32/float64, or has
            parameters that :func:`load` would refuse (non-finite values,
            weights not summing to one, a factor that is not a valid Cholesky
            factor of a precision).
        OSError: the file cannot be written.

    Example:
        >>> import jax.numpy as jnp, jaxgmm
        >>> gmm = jaxgmm.GMM(jnp.array([0.4, 0.6]), jnp.array([[0.0], [2.0]]),
        ...                  jnp.array([[1.0], [0.5]]), covariance_type="diag")
        >>> jaxgmm.save("model.safetensors", gmm)  # doctest: +SKIP
        >>> jaxgmm.load("model.safetensors").covariance_type  # doctest: +SKIP
        'diag'
    """
    if not isinstance(gmm, GMM):
        raise TypeError(f"`gmm` must be a jaxgmm.GMM, got {type(gmm).__name__}")
    leaves = {name: getattr(gmm, name) for name in _TENSOR_NAMES}
    if not is_concrete(*leaves.values()):
        raise ValueError("cannot save a traced GMM: call `save` outside jit/vmap")
    tensors = {name: np.ascontiguousarray(leaf) for name, leaf in leaves.items()}
    if tensors["weights"].ndim != 1:
        raise ValueError(
            "cannot save a batched GMM (`weights` has shape "
            f"{tensors['weights'].shape}, expected (K,)): save each mixture "
            "separately, e.g. jax.tree.map(lambda leaf: leaf[i], gmm)"
        )
    dtype = tensors["means"].dtype
    dtype_name = next((n for n, (_, d) in _DTYPES.items() if d == dtype), None)
    if dtype_name is None or any(t.dtype != dtype for t in tensors.values()):
        raise ValueError(
            "only float32 and float64 mixtures can be saved, got "
            + ", ".join(f"`{name}` {t.dtype}" for name, t in tensors.items())
        )
    # The same checks as `load`, so we never write a file it would refuse
    # (a GMM edited with eqx.tree_at or returned by a failed fit can hold
    # parameters its constructor would have rejected).
    try:
        _check_shapes(gmm.covariance_type, {n: t.shape for n, t in tensors.items()})
        _check_values(gmm.covariance_type, tensors)
        GMM.from_precisions_cholesky(
            tensors["weights"],
            tensors["means"],
            tensors["precisions_cholesky"],
            gmm.covariance_type,
        )
    except ValueError as error:
        raise ValueError(f"cannot save this GMM: {error}") from None
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "covariance_type": gmm.covariance_type,
        "dtype": dtype_name,
    }
    # Serialise to bytes and write with Python's own `open`, so a bad path
    # raises the usual OSError subclasses rather than a SafetensorError.
    data = safetensors.numpy.save(tensors, metadata=metadata)
    with open(path, "wb") as file:
        file.write(data)


def load(path: str | os.PathLike) -> GMM:
    """Read a mixture written by :func:`save`.

    The file is treated as untrusted: its length prefix, JSON header,
    metadata, tensor names, dtypes, shapes and byte offsets are all checked
    before the tensor bytes are read, and the parameters are validated like
    any ``GMM`` construction (finite, weights non-negative and summing to
    one, upper-triangular precision factors with a positive diagonal,
    positive-definite covariances).

    A float64 file loads as float64 when ``jax_enable_x64`` is on. With it off
    (JAX's default) the model is rounded to float32, as JAX does for any
    float64 input; the rounded parameters are validated again, so values that
    do not fit in float32 raise ``ValueError``.

    Args:
        path: file to read (``str`` or ``os.PathLike``).

    Returns:
        The mixture, with the covariance type and (subject to x64, above) the
        dtype stored in the file, bit-identical to the saved one.

    Raises:
        ValueError: the file is not a valid jaxgmm file: not safetensors, a
            truncated or oversized header, another format, a newer format
            version, missing or unknown tensors, wrong dtypes or shapes, or
            invalid parameter values. The message says which.
        OSError: the file cannot be opened (``FileNotFoundError`` for a
            missing file, ``IsADirectoryError``, ``PermissionError``): these
            say nothing about the file's contents, so they are not turned into
            ``ValueError``.

    Example:
        >>> gmm = jaxgmm.load("model.safetensors")  # doctest: +SKIP
        >>> gmm.log_prob(x).shape  # doctest: +SKIP
        (N,)
    """
    # Opening is outside the `try`: OSError is about the path, not the bytes.
    with open(path, "rb") as file:
        try:
            return _read(file)
        except ValueError as error:
            raise ValueError(
                f"invalid jaxgmm file {os.fspath(path)!r}: {error}"
            ) from None


def _read(file) -> GMM:
    info = os.fstat(file.fileno())
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file")
    file_size = info.st_size
    prefix = file.read(_LENGTH_PREFIX_BYTES)
    if len(prefix) < _LENGTH_PREFIX_BYTES:
        raise ValueError(
            f"{len(prefix)} bytes is too short for a safetensors file "
            f"(at least an {_LENGTH_PREFIX_BYTES}-byte header length)"
        )
    (header_size,) = struct.unpack("<Q", prefix)
    # Both bounds are checked before the header is read, so the length field
    # never decides how much memory we allocate.
    if header_size > _MAX_HEADER_BYTES:
        raise ValueError(
            f"header length field is {header_size} bytes, more than the "
            f"{_MAX_HEADER_BYTES} allowed"
        )
    if header_size > file_size - _LENGTH_PREFIX_BYTES:
        raise ValueError(
            f"header length field is {header_size} bytes but only "
            f"{max(file_size - _LENGTH_PREFIX_BYTES, 0)} bytes follow it "
            "(truncated or not a safetensors file)"
        )
    header_bytes = file.read(header_size)
    if len(header_bytes) != header_size:
        raise ValueError("file shorter than its header length (truncated)")
    header = _parse_header_json(header_bytes)
    covariance_type, dtype, layout = _check_header(header)

    data_size = sum(end - begin for begin, end in layout.values())
    available = file_size - _LENGTH_PREFIX_BYTES - header_size
    if available != data_size:
        raise ValueError(
            f"the header describes {data_size} bytes of tensor data but the "
            f"file holds {available} ("
            + ("truncated" if available < data_size else "trailing bytes")
            + ")"
        )
    # Read one byte more than expected to notice a file that grew meanwhile.
    data = file.read(data_size + 1)
    if len(data) != data_size:
        raise ValueError("file changed size while being read")

    try:
        tensors = safetensors.numpy.load(prefix + header_bytes + data)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise ValueError(f"safetensors could not read it: {error}") from None
    # Redundant with the header checks, but cheap, and it guards against any
    # disagreement between our parser and safetensors'.
    if set(tensors) != set(_TENSOR_NAMES):
        raise ValueError(f"unexpected tensors {sorted(tensors)}")
    stored_dtype = _DTYPES[dtype][1]
    target_dtype = jax.dtypes.canonicalize_dtype(stored_dtype)
    arrays = {}
    for name in _TENSOR_NAMES:
        array = tensors[name]
        if array.dtype.kind != "f" or array.dtype.itemsize != stored_dtype.itemsize:
            raise ValueError(f"`{name}` has dtype {array.dtype}, expected {dtype}")
        # Round float64 to float32 here (when x64 is off) so the values
        # checked below are exactly the ones the model will hold.
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            arrays[name] = array.astype(target_dtype)
    _check_shapes(covariance_type, {n: a.shape for n, a in arrays.items()})
    _check_values(covariance_type, arrays)
    return GMM.from_precisions_cholesky(
        arrays["weights"],
        arrays["means"],
        arrays["precisions_cholesky"],
        covariance_type,
    )


def _parse_header_json(header_bytes: bytes) -> dict:
    def refuse_constant(name):
        raise ValueError(f"non-standard JSON constant {name}")

    def unique_keys(pairs):
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            # json keeps the last duplicate, safetensors may not: refuse both.
            raise ValueError("duplicate key in a JSON object")
        return dict(pairs)

    try:
        text = header_bytes.decode("utf-8")
        header = json.loads(
            text, object_pairs_hook=unique_keys, parse_constant=refuse_constant
        )
    except (ValueError, RecursionError) as error:
        # ValueError covers UnicodeDecodeError and JSONDecodeError;
        # RecursionError comes from deeply nested arrays.
        raise ValueError(f"header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def _describe(value, limit: int = 60) -> str:
    """A repr short enough for an error message, whatever a hostile file holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_natural(value) -> bool:
    # `bool` is a subclass of `int` in Python; JSON true is not a size.
    return type(value) is int and value >= 0


def _check_header(header: dict) -> tuple[str, str, dict[str, tuple[int, int]]]:
    """Metadata and tensor entries; returns (covariance_type, dtype, offsets)."""
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise ValueError("no `__metadata__` in the header: not a jaxgmm file")
    if not all(isinstance(value, str) for value in metadata.values()):
        raise ValueError("`__metadata__` values must be strings")
    missing = [key for key in _METADATA_KEYS if key not in metadata]
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(
            f"metadata `format` is {_describe(metadata.get('format'))}, expected "
            f"{FORMAT_NAME!r}: not a jaxgmm file"
        )
    if missing:
        raise ValueError(f"metadata is missing {missing}")
    version_text = metadata["format_version"]
    # str.isdigit accepts other scripts' digits; insist on ASCII.
    if not (version_text.isascii() and version_text.isdigit()):
        raise ValueError(
            f"`format_version` {_describe(version_text)} is not an integer"
        )
    # Compare digit strings, not ints: a hostile version of a million digits
    # would exceed Python's int-parsing limit.
    version_digits = version_text.lstrip("0") or "0"
    current = str(FORMAT_VERSION)
    if (len(version_digits), version_digits) > (len(current), current):
        raise ValueError(
            f"format version {version_digits[:20]} was written by a newer "
            f"jaxgmm; this one reads version {FORMAT_VERSION}: upgrade jaxgmm"
        )
    if version_digits != current:
        raise ValueError(f"unsupported format version {version_digits}")
    covariance_type = metadata["covariance_type"]
    try:
        structure_for(covariance_type)
    except ValueError:
        raise ValueError(
            f"metadata `covariance_type` is {_describe(covariance_type)}, "
            f"expected one of {sorted(COVARIANCE_TYPES)}"
        ) from None
    dtype = metadata["dtype"]
    if dtype not in _DTYPES:
        raise ValueError(
            f"metadata `dtype` is {_describe(dtype)}, expected one of {sorted(_DTYPES)}"
        )
    dtype_code, numpy_dtype = _DTYPES[dtype]

    entries = {key: value for key, value in header.items() if key != "__metadata__"}
    missing = [name for name in _TENSOR_NAMES if name not in entries]
    if missing:
        raise ValueError(f"missing tensors {missing}")
    unknown = sorted(set(entries) - set(_TENSOR_NAMES))
    if unknown:
        raise ValueError(
            f"unknown tensors {_describe(unknown)}; "
            f"expected exactly {list(_TENSOR_NAMES)}"
        )

    shapes, layout = {}, {}
    for name in _TENSOR_NAMES:
        entry = entries[name]
        if not isinstance(entry, dict) or set(entry) != _TENSOR_FIELDS:
            raise ValueError(
                f"tensor `{name}` must have exactly the fields {sorted(_TENSOR_FIELDS)}"
            )
        if entry["dtype"] != dtype_code:
            raise ValueError(
                f"tensor `{name}` has dtype {_describe(entry['dtype'])}, but the "
                f"metadata says {dtype} ({dtype_code})"
            )
        shape, offsets = entry["shape"], entry["data_offsets"]
        # No tensor of ours has more than 3 axes; the cap also keeps the size
        # product below cheap for a header full of huge numbers.
        if not (
            isinstance(shape, list) and len(shape) <= 3 and all(map(_is_natural, shape))
        ):
            raise ValueError(f"tensor `{name}` has an invalid shape {_describe(shape)}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(map(_is_natural, offsets))
            and offsets[0] <= offsets[1]
        ):
            raise ValueError(
                f"tensor `{name}` has invalid data_offsets {_describe(offsets)}"
            )
        # Python ints: no overflow however large the header's numbers are.
        if math.prod(shape) * numpy_dtype.itemsize != offsets[1] - offsets[0]:
            raise ValueError(
                f"tensor `{name}` of shape {_describe(tuple(shape))} and dtype {dtype} "
                f"does not span its data_offsets {_describe(offsets)}"
            )
        shapes[name] = tuple(shape)
        layout[name] = (offsets[0], offsets[1])
    _check_shapes(covariance_type, shapes)

    # safetensors requires the tensors to tile the data section exactly.
    position = 0
    for begin, end in sorted(layout.values()):
        if begin != position:
            raise ValueError("tensor data_offsets overlap or leave gaps")
        position = end
    return covariance_type, dtype, layout


def _check_shapes(covariance_type: str, shapes: dict[str, tuple[int, ...]]):
    """Shapes consistent with one mixture of ``covariance_type``."""
    weights, means = shapes["weights"], shapes["means"]
    if len(weights) != 1 or weights[0] < 1:
        raise ValueError(
            f"`weights` must have shape (K,) with K >= 1, got {_describe(weights)}"
        )
    if len(means) != 2 or means[0] != weights[0] or means[1] < 1:
        raise ValueError(
            f"`means` must have shape (K, D) = ({weights[0]}, D) with D >= 1, "
            f"got {_describe(means)}"
        )
    expected = structure_for(covariance_type).covariance_shape(*means)
    if shapes["precisions_cholesky"] != expected:
        raise ValueError(
            f"`precisions_cholesky` must have shape {expected} for "
            f"covariance_type={covariance_type!r} with K, D = {means}, got "
            f"{_describe(shapes['precisions_cholesky'])}"
        )


def _check_values(covariance_type: str, arrays: dict[str, np.ndarray]):
    """What GMM construction does not check about a precision factor."""
    for name in _TENSOR_NAMES:
        if not np.all(np.isfinite(arrays[name])):
            raise ValueError(f"`{name}` contains NaN or infinite values")
    factor = arrays["precisions_cholesky"]
    k, d = arrays["means"].shape
    # The identity factor marks the diagonal for every covariance type (all of
    # a diag or spherical factor is diagonal), so no per-type branching.
    identity = np.asarray(structure_for(covariance_type).identity(k, d, bool))
    # GMM construction only sees the covariance P^-T P^-1, which is positive
    # definite whatever the diagonal's signs, but log-densities take the log
    # of the diagonal: a non-positive entry would give NaN.
    if np.any(factor[identity] <= 0):
        raise ValueError(
            "`precisions_cholesky` must have a positive diagonal "
            "(the covariance is not positive definite)"
        )
    # Densities square the means and the factor, summed over up to D^3 terms
    # (the full form's whitening sums D products, then D squares). Parameters
    # whose squares overflow pass every check above yet give NaN densities at
    # the model's own means, so refuse them. The bound leaves any realistic
    # model alone: in float32 it allows max|mean| * max|factor| up to about
    # 9e18 / D^1.5. Logs, because the product itself may overflow.
    log_growth = math.log(4.0) + 3.0 * math.log(d)
    for name in ("means", "precisions_cholesky"):
        log_growth += 2.0 * math.log(max(float(np.max(np.abs(arrays[name]))), 1.0))
    if log_growth >= math.log(float(np.finfo(factor.dtype).max)):
        raise ValueError(
            "`means` and `precisions_cholesky` are too large in magnitude for "
            f"{factor.dtype}: log-densities would overflow"
        )
    # scikit-learn's full and tied factors are upper triangular. The
    # covariance is rebuilt from the upper triangle alone while densities use
    # the whole matrix, so a non-zero entry below the diagonal would make the
    # two silently disagree. (For diag, ~identity is empty: nothing to check.)
    if identity.ndim >= 2 and np.any(factor[np.tril(~identity, k=-1)] != 0):
        raise ValueError("`precisions_cholesky` must be upper triangular")
