"""The ``jaxgmm`` command line: ``demo``, ``fit``, ``score``, ``sample``, ``select``.

Every subcommand reads data with :func:`read_data` (CSV with an optional
header line, or ``.npy``), and every problem with a file or an option ends
the program with one ``jaxgmm: error: ...`` line on stderr and exit status 1
(argparse's own usage errors keep its usage message and exit status 2).
JAX and the fitting code are imported only by the subcommands that run, so
``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")
CRITERIA = ("bic", "aic")
DEMO_COMPONENTS = range(1, 7)
DEMO_SEED = 0
# Longest A..B range accepted by --components: each K compiles and fits a model.
MAX_CANDIDATES = 1000


# -- reading data ---------------------------------------------------------------


def read_data(path: str | os.PathLike) -> tuple[np.ndarray, list[str] | None]:
    """Load ``(N, D)`` data and the column names (None without a header).

    The data come back in the dtype jaxgmm computes in: float32, or float64
    with ``JAX_ENABLE_X64``.

    ``.npy`` files are read without pickle; anything else is read as CSV by
    :func:`parse_csv`. Raises ``ValueError`` (or ``OSError``) with a message
    naming the file, and the line or row, of the first problem.
    """
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return _in_model_dtype(_read_npy(path), path), None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text (CSV) file") from None
    array, header = parse_csv(text, str(path))
    return _in_model_dtype(array, path), header


def _in_model_dtype(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` in the dtype jaxgmm will compute in (float32 unless
    ``JAX_ENABLE_X64``); a value too large for it is an error naming its row,
    not an infinity that fails later."""
    import jax

    dtype = jax.dtypes.canonicalize_dtype(np.float64)
    with np.errstate(over="ignore"):
        converted = array.astype(dtype)
    finite = np.all(np.isfinite(converted), axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise ValueError(
            f"{path}: row {row} has a value too large for {np.dtype(dtype)}"
        )
    return converted


def _read_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as file:
        try:
            array = np.lib.format.read_array(file, allow_pickle=False)
        except (ValueError, EOFError) as error:
            message = " ".join(str(error).split())
            raise ValueError(f"{path}: not a valid .npy file ({message})") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{path}: expected a numeric array, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(
            f"{path}: expected a 2-D array (rows, features), got shape {array.shape}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{path}: no data (shape {array.shape})")
    array = array.astype(np.float64)
    finite = np.all(np.isfinite(array), axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise ValueError(f"{path}: row {row} contains NaN or infinite values")
    return array


def parse_csv(text: str, name: str = "<csv>") -> tuple[np.ndarray, list[str] | None]:
    """Parse comma-separated numbers, one row per line, blank lines skipped.

    The first line is a header when it does not parse as numbers. Every row
    must have the same number of values, all finite.
    """
    header = None
    rows: list[list[float]] = []
    width = None
    reader = csv.reader(io.StringIO(text))
    try:
        for fields in reader:
            fields = [field.strip() for field in fields]
            if not any(fields):
                continue
            line = reader.line_num
            try:
                values = [float(field) for field in fields]
            except ValueError:
                if header is None and not rows:
                    header, width = fields, len(fields)
                    continue
                bad = next(field for field in fields if not _is_number(field))
                raise ValueError(
                    f"{name}, line {line}: cannot parse {bad!r} as a number"
                ) from None
            if width is None:
                width = len(values)
            if len(values) != width:
                first = "the header" if header is not None else "the first row"
                raise ValueError(
                    f"{name}, line {line}: {_count(len(values), 'value')} but "
                    f"{first} has {width}"
                )
            if not all(math.isfinite(value) for value in values):
                raise ValueError(f"{name}, line {line}: NaN or infinite value")
            rows.append(values)
    except csv.Error as error:
        raise ValueError(f"{name}, line {reader.line_num}: {error}") from None
    if not rows:
        raise ValueError(f"{name}: no data rows")
    return np.array(rows, dtype=np.float64), header


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def parse_components(spec: str) -> list[int]:
    """The K values of a ``--components`` option, sorted and without repeats.

    ``"1..4"`` gives [1, 2, 3, 4]; ``"2,4,8"`` and ``"1..3,6"`` work too.
    """
    problem = (
        f"--components {spec!r}: expected a range A..B, a comma list such as "
        "2,4,8, or both (1..3,6), of positive integers"
    )
    values: set[int] = set()
    for part in spec.split(","):
        start, dots, stop = part.partition("..")
        try:
            first = int(start)
            last = int(stop) if dots else first
        except ValueError:
            raise ValueError(problem) from None
        if not 1 <= first <= last:
            raise ValueError(problem)
        if last - first >= MAX_CANDIDATES:
            raise ValueError(f"{problem}; a range holds at most {MAX_CANDIDATES}")
        values.update(range(first, last + 1))
    return sorted(values)


def _check_choice(option: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_components_fit_data(components: Sequence[int], n_rows: int) -> None:
    largest = max(components)
    if largest > n_rows:
        raise ValueError(
            f"--components {largest} is more than the {n_rows} data rows; "
            "use fewer components or more data"
        )


def _check_fit_options(args: argparse.Namespace) -> None:
    """The EM options, checked here so the messages name the command-line flags."""
    if args.n_init < 1:
        raise ValueError(f"--n-init must be at least 1, got {args.n_init}")
    if args.max_iter < 1:
        raise ValueError(f"--max-iter must be at least 1, got {args.max_iter}")
    if not args.tol >= 0:
        raise ValueError(f"--tol must be non-negative, got {args.tol}")
    if not args.reg_covar >= 0:
        raise ValueError(f"--reg-covar must be non-negative, got {args.reg_covar}")
    if args.max_condition is not None and not args.max_condition >= 1:
        raise ValueError(
            f"--max-condition must be at least 1, got {args.max_condition}"
        )


def _check_seed(seed: int) -> int:
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {seed}")
    return seed


def _check_features_match(gmm, x: np.ndarray, data: str) -> None:
    if x.shape[1] != gmm.n_features:
        raise ValueError(
            f"{data} has {x.shape[1]} columns but the model has "
            f"{gmm.n_features} features"
        )


# -- writing results --------------------------------------------------------------


def _format_csv(columns: dict[str, np.ndarray]) -> str:
    """CSV text: a header line of the column names, then one line per row."""
    cells = [_format_column(values) for values in columns.values()]
    lines = [",".join(columns)]
    lines.extend(",".join(row) for row in zip(*cells, strict=True))
    return "\n".join(lines) + "\n"


def _format_column(values) -> list[str]:
    # float32 with 9 significant digits and float64 with 17 read back exactly.
    values = np.asarray(values)
    if values.dtype.kind != "f":
        return [str(value) for value in values.tolist()]
    digits = 9 if values.dtype == np.float32 else 17
    return [f"{value:.{digits}g}" for value in values.tolist()]


def _criterion_table(candidates, scores, name: str) -> str:
    scores = np.asarray(scores, dtype=np.float64)
    best = int(np.argmin(np.where(np.isnan(scores), np.inf, scores)))
    lines = [f"{'K':>4}  {name.upper():>14}"]
    for index, (k, score) in enumerate(zip(candidates, scores, strict=True)):
        mark = "  <- best" if index == best else ""
        lines.append(f"{k:>4}  {score:>14.3f}{mark}")
    return "\n".join(lines)


def _describe_gmm(gmm, names: Sequence[str]) -> str:
    weights = np.asarray(gmm.weights, dtype=np.float64)
    means = np.asarray(gmm.means, dtype=np.float64)
    covariances = np.asarray(gmm.full_covariances, dtype=np.float64)
    width = max(len("covariance"), *(len(name) + 2 for name in names))
    header = " " * (width + 2) + "".join(f"{name[:10]:>12}" for name in names)
    lines = []
    for k in range(gmm.n_components):
        if k:
            lines.append("")
        lines.append(f"component {k + 1}: weight {weights[k]:.4f}")
        lines.append(header)
        lines.append(f"  {'mean':<{width}}" + _vector(means[k]))
        lines.append("  covariance")
        for name, row in zip(names, covariances[k], strict=True):
            lines.append(f"    {name:<{width - 2}}" + _vector(row))
    return "\n".join(lines)


def _vector(values) -> str:
    return "".join(f"{value:>12.4f}" for value in values)


def _save_figure(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plots need matplotlib, an optional dependency: pip install 'jaxgmm[plot]'"
        ) from None
    # A bare Figure (no pyplot) draws with Agg and leaves no global state behind.
    return Figure(figsize=(width, height))


# -- subcommands --------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> int:
    import importlib.resources

    import jax

    import jaxgmm

    from ._io import save
    from .plot import plot_criterion, plot_gmm

    text = (
        importlib.resources.files("jaxgmm")
        .joinpath("data", "old_faithful.csv")
        .read_text(encoding="utf-8")
    )
    x, names = parse_csv(text, "old_faithful.csv")
    names = names or [f"x{i}" for i in range(x.shape[1])]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    print(
        f"Old Faithful: {x.shape[0]} eruptions, features {', '.join(names)} (minutes)"
    )
    print(
        f"Fitting full-covariance mixtures for K = {DEMO_COMPONENTS.start}.."
        f"{DEMO_COMPONENTS.stop - 1} and choosing K by BIC (seed {DEMO_SEED})...\n"
    )
    selection = jaxgmm.select_n_components(
        jax.random.key(DEMO_SEED),
        x,
        DEMO_COMPONENTS,
        criterion="bic",
        covariance_type="full",
    )
    result = selection.result
    gmm = result.gmm
    print(_criterion_table(selection.candidates, selection.scores, "bic"))
    print(
        f"\nChosen model: K = {selection.n_components} "
        f"(mean log-likelihood {float(result.log_likelihood):.4f}, "
        f"{int(result.n_iter)} EM iterations)\n"
    )
    print(_describe_gmm(gmm, names))

    model_path = out_dir / "model.safetensors"
    save(model_path, gmm)
    figure = _figure(11.0, 4.5)
    left, right = figure.subplots(1, 2)
    plot_gmm(gmm, x, ax=left)
    left.set_xlabel(f"{names[0]} (minutes)")
    left.set_ylabel(f"{names[1]} (minutes)")
    left.set_title(f"Old Faithful, K = {selection.n_components}")
    plot_criterion(selection.candidates, selection.scores, ax=right)
    right.set_ylabel("BIC (lower is better)")
    right.set_title("Choosing K by BIC")
    figure_path = out_dir / "demo.png"
    _save_figure(figure, figure_path)
    print(f"\nwrote {figure_path}")
    print(f"wrote {model_path}")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    _check_choice("--covariance", args.covariance, COVARIANCE_TYPES)
    _check_seed(args.seed)
    _check_fit_options(args)
    x, _ = read_data(args.data)
    if args.components < 1:
        raise ValueError(f"--components must be at least 1, got {args.components}")
    _check_components_fit_data([args.components], x.shape[0])

    import jax

    import jaxgmm

    from ._io import save

    result = jaxgmm.fit(
        jax.random.key(args.seed),
        x,
        args.components,
        covariance_type=args.covariance,
        max_iter=args.max_iter,
        tol=args.tol,
        reg_covar=args.reg_covar,
        max_condition=args.max_condition,
        n_init=args.n_init,
    )
    save(args.out, result.gmm)
    state = "converged" if bool(result.converged) else "not converged, see --max-iter"
    print(
        f"fitted a {args.components}-component {args.covariance}-covariance mixture "
        f"to {x.shape[0]} rows x {x.shape[1]} features"
    )
    print(f"  mean log-likelihood  {float(result.log_likelihood):.6f}")
    print(f"  EM iterations        {int(result.n_iter)} ({state})")
    print(f"wrote {args.out}")
    return 0


def run_score(args: argparse.Namespace) -> int:
    quantile = args.anomaly_quantile
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ValueError(f"--anomaly-quantile must be in [0, 1], got {quantile}")
    from ._io import load

    gmm = load(args.model)
    x, _ = read_data(args.data)
    _check_features_match(gmm, x, args.data)

    import jaxgmm

    log_prob = gmm.log_prob(x)
    columns = {"log_prob": np.asarray(log_prob)}
    if quantile is not None:
        threshold = jaxgmm.anomaly_threshold(gmm, x, quantile)
        columns["anomaly"] = np.asarray(log_prob < threshold).astype(np.int32)
    sys.stdout.write(_format_csv(columns))
    return 0


def run_sample(args: argparse.Namespace) -> int:
    _check_seed(args.seed)
    if args.n < 0:
        raise ValueError(f"-n must be non-negative, got {args.n}")
    from ._io import load

    gmm = load(args.model)

    import jax

    x, _ = gmm.sample(jax.random.key(args.seed), args.n)
    x = np.asarray(x)
    columns = {f"x{i}": x[:, i] for i in range(gmm.n_features)}
    sys.stdout.write(_format_csv(columns))
    return 0


def run_select(args: argparse.Namespace) -> int:
    _check_choice("--covariance", args.covariance, COVARIANCE_TYPES)
    criterion = _check_choice("--criterion", args.criterion.lower(), CRITERIA)
    _check_seed(args.seed)
    candidates = parse_components(args.components)
    x, _ = read_data(args.data)
    _check_components_fit_data(candidates, x.shape[0])
    figure = _figure(6.0, 4.5) if args.plot else None

    import jax

    import jaxgmm

    selection = jaxgmm.select_n_components(
        jax.random.key(args.seed),
        x,
        candidates,
        criterion=criterion,
        covariance_type=args.covariance,
    )
    print(_criterion_table(selection.candidates, selection.scores, criterion))
    print(f"best: K = {selection.n_components} (lowest {criterion.upper()})")
    if args.out:
        from ._io import save

        save(args.out, selection.result.gmm)
        print(f"wrote {args.out}")
    if figure is not None:
        from .plot import plot_criterion

        ax = figure.subplots()
        plot_criterion(selection.candidates, selection.scores, ax=ax)
        ax.set_ylabel(f"{criterion.upper()} (lower is better)")
        _save_figure(figure, Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


# -- the parser ----------------------------------------------------------------------

_DATA_HELP = (
    "data file: CSV of numbers, one row per line (a first line that is not "
    "numbers is a header), or a 2-D .npy array"
)
_COVARIANCE_HELP = (
    f"covariance type: one of {', '.join(COVARIANCE_TYPES)} (default: %(default)s)"
)
_SEED_HELP = "integer seed of the random initialisation (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``jaxgmm`` command."""
    parser = argparse.ArgumentParser(
        prog="jaxgmm",
        description="Gaussian mixture models in JAX, from the command line.",
        epilog=(
            "examples:\n"
            "  jaxgmm demo\n"
            "  jaxgmm fit data.csv --components 3 --out model.safetensors\n"
            "  jaxgmm score model.safetensors data.csv --anomaly-quantile 0.01\n"
            "  jaxgmm sample model.safetensors -n 1000 > samples.csv\n"
            "  jaxgmm select data.csv --components 1..10 --plot bic.png\n\n"
            "Run 'jaxgmm COMMAND --help' for the options of each command. "
            "Errors print one line on stderr and exit with status 1."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", required=True
    )

    demo = commands.add_parser(
        "demo",
        help="fit the bundled Old Faithful data, choose K by BIC, plot and save",
        description=(
            "Fit full-covariance mixtures with K = 1..6 to the bundled Old "
            "Faithful geyser data (272 eruptions: duration and waiting time), "
            "choose K by BIC, print the chosen model and the BIC table, and "
            "write DIR/demo.png (the fit and the BIC curve) and "
            "DIR/model.safetensors."
        ),
    )
    demo.add_argument(
        "--out-dir",
        default="jaxgmm-demo",
        metavar="DIR",
        help=(
            "directory for demo.png and model.safetensors, created if missing "
            "(default: %(default)s)"
        ),
    )
    demo.set_defaults(run=run_demo)

    fit = commands.add_parser(
        "fit",
        help="fit a mixture to data by EM and save it",
        description=(
            "Fit a Gaussian mixture to DATA by expectation-maximisation and save "
            "it as safetensors; prints the mean log-likelihood, the number of "
            "EM iterations and whether they converged."
        ),
    )
    fit.add_argument("data", metavar="DATA", help=_DATA_HELP)
    fit.add_argument(
        "-k",
        "--components",
        type=int,
        required=True,
        metavar="K",
        help="number of mixture components (required)",
    )
    fit.add_argument(
        "--covariance", default="full", metavar="TYPE", help=_COVARIANCE_HELP
    )
    fit.add_argument(
        "--max-condition",
        type=float,
        default=None,
        metavar="C",
        help="cap on the condition number of each covariance (default: no cap)",
    )
    fit.add_argument(
        "--n-init",
        type=int,
        default=1,
        metavar="N",
        help=(
            "EM runs from different initialisations; the best is kept "
            "(default: %(default)s)"
        ),
    )
    fit.add_argument("--seed", type=int, default=0, metavar="S", help=_SEED_HELP)
    fit.add_argument(
        "--max-iter",
        type=int,
        default=100,
        metavar="M",
        help="maximum EM iterations (default: %(default)s)",
    )
    fit.add_argument(
        "--tol",
        type=float,
        default=1e-3,
        metavar="T",
        help=(
            "stop when the mean log-likelihood changes by less than T "
            "(default: %(default)s)"
        ),
    )
    fit.add_argument(
        "--reg-covar",
        type=float,
        default=1e-6,
        metavar="R",
        help="added to the diagonal of every covariance (default: %(default)s)",
    )
    fit.add_argument(
        "-o",
        "--out",
        required=True,
        metavar="MODEL",
        help="where to write the fitted model, a .safetensors file (required)",
    )
    fit.set_defaults(run=run_fit)

    score = commands.add_parser(
        "score",
        help="log density of each data row under a saved model (CSV on stdout)",
        description=(
            "Write CSV to stdout: a header line, then one row per row of DATA "
            "with its log density under MODEL (column log_prob) and, with "
            "--anomaly-quantile Q, a column anomaly that is 1 for the rows whose "
            "log density is below the Q-quantile of the log densities of DATA "
            "and 0 otherwise."
        ),
    )
    score.add_argument("model", metavar="MODEL", help="a model saved by 'jaxgmm fit'")
    score.add_argument("data", metavar="DATA", help=_DATA_HELP)
    score.add_argument(
        "--anomaly-quantile",
        type=float,
        default=None,
        metavar="Q",
        help="flag the fraction Q (in [0, 1]) of rows of lowest density as anomalies",
    )
    score.set_defaults(run=run_score)

    sample = commands.add_parser(
        "sample",
        help="draw samples from a saved model (CSV on stdout)",
        description=(
            "Write CSV to stdout: a header line x0,x1,... then N rows drawn from MODEL."
        ),
    )
    sample.add_argument("model", metavar="MODEL", help="a model saved by 'jaxgmm fit'")
    sample.add_argument(
        "-n",
        type=int,
        required=True,
        metavar="N",
        help="number of samples to draw (required)",
    )
    sample.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="integer seed of the random draws (default: %(default)s)",
    )
    sample.set_defaults(run=run_sample)

    select = commands.add_parser(
        "select",
        help="choose the number of components by BIC or AIC",
        description=(
            "Fit one mixture for each K and print the criterion for each, the "
            "best (lowest) one marked."
        ),
    )
    select.add_argument("data", metavar="DATA", help=_DATA_HELP)
    select.add_argument(
        "-k",
        "--components",
        default="1..10",
        metavar="SPEC",
        help=(
            "the K values to try: a range A..B, a comma list 2,4,8, or both "
            "(default: %(default)s)"
        ),
    )
    select.add_argument(
        "--criterion",
        default="bic",
        metavar="NAME",
        help=(
            f"model-selection criterion, one of {', '.join(CRITERIA)} "
            "(default: %(default)s)"
        ),
    )
    select.add_argument(
        "--covariance", default="full", metavar="TYPE", help=_COVARIANCE_HELP
    )
    select.add_argument("--seed", type=int, default=0, metavar="S", help=_SEED_HELP)
    select.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="also draw the criterion against K to this image file (needs matplotlib)",
    )
    select.add_argument(
        "-o",
        "--out",
        default=None,
        metavar="MODEL",
        help="also save the best model to this file (.safetensors)",
    )
    select.set_defaults(run=run_select)
    return parser


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and error.filename:
        message = f"{error.filename}: {error.strerror}"
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jaxgmm`` command with ``argv`` (``sys.argv[1:]`` when None).

    Returns the exit status: 0 on success, 1 for a bad file or option (one
    ``jaxgmm: error: ...`` line on stderr), 2 for argparse usage errors.

    Example:
        >>> from jaxgmm._cli import main
        >>> main(["fit", "x.csv", "-k", "3", "-o", "m.safetensors"])  # doctest: +SKIP
        0
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader of stdout went away (`jaxgmm sample ... | head`): stop quietly,
        # and keep Python from complaining again when it flushes stdout at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except (ValueError, OSError, ImportError) as error:
        print(f"jaxgmm: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
