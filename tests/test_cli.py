"""The ``jaxgmm`` command line, run in-process through ``main``.

Every data set here has Old Faithful's shape (272 rows, 2 features), so the
fits the demo compiles are reused by ``fit`` and ``select``: JAX compilation,
not EM, is what costs time.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import io
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxgmm
from jaxgmm._cli import build_parser, main, parse_components, parse_csv
from jaxgmm._io import load

N_ROWS = 272


def run(argv):
    """``main(argv)`` with stdout and stderr captured: (status, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def read_csv_output(text):
    header, *rows = text.strip("\n").split("\n")
    values = np.array([[float(v) for v in row.split(",")] for row in rows])
    return header.split(","), values.reshape(len(rows), -1)


@pytest.fixture(scope="module")
def x():
    """Two well separated blobs, exactly representable in float32."""
    rng = np.random.default_rng(0)
    blobs = np.concatenate(
        [
            rng.normal([0.0, 0.0], [1.0, 0.5], (N_ROWS // 2, 2)),
            rng.normal([6.0, 4.0], [0.7, 1.2], (N_ROWS // 2, 2)),
        ]
    )
    return blobs.astype(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def files(tmp_path_factory, x):
    directory = tmp_path_factory.mktemp("cli")
    csv_path = directory / "data.csv"
    rows = "\n".join(",".join(repr(v) for v in row) for row in x.tolist())
    csv_path.write_text("first,second\n" + rows + "\n")
    npy_path = directory / "data.npy"
    np.save(npy_path, x)
    return {"dir": directory, "csv": csv_path, "npy": npy_path}


@pytest.fixture(scope="module")
def model(files):
    path = files["dir"] / "model.safetensors"
    status, out, err = run(
        ["fit", str(files["csv"]), "--components", "2", "--out", str(path)]
    )
    assert status == 0, err
    return path, out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("demo") / "nested" / "out"
    status, out, err = run(["demo", "--out-dir", str(out_dir)])
    assert status == 0, err
    return out_dir, out


@pytest.fixture(scope="module")
def old_faithful():
    text = (
        importlib.resources.files("jaxgmm")
        .joinpath("data", "old_faithful.csv")
        .read_text()
    )
    return parse_csv(text)[0]


# -- demo ---------------------------------------------------------------------


def test_demo_writes_the_figure_and_the_model(demo):
    out_dir, out = demo
    assert (out_dir / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "model.safetensors").stat().st_size > 0
    assert str(out_dir / "demo.png") in out
    assert str(out_dir / "model.safetensors") in out


def test_demo_chooses_two_or_three_components_for_old_faithful(demo):
    out_dir, out = demo
    chosen = int(re.search(r"Chosen model: K = (\d+)", out).group(1))
    assert chosen in (2, 3)
    assert load(out_dir / "model.safetensors").n_components == chosen


def test_demo_prints_the_bic_table_with_the_chosen_k_marked(demo):
    _, out = demo
    chosen = re.search(r"Chosen model: K = (\d+)", out).group(1)
    table = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    assert [row[0] for row in table] == [str(k) for k in range(1, 7)]
    scores = [float(row[1]) for row in table]
    marked = [row[0] for row in table if "<-" in row]
    assert marked == [chosen]
    assert scores[int(chosen) - 1] == min(scores)


def test_demo_model_is_the_library_fit_and_its_parameters_are_printed(
    demo, old_faithful
):
    out_dir, out = demo
    saved = load(out_dir / "model.safetensors")
    expected = jaxgmm.fit(jax.random.key(0), old_faithful, saved.n_components).gmm
    np.testing.assert_allclose(
        saved.log_prob(old_faithful), expected.log_prob(old_faithful), rtol=1e-6
    )
    for weight in np.asarray(saved.weights):
        assert f"weight {weight:.4f}" in out
    bic = float(jaxgmm.bic(saved, old_faithful))
    assert f"{bic:.3f}  <- best" in out


# -- fit, score, sample -----------------------------------------------------------


def test_fit_prints_a_summary_and_saves_a_model(model):
    path, out = model
    assert "mean log-likelihood" in out
    assert "EM iterations" in out and "converged" in out
    assert str(path) in out
    assert load(path).n_components == 2


def test_fit_from_npy_gives_the_same_model_as_from_csv(files, model, capsys):
    path = files["dir"] / "from_npy.safetensors"
    assert main(["fit", str(files["npy"]), "-k", "2", "-o", str(path)]) == 0
    from_csv, from_npy = load(model[0]), load(path)
    np.testing.assert_array_equal(from_csv.means, from_npy.means)
    np.testing.assert_array_equal(from_csv.covariances, from_npy.covariances)


def test_fit_passes_its_options_to_the_library(files, x, capsys):
    path = files["dir"] / "diag.safetensors"
    argv = ["fit", str(files["csv"]), "-k", "2", "--covariance", "diag"]
    argv += ["--max-iter", "3", "--tol", "0", "--seed", "5", "-o", str(path)]
    assert main(argv) == 0
    assert "3 (not converged" in capsys.readouterr().out
    expected = jaxgmm.fit(
        jax.random.key(5), x, 2, covariance_type="diag", max_iter=3, tol=0.0
    )
    saved = load(path)
    assert saved.covariance_type == "diag"
    np.testing.assert_allclose(saved.means, expected.gmm.means, rtol=1e-6)


@pytest.mark.parametrize("kind", ["csv", "npy"])
def test_score_prints_the_log_density_of_every_row(files, model, x, kind, capsys):
    assert main(["score", str(model[0]), str(files[kind])]) == 0
    columns, values = read_csv_output(capsys.readouterr().out)
    assert columns == ["log_prob"]
    assert values.shape == (N_ROWS, 1)
    np.testing.assert_allclose(values[:, 0], load(model[0]).log_prob(x), rtol=1e-6)


def test_score_flags_the_requested_fraction_of_lowest_density_rows(
    files, model, x, capsys
):
    argv = ["score", str(model[0]), str(files["csv"]), "--anomaly-quantile", "0.1"]
    assert main(argv) == 0
    columns, values = read_csv_output(capsys.readouterr().out)
    assert columns == ["log_prob", "anomaly"]
    log_prob, anomaly = values[:, 0], values[:, 1]
    assert set(anomaly) <= {0.0, 1.0}
    assert abs(anomaly.mean() - 0.1) <= 1.5 / N_ROWS
    assert log_prob[anomaly == 1].max() < log_prob[anomaly == 0].min()
    threshold = jaxgmm.anomaly_threshold(load(model[0]), x, 0.1)
    np.testing.assert_array_equal(anomaly == 1, log_prob < float(threshold))


def test_sample_prints_n_rows_of_d_values_after_a_header(model, capsys):
    assert main(["sample", str(model[0]), "-n", "57", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    columns, values = read_csv_output(first)
    assert columns == ["x0", "x1"]
    assert values.shape == (57, 2)
    assert np.all(np.isfinite(values))
    assert main(["sample", str(model[0]), "-n", "57", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first
    assert main(["sample", str(model[0]), "-n", "57", "--seed", "4"]) == 0
    assert capsys.readouterr().out != first


def test_sample_matches_the_model_sample(model, capsys):
    assert main(["sample", str(model[0]), "-n", "10", "--seed", "7"]) == 0
    _, values = read_csv_output(capsys.readouterr().out)
    expected, _ = load(model[0]).sample(jax.random.key(7), 10)
    np.testing.assert_allclose(values, expected, rtol=1e-6)


def test_sample_of_zero_rows_prints_only_the_header(model, capsys):
    assert main(["sample", str(model[0]), "-n", "0"]) == 0
    assert capsys.readouterr().out == "x0,x1\n"


# -- select -----------------------------------------------------------------------


def select_table(out):
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s", line)]
    return [int(r[0]) for r in rows], [float(r[1]) for r in rows], rows


def test_select_prints_the_criterion_for_each_k_and_marks_the_minimum(files, x, capsys):
    assert main(["select", str(files["csv"]), "--components", "1..3"]) == 0
    out = capsys.readouterr().out
    candidates, scores, rows = select_table(out)
    assert candidates == [1, 2, 3]
    best = int(np.argmin(scores))
    assert [r[0] for r in rows if "<-" in r] == [str(candidates[best])]
    assert candidates[best] == 2
    assert "best: K = 2" in out
    expected = jaxgmm.select_n_components(jax.random.key(0), x, range(1, 4))
    np.testing.assert_allclose(scores, expected.scores, atol=1e-3, rtol=1e-6)


def test_select_with_aic_a_comma_list_a_plot_and_a_saved_model(files, capsys):
    image = files["dir"] / "aic.png"
    best = files["dir"] / "best.safetensors"
    argv = ["select", str(files["npy"]), "--components", "1,3", "--criterion", "aic"]
    assert main(argv + ["--plot", str(image), "--out", str(best)]) == 0
    out = capsys.readouterr().out
    candidates, scores, _ = select_table(out)
    assert candidates == [1, 3]
    assert "AIC" in out
    assert image.read_bytes()[:4] == b"\x89PNG"
    assert load(best).n_components == candidates[int(np.argmin(scores))]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("1..4", [1, 2, 3, 4]),
        ("2,4,8", [2, 4, 8]),
        ("1..3,6", [1, 2, 3, 6]),
        ("5", [5]),
        (" 3 , 1..2 ", [1, 2, 3]),
        ("2..2", [2]),
    ],
)
def test_components_accepts_ranges_and_comma_lists(spec, expected):
    assert parse_components(spec) == expected


# -- data files ---------------------------------------------------------------------


def test_csv_header_is_detected_and_optional():
    with_header, names = parse_csv("a, b\n1,2\n3,4e1\n\n")
    without_header, no_names = parse_csv("1,2\n3,40\n")
    assert names == ["a", "b"] and no_names is None
    np.testing.assert_array_equal(with_header, without_header)


# -- errors -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(files):
    directory = files["dir"] / "bad"
    directory.mkdir()
    texts = {
        "unparsable.csv": "a,b\n1,2\nx,3\n",
        "ragged.csv": "1,2\n3,4\n5\n",
        "nan.csv": "a,b\n1,2\nnan,3\n",
        "infinite.csv": "1,2\n3,inf\n",
        # Finite as parsed (float64), infinite in float32.
        "too_large.csv": "1,2\n3,1e300\n5,6\n",
        "empty.csv": "",
        "header_only.csv": "a,b\n",
        "three_rows.csv": "1,2\n3,4\n5,6\n",
        "three_columns.csv": "1,2,3\n4,5,6\n",
        "garbage.npy": "this is not a numpy file",
        "garbage.safetensors": "this is not a model",
        "binary.csv": "",
    }
    for name, text in texts.items():
        (directory / name).write_text(text)
    (directory / "binary.csv").write_bytes(b"\xff\xfe\x00\x81\x90")
    np.save(directory / "vector.npy", np.arange(5.0))
    np.save(directory / "nan.npy", np.array([[1.0, 2.0], [np.nan, 1.0]]))
    np.save(directory / "strings.npy", np.array([["a", "b"]]))
    return directory


FIT = "fit {csv} -k 2 -o {out} "
BAD_ARGUMENTS = {
    "missing data file": "fit {bad}/missing.csv -k 2 -o {out}",
    "data is a directory": "fit {bad} -k 2 -o {out}",
    "unparsable csv": "fit {bad}/unparsable.csv -k 1 -o {out}",
    "ragged rows": "fit {bad}/ragged.csv -k 1 -o {out}",
    "nan in csv": "fit {bad}/nan.csv -k 1 -o {out}",
    "infinity in csv": "fit {bad}/infinite.csv -k 1 -o {out}",
    "empty csv": "fit {bad}/empty.csv -k 1 -o {out}",
    "header only": "fit {bad}/header_only.csv -k 1 -o {out}",
    "not utf-8": "fit {bad}/binary.csv -k 1 -o {out}",
    "not a npy file": "fit {bad}/garbage.npy -k 1 -o {out}",
    "1-d npy": "fit {bad}/vector.npy -k 1 -o {out}",
    "nan in npy": "fit {bad}/nan.npy -k 1 -o {out}",
    "too large for float32": "fit {bad}/too_large.csv -k 1 -o {out}",
    "scoring data too large for float32": "score {model} {bad}/too_large.csv",
    "regularisation too large for float32": FIT + "--reg-covar 1e300",
    "strings in npy": "fit {bad}/strings.npy -k 1 -o {out}",
    "more components than rows": "fit {bad}/three_rows.csv -k 4 -o {out}",
    "zero components": "fit {csv} -k 0 -o {out}",
    "unknown covariance type": FIT + "--covariance banana",
    "negative seed": FIT + "--seed -1",
    "max condition below one": FIT + "--max-condition 0.5",
    "zero restarts": FIT + "--n-init 0",
    "negative tolerance": FIT + "--tol -1",
    "unwritable output": "fit {csv} -k 2 -o {bad}/no/such/dir/m.safetensors",
    "missing model": "score {bad}/missing.safetensors {csv}",
    "corrupt model": "score {bad}/garbage.safetensors {csv}",
    "wrong feature count": "score {model} {bad}/three_columns.csv",
    "anomaly quantile above one": "score {model} {csv} --anomaly-quantile 1.5",
    "negative sample count": "sample {model} -n -1",
    "sample from a corrupt model": "sample {bad}/garbage.safetensors -n 3",
    "reversed range": "select {csv} --components 3..1",
    "range of words": "select {csv} --components 1..x",
    "empty range": "select {csv} --components {empty}",
    "zero in range": "select {csv} --components 0..2",
    "dangling comma": "select {csv} --components 1,",
    "three dots": "select {csv} --components 1...3",
    "range beyond the rows": "select {bad}/three_rows.csv --components 1..5",
    "unknown criterion": "select {csv} --criterion dic",
    "unknown covariance in select": "select {csv} --covariance round",
}


@pytest.mark.parametrize("command", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_input_prints_one_error_line_and_fails(
    command, bad_files, files, model, capsys
):
    fields = {
        "bad": bad_files,
        "csv": files["csv"],
        "model": model[0],
        "out": files["dir"] / "unused.safetensors",
        "empty": "",
    }
    status = main([arg.format(**fields) for arg in command.split(" ")])
    out, err = capsys.readouterr()
    assert status != 0
    assert out == ""
    assert err.startswith("jaxgmm: error: ")
    assert err.endswith("\n") and err.count("\n") == 1
    assert "Traceback" not in err


def test_usage_errors_exit_with_status_two(capsys):
    for argv in ([], ["fit"], ["sample", "m.safetensors"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "usage: jaxgmm" in capsys.readouterr().err


def subcommands():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    return commands.choices


@pytest.mark.parametrize("command", ["demo", "fit", "score", "sample", "select"])
def test_each_subcommand_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in subcommands()[command]._actions:
        for option in action.option_strings:
            assert option in text
        if not action.option_strings:
            assert action.metavar in text
        assert action.help


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in subcommands():
        assert command in text


def test_console_script_is_installed_and_prints_help():
    script = Path(sys.executable).with_name("jaxgmm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jaxgmm"]
    completed = subprocess.run(
        command + ["--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: jaxgmm")
    assert completed.stderr == ""
