"""Saving and loading mixtures: round trips, the file format, hostile files."""

import json
import pathlib
import struct

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxgmm

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")
TENSOR_NAMES = ("weights", "means", "precisions_cholesky")
# One shape for every model in this file: JAX compilation dominates test time.
K, D = 3, 2
# An entry on the diagonal of each type's precision factor.
DIAGONAL_ENTRY = {"full": (0, 1, 1), "tied": (1, 1), "diag": (0, 1), "spherical": (1,)}

FUZZ_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def make_gmm(covariance_type, dtype=np.float32):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(K, D, D))
    full = a @ np.swapaxes(a, -1, -2) + 0.5 * np.eye(D)
    covariances = {
        "full": full,
        "tied": full[0],
        "diag": rng.uniform(0.3, 2.0, size=(K, D)),
        "spherical": rng.uniform(0.3, 2.0, size=(K,)),
    }[covariance_type]
    return jaxgmm.GMM(
        np.array([0.2, 0.3, 0.5], dtype),
        rng.normal(size=(K, D)).astype(dtype),
        covariances.astype(dtype),
        covariance_type,
    )


def points(dtype=np.float32):
    return np.random.default_rng(1).normal(scale=2.0, size=(200, D)).astype(dtype)


def stored_tensors(covariance_type):
    """The three stored arrays of a valid float32 model, as numpy arrays."""
    gmm = make_gmm(covariance_type)
    return {name: np.array(getattr(gmm, name)) for name in TENSOR_NAMES}


def metadata_for(kind, **changes):
    """Valid metadata, with some keys changed (or removed, when set to None)."""
    metadata = {
        "format": "jaxgmm",
        "format_version": "1",
        "covariance_type": kind,
        "dtype": "float32",
    }
    metadata.update(changes)
    return {key: value for key, value in metadata.items() if value is not None}


def write_tensors(path, tensors, metadata):
    safetensors.numpy.save_file(tensors, path, metadata=metadata)
    return path


def split_file(data):
    """(header dict, tensor bytes) of a safetensors file's bytes."""
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    return header, data[8 + header_size :]


def join_file(header, tensor_bytes, header_size=None):
    """Bytes of a safetensors file, optionally with a lying length field."""
    header_bytes = json.dumps(header).encode()
    if header_size is None:
        header_size = len(header_bytes)
    return struct.pack("<Q", header_size) + header_bytes + tensor_bytes


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    """Bytes of a valid float32 file for every covariance type."""
    directory = tmp_path_factory.mktemp("valid")
    files = {}
    for covariance_type in COVARIANCE_TYPES:
        path = directory / f"{covariance_type}.safetensors"
        jaxgmm.save(path, make_gmm(covariance_type))
        files[covariance_type] = path.read_bytes()
    return files


def assert_refused(path, match):
    with pytest.raises(ValueError, match=match):
        jaxgmm.load(path)


def assert_valid_model_or_value_error(path):
    """The whole safety contract: a usable finite model, or ValueError."""
    try:
        gmm = jaxgmm.load(path)
    except ValueError:
        return
    assert isinstance(gmm, jaxgmm.GMM)
    for name in TENSOR_NAMES:
        assert np.all(np.isfinite(np.asarray(getattr(gmm, name))))
    assert np.all(np.isfinite(np.asarray(gmm.covariances)))
    assert np.all(np.isfinite(np.asarray(gmm.log_prob(gmm.means))))


# -- round trips -------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_round_trip_is_bit_exact(tmp_path, covariance_type):
    gmm = make_gmm(covariance_type)
    path = tmp_path / "model.safetensors"
    jaxgmm.save(path, gmm)
    loaded = jaxgmm.load(path)
    assert loaded.covariance_type == covariance_type
    for name in TENSOR_NAMES:
        original, restored = np.asarray(getattr(gmm, name)), getattr(loaded, name)
        assert restored.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(restored), original, strict=True)
    x = points()
    np.testing.assert_array_equal(
        np.asarray(loaded.log_prob(x)), np.asarray(gmm.log_prob(x))
    )


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float64_round_trip_is_bit_exact_with_x64_enabled(tmp_path, covariance_type):
    path = tmp_path / "model.safetensors"
    # A context manager, not the global flag: other test files share the process.
    with jax.enable_x64(True):
        gmm = make_gmm(covariance_type, np.float64)
        assert gmm.means.dtype == jnp.float64
        jaxgmm.save(path, gmm)
        loaded = jaxgmm.load(path)
        for name in TENSOR_NAMES:
            original, restored = np.asarray(getattr(gmm, name)), getattr(loaded, name)
            assert restored.dtype == jnp.float64
            np.testing.assert_array_equal(np.asarray(restored), original, strict=True)
        x = points(np.float64)
        np.testing.assert_array_equal(
            np.asarray(loaded.log_prob(x)), np.asarray(gmm.log_prob(x))
        )


def test_float64_file_loads_as_float32_when_x64_is_off(tmp_path):
    path = tmp_path / "model.safetensors"
    with jax.enable_x64(True):
        gmm = make_gmm("full", np.float64)
        jaxgmm.save(path, gmm)
    with jax.enable_x64(False):
        loaded = jaxgmm.load(path)
    for name in TENSOR_NAMES:
        restored = np.asarray(getattr(loaded, name))
        assert restored.dtype == np.float32
        expected = np.asarray(getattr(gmm, name)).astype(np.float32)
        np.testing.assert_array_equal(restored, expected)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_file_is_plain_safetensors_with_a_jaxgmm_metadata_header(
    tmp_path, covariance_type
):
    path = tmp_path / "model.safetensors"
    gmm = make_gmm(covariance_type)
    jaxgmm.save(path, gmm)
    with safetensors.safe_open(path, framework="numpy") as file:
        assert file.metadata() == {
            "format": "jaxgmm",
            "format_version": "1",
            "covariance_type": covariance_type,
            "dtype": "float32",
        }
        assert sorted(file.keys()) == sorted(TENSOR_NAMES)
        for name in TENSOR_NAMES:
            np.testing.assert_array_equal(
                file.get_tensor(name), np.asarray(getattr(gmm, name)), strict=True
            )


def test_save_and_load_accept_str_and_path_objects(tmp_path):
    gmm = make_gmm("diag")
    as_string = str(tmp_path / "a.safetensors")
    jaxgmm.save(as_string, gmm)
    assert jaxgmm.load(pathlib.Path(as_string)).covariance_type == "diag"
    as_path = tmp_path / "b.safetensors"
    jaxgmm.save(as_path, gmm)
    assert jaxgmm.load(str(as_path)).covariance_type == "diag"


def test_save_overwrites_an_existing_file(tmp_path):
    path = tmp_path / "model.safetensors"
    jaxgmm.save(path, make_gmm("full"))
    jaxgmm.save(path, make_gmm("spherical"))
    assert jaxgmm.load(path).covariance_type == "spherical"


def test_loading_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        jaxgmm.load(tmp_path / "missing.safetensors")


def test_save_refuses_a_batched_gmm(tmp_path):
    gmm = make_gmm("full")
    batched = jax.tree.map(lambda leaf: jnp.stack([leaf, leaf]), gmm)
    with pytest.raises(ValueError, match="batched"):
        jaxgmm.save(tmp_path / "model.safetensors", batched)
    assert not (tmp_path / "model.safetensors").exists()


def test_save_refuses_something_that_is_not_a_gmm(tmp_path):
    with pytest.raises(TypeError, match="GMM"):
        jaxgmm.save(tmp_path / "model.safetensors", {"weights": np.ones(1)})


def test_save_refuses_parameters_that_load_would_refuse(tmp_path):
    gmm = make_gmm("diag")
    broken = eqx.tree_at(lambda g: g.means, gmm, gmm.means.at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="cannot save.*`means`"):
        jaxgmm.save(tmp_path / "model.safetensors", broken)


def test_save_refuses_a_float16_gmm(tmp_path):
    gmm = make_gmm("diag")
    half = jax.tree.map(lambda leaf: leaf.astype(jnp.float16), gmm)
    with pytest.raises(ValueError, match="float32 and float64"):
        jaxgmm.save(tmp_path / "model.safetensors", half)


# -- malformed and hostile files -------------------------------------------------


def test_load_refuses_random_bytes(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_refused(path, "header length")


def test_load_refuses_random_bytes_behind_a_plausible_length_field(tmp_path):
    path = tmp_path / "random.bin"
    body = np.random.default_rng(0).bytes(4096)
    path.write_bytes(struct.pack("<Q", 1000) + body)
    assert_refused(path, "not valid JSON")


def test_load_refuses_an_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    assert_refused(path, "too short")


@pytest.mark.parametrize(
    "keep", [4, 20, -1], ids=["in_length_field", "in_header", "in_tensor_data"]
)
def test_load_refuses_a_truncated_file(tmp_path, valid_files, keep):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(valid_files["full"][:keep])
    assert_refused(path, "too short|header length|truncated")


def test_load_refuses_trailing_bytes(tmp_path, valid_files):
    path = tmp_path / "long.safetensors"
    path.write_bytes(valid_files["full"] + b"\0" * 8)
    assert_refused(path, "trailing bytes")


@pytest.mark.parametrize(
    "header_size", [2**63, 2**64 - 1, 500_000_000], ids=["2^63", "2^64-1", "500MB"]
)
def test_load_refuses_an_absurd_header_length_before_reading(
    tmp_path, valid_files, header_size
):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", header_size) + valid_files["full"][8:])
    assert_refused(path, "header length field .* more than")


def test_load_refuses_a_header_length_beyond_the_end_of_the_file(tmp_path, valid_files):
    data = valid_files["full"]
    path = tmp_path / "long_header.safetensors"
    path.write_bytes(struct.pack("<Q", len(data) - 7) + data[8:])
    assert_refused(path, "only .* bytes follow")


def test_load_refuses_a_header_that_is_not_a_json_object(tmp_path):
    path = tmp_path / "list.safetensors"
    path.write_bytes(join_file([1, 2, 3], b""))
    assert_refused(path, "not a JSON object")


def test_load_refuses_duplicate_keys_in_the_header(tmp_path, valid_files):
    header, data = split_file(valid_files["full"])
    text = json.dumps(header)
    text = text[:-1] + ', "means": ' + json.dumps(header["means"]) + "}"
    path = tmp_path / "duplicate.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    assert_refused(path, "duplicate key")


def test_load_refuses_a_plain_safetensors_file_without_metadata(tmp_path):
    path = write_tensors(tmp_path / "plain.safetensors", stored_tensors("full"), None)
    assert_refused(path, "not a jaxgmm file")


def test_load_refuses_another_format_name(tmp_path):
    metadata = metadata_for("full", format="notjaxgmm")
    path = write_tensors(tmp_path / "m.safetensors", stored_tensors("full"), metadata)
    assert_refused(path, "'notjaxgmm'.*not a jaxgmm file")


def test_load_refuses_a_future_format_version(tmp_path):
    metadata = metadata_for("full", format_version="2")
    path = write_tensors(tmp_path / "m.safetensors", stored_tensors("full"), metadata)
    assert_refused(path, "version 2 was written by a newer jaxgmm")


@pytest.mark.parametrize("version", ["one", "1.0", "-1", " 1", "", "0"])
def test_load_refuses_a_format_version_that_is_not_a_known_integer(tmp_path, version):
    metadata = metadata_for("full", format_version=version)
    path = write_tensors(tmp_path / "m.safetensors", stored_tensors("full"), metadata)
    assert_refused(path, "format_version|format version")


def test_load_refuses_a_million_digit_format_version(tmp_path):
    metadata = metadata_for("full", format_version="9" * 1_000_000)
    path = write_tensors(tmp_path / "m.safetensors", stored_tensors("full"), metadata)
    assert_refused(path, "newer jaxgmm")


@pytest.mark.parametrize("missing", ["format_version", "covariance_type", "dtype"])
def test_load_refuses_missing_metadata(tmp_path, missing):
    metadata = metadata_for("full", **{missing: None})
    path = write_tensors(tmp_path / "m.safetensors", stored_tensors("full"), metadata)
    assert_refused(path, f"missing.*{missing}")


def test_load_refuses_an_unknown_covariance_type(tmp_path):
    metadata = metadata_for("full", covariance_type="banded")
    path = write_tensors(tmp_path / "m.safetensors", stored_tensors("full"), metadata)
    assert_refused(path, "covariance_type")


@pytest.mark.parametrize("missing", TENSOR_NAMES)
def test_load_refuses_a_missing_tensor(tmp_path, missing):
    tensors = stored_tensors("full")
    del tensors[missing]
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("full"))
    assert_refused(path, f"missing tensors.*{missing}")


def test_load_refuses_an_unknown_extra_tensor(tmp_path):
    tensors = stored_tensors("full")
    tensors["covariances"] = np.ones((K, D, D), np.float32)
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("full"))
    assert_refused(path, "unknown tensors.*covariances")


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.float64])
def test_load_refuses_tensors_whose_dtype_disagrees_with_the_metadata(tmp_path, dtype):
    tensors = {k: v.astype(dtype) for k, v in stored_tensors("diag").items()}
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("diag"))
    assert_refused(path, "dtype")


def test_load_refuses_an_unsupported_dtype(tmp_path):
    tensors = {k: v.astype(np.float16) for k, v in stored_tensors("diag").items()}
    metadata = metadata_for("diag", dtype="float16")
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata)
    assert_refused(path, "metadata `dtype` is 'float16'")


def test_load_refuses_tensors_of_mixed_dtypes(tmp_path):
    tensors = stored_tensors("diag")
    tensors["means"] = tensors["means"].astype(np.float64)
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("diag"))
    assert_refused(path, "`means` has dtype 'F64'")


def test_load_refuses_means_whose_shape_disagrees_with_the_weights(tmp_path):
    tensors = stored_tensors("diag")
    tensors["means"] = np.zeros((K + 1, D), np.float32)
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("diag"))
    assert_refused(path, "`means` must have shape")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_load_refuses_a_factor_shaped_for_another_covariance_type(
    tmp_path, covariance_type
):
    other = {"full": "diag", "diag": "spherical", "spherical": "tied", "tied": "full"}
    tensors = stored_tensors(covariance_type)
    tensors["precisions_cholesky"] = stored_tensors(other[covariance_type])[
        "precisions_cholesky"
    ]
    metadata = metadata_for(covariance_type)
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata)
    assert_refused(path, "`precisions_cholesky` must have shape")


def test_load_refuses_an_empty_mixture(tmp_path):
    tensors = {
        "weights": np.zeros((0,), np.float32),
        "means": np.zeros((0, D), np.float32),
        "precisions_cholesky": np.zeros((0,), np.float32),
    }
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("spherical"))
    assert_refused(path, "K >= 1")


def test_load_refuses_overlapping_tensor_data(tmp_path, valid_files):
    header, data = split_file(valid_files["spherical"])
    # Point `weights` at the same bytes as `precisions_cholesky` (both (K,)).
    header["weights"]["data_offsets"] = header["precisions_cholesky"]["data_offsets"]
    path = tmp_path / "overlap.safetensors"
    path.write_bytes(join_file(header, data))
    assert_refused(path, "overlap")


def test_load_refuses_a_shape_that_does_not_match_the_data_size(tmp_path, valid_files):
    header, data = split_file(valid_files["full"])
    header["means"]["shape"] = [10**30, 10**30]
    path = tmp_path / "shape.safetensors"
    path.write_bytes(join_file(header, data))
    assert_refused(path, "does not span its data_offsets")


@pytest.mark.parametrize(
    ("name", "index", "value"),
    [
        ("means", (0, 0), np.nan),
        ("means", (1, 1), -np.inf),
        ("weights", (0,), np.nan),
        ("precisions_cholesky", (0, 0, 1), np.inf),
    ],
    ids=["nan_mean", "infinite_mean", "nan_weight", "infinite_factor"],
)
def test_load_refuses_non_finite_values(tmp_path, name, index, value):
    tensors = stored_tensors("full")
    tensors[name][index] = value
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("full"))
    assert_refused(path, f"`{name}` contains NaN or infinite")


def test_load_refuses_weights_that_do_not_sum_to_one(tmp_path):
    tensors = stored_tensors("diag")
    tensors["weights"] = tensors["weights"] * 2
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("diag"))
    assert_refused(path, "`weights` must sum to 1")


def test_load_refuses_negative_weights(tmp_path):
    tensors = stored_tensors("diag")
    tensors["weights"] = np.array([-0.1, 0.6, 0.5], np.float32)
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("diag"))
    assert_refused(path, "`weights` must be finite and non-negative")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("sign", [0.0, -1.0], ids=["zero", "negative"])
def test_load_refuses_a_factor_with_a_non_positive_diagonal(
    tmp_path, covariance_type, sign
):
    tensors = stored_tensors(covariance_type)
    tensors["precisions_cholesky"][DIAGONAL_ENTRY[covariance_type]] *= sign
    metadata = metadata_for(covariance_type)
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata)
    assert_refused(path, "positive diagonal")


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_load_refuses_a_factor_that_is_not_upper_triangular(tmp_path, covariance_type):
    tensors = stored_tensors(covariance_type)
    tensors["precisions_cholesky"][..., 1, 0] = 0.25
    metadata = metadata_for(covariance_type)
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata)
    assert_refused(path, "upper triangular")


@pytest.mark.parametrize(
    ("name", "index", "value"),
    [("means", (1, 1), 3e38), ("precisions_cholesky", (0, 0), 1e20)],
    ids=["huge_mean", "huge_factor"],
)
def test_load_refuses_finite_values_whose_densities_would_overflow(
    tmp_path, name, index, value
):
    tensors = stored_tensors("diag")
    tensors[name][index] = value
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("diag"))
    assert_refused(path, "too large in magnitude for float32")


def test_large_but_realistic_values_round_trip(tmp_path):
    # Unix timestamps in seconds with a spread of days: large, yet harmless.
    tensors = stored_tensors("diag")
    tensors["means"][:, 0] = np.array([1.7e9, 1.71e9, 1.72e9], np.float32)
    tensors["precisions_cholesky"][:, 0] = 1e-5
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata_for("diag"))
    loaded = jaxgmm.load(path)
    np.testing.assert_array_equal(np.asarray(loaded.means), tensors["means"])
    assert np.all(np.isfinite(np.asarray(loaded.log_prob(loaded.means))))


def test_float64_values_beyond_float32_are_refused_when_x64_is_off(tmp_path):
    tensors = {k: v.astype(np.float64) for k, v in stored_tensors("diag").items()}
    tensors["means"][0, 0] = 1e300
    metadata = metadata_for("diag", dtype="float64")
    path = write_tensors(tmp_path / "m.safetensors", tensors, metadata)
    with jax.enable_x64(False):
        assert_refused(path, "`means` contains NaN or infinite")


# -- fuzzing: whatever the bytes, a valid model or ValueError --------------------


@FUZZ_SETTINGS
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_give_a_valid_model_or_value_error(tmp_path, data):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    assert_valid_model_or_value_error(path)


@FUZZ_SETTINGS
@given(header_size=st.integers(0, 700), body=st.binary(max_size=600))
def test_arbitrary_bytes_behind_a_small_length_field_give_a_valid_model_or_value_error(
    tmp_path, header_size, body
):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", header_size) + body)
    assert_valid_model_or_value_error(path)


@FUZZ_SETTINGS
@given(
    covariance_type=st.sampled_from(COVARIANCE_TYPES),
    flips=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=8
    ),
    keep=st.none() | st.floats(0, 1),
)
def test_corrupted_valid_files_give_a_valid_model_or_value_error(
    tmp_path, valid_files, covariance_type, flips, keep
):
    data = bytearray(valid_files[covariance_type])
    for position, mask in flips:
        data[int(position * len(data))] ^= mask
    if keep is not None:
        data = data[: int(keep * len(data))]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(data))
    assert_valid_model_or_value_error(path)


@FUZZ_SETTINGS
@given(
    covariance_type=st.sampled_from(COVARIANCE_TYPES),
    flips=st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_corrupted_tensor_values_give_a_valid_model_or_value_error(
    tmp_path, valid_files, covariance_type, flips
):
    # Flips confined to the tensor data get past every header check, so they
    # exercise the value checks: NaN, signs, weights, triangularity.
    header, tensor_bytes = split_file(valid_files[covariance_type])
    data = bytearray(tensor_bytes)
    for position, mask in flips:
        data[int(position * len(data))] ^= mask
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(join_file(header, bytes(data)))
    assert_valid_model_or_value_error(path)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["F32", "F64", "F16", "I64", "float64", "1", "2", "full"])
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def json_paths(node, prefix=()):
    """Every position in a parsed JSON document, as a tuple of keys/indices."""
    yield prefix
    if isinstance(node, dict):
        children = node.items()
    elif isinstance(node, list):
        children = enumerate(node)
    else:
        return
    for key, child in children:
        yield from json_paths(child, prefix + (key,))


@FUZZ_SETTINGS
@given(
    covariance_type=st.sampled_from(COVARIANCE_TYPES),
    choice=st.data(),
    operation=st.sampled_from(["replace", "delete", "add"]),
    value=json_values,
    small_offset_change=st.integers(-16, 16),
)
def test_edited_headers_give_a_valid_model_or_value_error(
    tmp_path,
    valid_files,
    covariance_type,
    choice,
    operation,
    value,
    small_offset_change,
):
    header, data = split_file(valid_files[covariance_type])
    paths = list(json_paths(header))[1:]
    target = choice.draw(st.sampled_from(paths))
    parent = header
    for key in target[:-1]:
        parent = parent[key]
    last = target[-1]
    if operation == "replace":
        parent[last] = value
    elif operation == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[f"{last}_extra"] = value
    else:
        parent.append(value)
    if operation == "replace" and type(value) is int:
        # Also try near-miss numbers, which get past more of the checks.
        parent[last] = value % 97 + small_offset_change
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(join_file(header, data))
    assert_valid_model_or_value_error(path)
