"""Command line: parse arguments, call the library, print, write, exit. Nothing else.

Exit codes: 0 pass, 1 diverged (and nothing else), 2 error that the user can fix (bad
input or arguments, a model onnxruntime cannot load, an output that cannot be written,
not enough memory), 3 internal error (a bug in layerdiff), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
import webbrowser
from pathlib import Path

from . import files, options
from .errors import LayerdiffError, UsageError, first_line

EXPORTERS = ("dynamo", "legacy")
ORT_LEVELS = ("disable", "basic", "extended", "all")
EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 3, 130
BUG_HINT = ("this is a bug in layerdiff: rerun with --verbose for the traceback and report it "
            "with the command line (README, 'Reporting a bug')")


class _Parser(argparse.ArgumentParser):
    """argparse, with the error line every other layerdiff error has, and a hint."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {_printable(message)}", file=sys.stderr)
        print(f"hint: run '{self.prog} --help' for the options", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)

    def _get_values(self, action, arg_strings):  # type: ignore[override]
        # argparse before Python 3.12 drops a "--" given as an option's value
        # ("--seed=--") and hands the option an empty list instead of an error.
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected one value, "
                       "not '--'")
        return super()._get_values(action, arg_strings)


def build_parser(parser_class: type[argparse.ArgumentParser] = _Parser) -> argparse.ArgumentParser:
    parser = parser_class(
        prog="layerdiff",
        description="Find the first layer where an ONNX export disagrees with its PyTorch model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    report = sub.add_parser(
        "report", help="diagnose a model and write an HTML report",
        description="Compare a PyTorch model with its ONNX export layer by layer.",
    )
    _add_shared(report)
    report.add_argument("--onnx", metavar="FILE", help="diagnose this ONNX file instead of exporting")
    report.add_argument("--exporter", choices=EXPORTERS, default="dynamo",
                        help="exporter used when --onnx is not given (default: dynamo; "
                             "falls back to the other if it fails)")
    report.add_argument("--fp16", action="store_true",
                        help="compare the fp32 PyTorch model with a float16 ONNX: the --onnx file "
                             "(converted if it is fp32) or one layerdiff makes")
    report.add_argument("--fp16-method", choices=("convert", "half"), default="convert",
                        help="how to make the float16 model: onnxconverter-common conversion "
                             "(as neosr) or model.half() then export (as chaiNNer); default convert")
    report.add_argument("--fix-fp16", metavar="OUT.onnx",
                        help="write a mixed-precision ONNX keeping the layers that need float32, "
                             "and check it")
    report.add_argument("--ignore-layer", action="append", default=[], metavar="PATTERN",
                        help="glob over module paths and ONNX node names, or op:TYPE "
                             "(e.g. 'body.*.upconv', 'op:Resize'); repeatable")
    report.add_argument("-o", "--output", metavar="PATH",
                        help="HTML report path (default: layerdiff_report/<model>.html); "
                             "an export goes into the same folder")
    report.add_argument("--open", action="store_true", help="open the report in a browser")

    convert = sub.add_parser(
        "convert", help="export a model to ONNX, written only when layerdiff verifies it",
        description="Export MODEL to ONNX, diagnose the file layer by layer (several inputs, "
                    "another size, every output) and write it only when it matches.",
    )
    _add_shared(convert)
    convert.add_argument("-o", "--output", metavar="OUT.onnx", required=True,
                         help="the ONNX file to write (only when it verifies, unless --force)")
    convert.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                         help="fp16: onnxconverter-common conversion with fp32 inputs and outputs, "
                              "or model.half() exported when that does not verify; bf16: "
                              "model.bfloat16() with fp32 inputs and outputs, opset >= 22 "
                              "(default fp32)")
    convert.add_argument("--exporter", choices=("auto", *EXPORTERS), default="auto",
                         help="auto: dynamo, then legacy if it fails (default); or only that one")
    convert.add_argument("--static", metavar="H,W", type=_static,
                         help="export at this height and width with no free axis (default: "
                              "batch, height and width free)")
    convert.add_argument("--optimize", choices=("onnxslim", "ort"),
                         help="optimise the verified file (onnxslim, or onnxruntime's offline "
                              "'basic' level) and verify it again; kept only when it verifies")
    convert.add_argument("--no-verify", action="store_true",
                         help="write without checking; the file's metadata says it was not verified")
    convert.add_argument("--force", action="store_true",
                         help="write the file even when it does not verify, marked as failed")
    convert.add_argument("--report", metavar="PATH",
                         help="HTML report path (default: <OUT stem>.html next to OUT)")
    sweep = sub.add_parser(
        "sweep", allow_abbrev=False,
        help="report (or convert) every model of a folder or manifest, with an index",
        description="Run 'report' (or 'convert') on every model of SOURCE, a folder of model "
                    "files (with <stem>.onnx beside them when there is one) or a manifest "
                    "(.json, .csv, .yaml), each in its own process, and write OUTDIR/<entry>/ "
                    "and OUTDIR/index.html. Other options, after SOURCE, go to every entry's "
                    "report or convert (see 'layerdiff report --help').",
    )
    sweep.add_argument("source", metavar="SOURCE", help="folder of model files, or a manifest")
    sweep.add_argument("-o", "--output", metavar="OUTDIR", required=True,
                       help="folder of the results: OUTDIR/<entry>/ and OUTDIR/index.html")
    sweep.add_argument("--convert", action="store_true",
                       help="run 'convert' on each model instead of 'report'")
    sweep.add_argument("--workers", type=int, metavar="N",
                       help="entries run at once on this machine (default: by cores and "
                            "available memory over --max-memory)")
    sweep.add_argument("--cluster", metavar="ADDRESS",
                       help="run the entries on the Dask cluster whose scheduler is at ADDRESS "
                            "(tcp://host:8786); needs layerdiff[cluster]")
    sweep.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                       help="stop an entry after this long and record it as an error "
                            "(default 3600; 0 for none)")
    sweep.add_argument("--retry-failed", action="store_true",
                       help="run again the entries that errored in an earlier sweep")
    sweep.add_argument("--max-memory", metavar="SIZE", type=_bytes,
                       help="memory each entry may use, passed to its report and used to place "
                            "it (default: report's default here; 4G with --cluster)")
    sweep.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    sweep.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")

    explain = sub.add_parser(
        "align", help="print how PyTorch modules pair with ONNX tensors",
        description="Print the pairing table: which ONNX tensor each module call was paired "
                    "with, how (scope names, weights, structure, fused), and why the rest were not.",
    )
    explain.add_argument("model", metavar="MODEL")
    explain.add_argument("--onnx", metavar="FILE", required=True)
    explain.add_argument("--weights", metavar="FILE")
    explain.add_argument("--input-shape", metavar="[NAME:]DIMS", type=_shape, action="append")
    explain.add_argument("--input-range", metavar="NAME:LOW,HIGH", type=_range, action="append",
                         default=[])
    explain.add_argument("--trust-pickle", action="store_true")
    explain.add_argument("-v", "--verbose", action="store_true")
    return parser


def _add_shared(parser: argparse.ArgumentParser) -> None:
    """The model and the diagnosis's options, the same for `report` and `convert`."""
    parser.add_argument("model", metavar="MODEL",
                        help=".pth/.pt/.ckpt/.safetensors state dict (spandrel), TorchScript "
                             "archive, or Python entry point file.py:NAME / package.module:NAME "
                             "(runs that code)")
    parser.add_argument("--weights", metavar="FILE",
                        help="state dict loaded into the entry point's module (tensors only)")
    parser.add_argument("--opset", type=int, metavar="N", help="ONNX opset for the export")
    parser.add_argument("--input-shape", metavar="[NAME:]DIMS", type=_shape, action="append",
                        help="shape of an input: N,C,H,W for the image (default 1,<model "
                             "channels>,64,64), or NAME:D0,D1,... for any named input; repeatable")
    parser.add_argument("--input-range", metavar="NAME:LOW,HIGH", type=_range, action="append",
                        default=[],
                        help="draw input NAME's values from [LOW, HIGH), e.g. input_ids:0,30522 "
                             "(integers for integer inputs); repeatable")
    parser.add_argument("--input-data", metavar="FILE.npz",
                        help="also run real values for every input: an .npz of arrays named "
                             "after the inputs (np.savez)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    parser.add_argument("--samples", type=int, default=1, metavar="N",
                        help="run N random inputs (seeds SEED..SEED+N-1); each layer keeps its worst")
    parser.add_argument("--input", action="append", default=[], metavar="FILE", dest="inputs",
                        help="also run this image (PNG/JPEG/...) or .npy tensor for the image "
                             "input; repeatable")
    parser.add_argument("--no-photo", dest="photo", action="store_false",
                        help="do not run the bundled photo as an input (an image model given "
                             "no --input or --input-data runs it by default)")
    parser.add_argument("--check-sizes", nargs="+", metavar="SIZE", type=_size,
                        help="also run at these sizes of the inputs' free axes: H,W for images, "
                             "a length for sequences (default: one odd size near the main one "
                             "when the ONNX takes any); 'none' for no other size")
    parser.add_argument("--reference", choices=("float64", "none"), default="float64",
                        help="run PyTorch in float64 too, to measure each layer's fp32 noise "
                             "floor and say which side is off (default: float64)")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default 1e-3; fp16: 1e-2)")
    parser.add_argument("--atol", type=float, help="absolute tolerance (default 1e-5; fp16: 1e-3)")
    parser.add_argument("--json", metavar="PATH", help="also write the diagnosis as JSON")
    parser.add_argument("--model-explorer", metavar="DIR",
                        help="also write Model Explorer node data for the ONNX graph into DIR "
                             "(total_error.json, own_error.json, status.json) and print the "
                             "command that opens them")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow loading a fully pickled model (runs code from the file)")
    parser.add_argument("--ort-level", choices=ORT_LEVELS, default="all",
                        help="onnxruntime graph optimisation level to check (default: all)")
    parser.add_argument("--ort-config", action="append", default=[], metavar="KEY=VALUE",
                        type=_config_entry,
                        help="onnxruntime session config entry you deploy with, e.g. "
                             "optimization.enable_gelu_approximation=1; repeatable")
    parser.add_argument("--provider", action="append", metavar="NAME",
                        help="runtime to run the ONNX model on: an onnxruntime execution "
                             "provider (CPUExecutionProvider, CUDAExecutionProvider, ...; "
                             "cpu, cuda, tensorrt, dml), OpenVINO's own runtime (openvino, "
                             "openvino-fp32), or all; repeatable: each is diagnosed and the "
                             "report shows where they disagree (default: "
                             "CPUExecutionProvider)")
    parser.add_argument("--max-memory", metavar="SIZE", type=_bytes,
                        help="memory the diagnosis may use, e.g. 6G or 512M (default: 4G, or "
                             "half the available memory when less); activations beyond it go "
                             "to a temporary folder (TMPDIR) and the ONNX graph runs in "
                             "segments; a peak above it is reported")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the verdict line")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and exporter output")


def _static(text: str) -> tuple[int, int]:
    try:
        height, width = (int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 256,256 (H,W)") from None
    if min(height, width) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 256,256 (H,W > 0)")
    return height, width


def _shape(text: str) -> tuple[str | None, tuple[int, ...]]:
    """``N,C,H,W`` (the image input) or ``NAME:D0,D1,...`` (any input)."""
    name, sep, dims_text = text.rpartition(":")
    name = name.strip() if sep else None
    example = "1,3,64,64 (N,C,H,W) or NAME:1,16"
    try:
        dims = tuple(int(part) for part in dims_text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like {example}") from None
    if sep and not name:
        raise argparse.ArgumentTypeError(f"'{text}' has no input name before ':'")
    if (name is None and len(dims) != 4) or not dims or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a shape like {example} "
                                         "(every dimension > 0)")
    return name, dims


def _range(text: str) -> tuple[str, tuple[float, float]]:
    name, sep, bounds = text.rpartition(":")
    try:
        low, high = (float(part) for part in bounds.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME:LOW,HIGH like input_ids:0,30522") from None
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"'{text}' has no input name: NAME:LOW,HIGH")
    return name.strip(), (low, high)


def _size(text: str) -> tuple[int, ...] | None:
    if text.lower() == "none":
        return None
    try:
        size = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 48,80 (H,W) or 23 "
                                         "(a length)") from None
    if len(size) > 2 or min(size) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 48,80 (H,W) or 23")
    return size


def _shapes(given: list | None) -> dict[str | None, tuple[int, ...]] | None:
    """Repeated --input-shape as shapes by input name (None: the plain N,C,H,W)."""
    if not given:
        return None
    shapes: dict[str | None, tuple[int, ...]] = {}
    for name, dims in given:
        if name in shapes:
            raise UsageError(f"--input-shape given twice for {name or 'the image input'}",
                             hint="give each input's shape once")
        shapes[name] = dims
    return shapes


def _bytes(text: str) -> int:
    from .store import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _config_entry(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"'{text}' is not KEY=VALUE")
    return key.strip(), value.strip()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse's own exits raise SystemExit)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        parser = build_parser()
        # sweep passes the options it does not know to every entry's report or convert
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "sweep":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.passthrough = extra
        if not args.verbose:
            warnings.filterwarnings("ignore")
        handler = {"align": _align, "report": _report, "convert": _convert,
                   "sweep": _sweep}[args.command]
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - every failure ends in one line and an exit code
        if verbose:
            traceback.print_exc()
        error = exc if isinstance(exc, LayerdiffError) else _environment_error(exc)
        if error is None:
            print(f"error: internal error: {type(exc).__name__}: {_printable(first_line(exc))}",
                  file=sys.stderr)
            print(f"hint: {BUG_HINT}", file=sys.stderr)
            return EXIT_BUG
        print(f"error: {_printable(error.message)}", file=sys.stderr)
        if error.hint:
            print(f"hint: {_printable(error.hint)}", file=sys.stderr)
        return EXIT_ERROR


def _printable(text: str) -> str:
    """One line, whatever a path or argument held: control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _environment_error(exc: Exception) -> LayerdiffError | None:
    """Failures of the machine rather than of layerdiff: a file that cannot be written or
    read, a full disk, memory that cannot be allocated. None for anything else (a bug)."""
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return LayerdiffError(f"cannot use{where}: {exc.strerror or first_line(exc)}",
                              hint="check the path, its permissions and the free disk space")
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
            "allocate" in text and "memory" in text or "out of memory" in text)):
        return LayerdiffError(f"out of memory: {first_line(exc) or type(exc).__name__}",
                              hint="use a smaller --input-shape or fewer --samples, or free memory")
    return None


def _align(args: argparse.Namespace) -> int:
    from .pipeline import explain_alignment

    calls, alignment = explain_alignment(args.model, args.onnx, input_shape=_shapes(args.input_shape),
                                         input_range=dict(args.input_range),
                                         trust_pickle=args.trust_pickle, weights=args.weights)
    rows = [("module", "type", "method", "confidence", "ONNX node", "op", "tensor")]
    rows += [(calls[p.call].label, calls[p.call].module_type, p.method, p.confidence, p.onnx_node,
              p.op_type, p.onnx_tensor) for p in alignment.pairs]
    widths = [min(max(len(r[i]) for r in rows), 48) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell[:48].ljust(w) for cell, w in zip(row, widths)).rstrip())
    if alignment.unmatched_torch:
        print("\nnot paired:")
        for u in alignment.unmatched_torch:
            print(f"  {u.name}: {u.reason}")
    if alignment.unmatched_onnx:
        print("\nONNX weight nodes without a module:")
        for u in alignment.unmatched_onnx:
            print(f"  {u.name}: {u.reason}")
    c = alignment.coverage()
    methods = ", ".join(f"{k} {v}" for k, v in c["by_method"].items())
    print(f"\n{c['modules']} module calls: {c['compared']:.0%} paired ({methods}), "
          f"{c['fused']:.0%} fused, {c['unmatched']:.0%} not paired; "
          f"module names in the file: {'yes' if alignment.has_scopes else 'no'}")
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """A bad number would give a false verdict (--rtol nan passes anything): checked first."""
    options.check(rtol=args.rtol, atol=args.atol, seed=args.seed, samples=args.samples,
                  opset=args.opset, max_memory=args.max_memory)
    for name, bounds in args.input_range:
        options.input_range(bounds, name)


def _given_inputs(args: argparse.Namespace, onnx: str | None) -> list:
    from .models import model_file  # torch-free: entry points are only parsed

    return files.given_inputs(model_file(args.model), onnx,
                              [*args.inputs, *([args.input_data] if args.input_data else [])],
                              weights=args.weights)


def _diagnosis_options(args: argparse.Namespace) -> dict:
    """The shared options (_add_shared) as diagnose()'s keywords."""
    sizes = None if args.check_sizes is None else tuple(s for s in args.check_sizes if s)
    return dict(input_shape=_shapes(args.input_shape), input_range=dict(args.input_range),
                input_data=args.input_data, seed=args.seed, samples=args.samples,
                input_files=tuple(args.inputs), photo=args.photo, check_sizes=sizes,
                reference=args.reference,
                rtol=args.rtol, atol=args.atol, trust_pickle=args.trust_pickle,
                ort_level=args.ort_level, ort_config=dict(args.ort_config),
                provider=tuple(args.provider or ("CPUExecutionProvider",)),
                max_memory=args.max_memory, weights=args.weights)


@contextlib.contextmanager
def _progress(args: argparse.Namespace):
    """Stages and steps on stderr when it is a terminal (a bar redrawn in place; its line
    ended before anything else is printed); nothing otherwise, nor with --quiet."""
    from .progress import TerminalProgress, silent

    if args.quiet or not sys.stderr.isatty():
        yield silent
        return
    progress = TerminalProgress(sys.stderr)
    try:
        yield progress
    finally:
        progress.close()


def _explorer_outputs(args: argparse.Namespace) -> dict[str, Path]:
    """The Model Explorer files --model-explorer DIR will write, for check_outputs."""
    if not args.model_explorer:
        return {}
    from .model_explorer import paths

    folder = Path(args.model_explorer)
    # A folder to be made must not be another output's path (-o out/r.html twice).
    made = {} if folder.is_dir() else {"--model-explorer": folder}
    return {**made, **{f"--model-explorer's {path.name}": path
                       for path in paths(folder).values()}}


def _write_explorer(args: argparse.Namespace, diagnosis) -> dict[str, Path]:
    if not args.model_explorer:
        return {}
    from . import model_explorer

    return model_explorer.write(diagnosis, args.model_explorer)


def _print_explorer(args: argparse.Namespace, diagnosis, written: dict[str, Path]) -> None:
    if not args.model_explorer:
        return
    if not written:
        print(f"model explorer: nothing written to {args.model_explorer} (no ONNX file to "
              "show)")
        return
    from .model_explorer import command

    print(f"model explorer: {command(diagnosis.onnx.path, written)}")


def _report(args: argparse.Namespace) -> int:
    _check_numbers(args)
    from .models import output_stem  # torch-free: entry points are only parsed

    output = Path(args.output) if args.output else None
    default_dir = Path("layerdiff_report")
    stem = output_stem(args.model)
    # The report path is known up front so the minimal reproducer can sit next to it.
    report_path = output if output is not None else default_dir / f"{stem}.html"
    output_dir = output.parent if output else default_dir
    fp16 = args.fp16 or bool(args.fix_fp16)
    # Every output, before torch is even imported: a run of minutes must not end in a
    # write that fails, or one that replaces the user's checkpoint.
    inputs = _given_inputs(args, args.onnx)
    files.check_inputs(inputs)
    files.check_outputs(
        {"-o": report_path, "--json": args.json, **_explorer_outputs(args),
         **files.planned_outputs(stem, onnx=args.onnx, output_dir=output_dir,
                                 fp16=fp16, fix_fp16=args.fix_fp16, report=report_path)},
        inputs)

    # Imported here so that `layerdiff --help` answers without loading torch.
    from . import render
    from .pipeline import diagnose

    with _progress(args) as progress:
        diagnosis = diagnose(
            args.model, args.onnx, fp16=fp16, fp16_method=args.fp16_method,
            fix_fp16=args.fix_fp16, ignore=tuple(args.ignore_layer), exporter=args.exporter,
            opset=args.opset, output_dir=output_dir, progress=progress,
            reproducer_for=report_path, **_diagnosis_options(args),
        )
    output = report_path
    render.write_html(diagnosis, output)
    if args.json:
        render.write_json(diagnosis, Path(args.json))
    explorer = _write_explorer(args, diagnosis)

    if args.quiet:
        print(f"{diagnosis.verdict}: {output}")
    else:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(render.console_summary(diagnosis, color=color))
        print(f"report: {output}")
        if args.json:
            print(f"json:   {args.json}")
        if diagnosis.reproducer:
            print(f"minimal reproducer: {diagnosis.reproducer[0]} + {diagnosis.reproducer[1]}")
        _print_explorer(args, diagnosis, explorer)
    if args.open:
        webbrowser.open(output.resolve().as_uri())
    return diagnosis.exit_code


def _convert(args: argparse.Namespace) -> int:
    _check_numbers(args)
    out = Path(args.output)
    report_path = Path(args.report) if args.report else out.with_name(out.stem + ".html")
    if args.no_verify and (args.report or args.json or args.model_explorer):
        raise UsageError("--no-verify writes no report",
                         hint="leave out --report, --json and --model-explorer, or --no-verify")
    inputs = _given_inputs(args, None)
    files.check_inputs(inputs)
    planned = {"-o": out}
    if not args.no_verify:
        reproducer = files.reproducer_paths(report_path)
        planned.update({"--report": report_path, "--json": args.json,
                        "the reproducer's .onnx": reproducer[0],
                        "the reproducer's .npz": reproducer[1], **_explorer_outputs(args)})
    # Before torch is imported: never a file written over the model or an input.
    files.check_outputs(planned, inputs)

    from . import render
    from .converting import Verification, convert

    with _progress(args) as progress:
        conversion = convert(
            args.model, out, dtype=args.dtype, opset=args.opset, exporter=args.exporter,
            static=args.static, verify=not args.no_verify, force=args.force,
            optimize=args.optimize, progress=progress,
            reproducer_for=None if args.no_verify else report_path, **_diagnosis_options(args),
        )
    d = conversion.diagnosis
    explorer = {}
    if d is not None:
        render.write_html(d, report_path)
        if args.json:
            render.write_json(d, Path(args.json))
        explorer = _write_explorer(args, d)
    verdict = {Verification.VERIFIED: "verified", Verification.NOT_VERIFIED: "not verified",
               Verification.FORCED: "NOT VERIFIED", Verification.FAILED: "NOT VERIFIED"}
    where = (f"wrote {conversion.path}" if conversion.path is not None
             else f"{out} not written (--force writes it anyway)")
    meta = conversion.metadata
    how = ", ".join(v for v in (args.dtype, meta.get("layerdiff.exporter", "") + " exporter",
                                "opset " + meta.get("layerdiff.opset", "?"),
                                "optimised with " + meta["layerdiff.optimizer"]
                                if "layerdiff.optimizer" in meta else "") if v)
    print(f"{verdict[conversion.verification]}: {where} ({how})"
          + (", marked failed" if conversion.verification == Verification.FORCED else ""))
    if not args.quiet and conversion.reason:
        print(f"why: {_printable(first_line(conversion.reason))}")
    if d is not None:
        print(f"report: {report_path}")
        if args.json:
            print(f"json:   {args.json}")
        if not args.quiet:
            _print_explorer(args, d, explorer)
    return conversion.exit_code



class _CheckingParser(_Parser):
    """Parses a sweep's options for report or convert: an error is a UsageError to raise."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


# What the sweep sets for each entry itself: given to it, they would be one path for all.
_SWEEP_OWNS = {"output": "-o", "json": "--json", "onnx": "--onnx", "report": "--report",
               "fix_fp16": "--fix-fp16", "open": "--open"}
_SENTINEL = "\0sweep"


def _check_passthrough(command: str, flags: list[str] | tuple[str, ...], where: str) -> None:
    """Refuse, before anything runs, options that report (or convert) would refuse, and those
    the sweep sets per entry."""
    try:
        parsed = build_parser(_CheckingParser).parse_args(
            [command, "MODEL", *(["-o", _SENTINEL] if command == "convert" else []), *flags])
    except UsageError as error:
        raise UsageError(f"{where}: {error.message}",
                         hint=f"options after SOURCE go to every entry's '{command}'; see "
                              f"'layerdiff {command} --help'") from None
    for dest, flag in _SWEEP_OWNS.items():
        value = getattr(parsed, dest, None)
        if value not in (None, False, _SENTINEL):
            raise UsageError(f"{where}: {flag} is set by the sweep for each entry",
                             hint="leave it out: each entry's results go to OUTDIR/<entry>/")
    _check_numbers(parsed)


def _sweep(args: argparse.Namespace) -> int:
    from . import sweep
    from .store import DEFAULT_MAX_MEMORY, default_max_memory
    from .sweep_source import read_source

    mode = "convert" if args.convert else "report"
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be 1 or more", hint="e.g. --workers 2")
    if args.workers is not None and args.cluster:
        raise UsageError("--workers is for this machine, and --cluster runs on the cluster",
                         hint="the cluster's workers set how many run at once; drop --workers")
    if not (args.timeout >= 0):
        raise UsageError(f"--timeout {args.timeout} is not a number of seconds",
                         hint="e.g. --timeout 600, or 0 for no limit")
    _check_passthrough(mode, args.passthrough, "options")
    entries = read_source(args.source, convert=args.convert)
    for entry in entries:
        if entry.flags:
            _check_passthrough(mode, [*args.passthrough, *entry.flags], f"entry {entry.name}")
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"OUTDIR {outdir} is a file", hint="give a folder for -o")
    if outdir.resolve() == Path(args.source).resolve() or (
            Path(args.source).is_file() and outdir.resolve() == Path(args.source).resolve().parent):
        raise UsageError(f"OUTDIR {outdir} is the SOURCE's folder",
                         hint="give another folder for -o: the sweep never writes among its inputs")
    default = DEFAULT_MAX_MEMORY if args.cluster else default_max_memory()
    settings = sweep.Settings(
        source=args.source, outdir=outdir, mode=mode, flags=tuple(args.passthrough),
        max_memory=args.max_memory or default, timeout=args.timeout or None,
        workers=args.workers, cluster=args.cluster, retry_failed=args.retry_failed,
        quiet=args.quiet)
    return sweep.run(settings, entries)


def entry() -> None:
    """The console script: ``main`` with its exit code. After Ctrl-C the process ends at
    once (every clean-up has run by then): a library interrupted halfway through its
    import (torch's) can make the interpreter's own shutdown end the process by the
    signal instead of with 130."""
    code = main()
    if code == EXIT_INTERRUPTED:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
