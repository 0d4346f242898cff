"""The ``dsa-ref`` command: ``info``, ``demo``, ``check``, and the subcommands of optional parts
(``bench`` needs a GPU backend's package, ``train-indexer`` the layer)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import shutil
import sys

import numpy as np

from . import __version__, registry


# ---------------------------------------------------------------------------- info
def _devices() -> list[str]:
    lines = []
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                lines.append(f"cuda:{index} {props.name} (sm_{props.major}{props.minor}, "
                             f"{props.total_memory / 2**30:.0f} GiB) via torch {torch.__version__}")
        else:
            lines.append(f"no CUDA device visible to torch {torch.__version__}")
    else:
        lines.append("torch not installed")
    nvcc = shutil.which("nvcc")
    lines.append(f"nvcc: {nvcc}" if nvcc else "nvcc: not found")
    return lines


#: Exit status of ``info`` when the active backend cannot run here (its name is valid).
INFO_ACTIVE_UNAVAILABLE = 1
#: Exit status of ``info`` when the active backend's name is not a valid backend.
INFO_ACTIVE_INVALID = 2


def _active_backend_problem(name: str) -> tuple[int, str | None]:
    """(exit status, why) for the active backend ``name``; ``(0, None)`` when it can run here."""
    try:
        registry.get_backend(name)
    except registry.BackendUnavailableError as exc:
        return INFO_ACTIVE_UNAVAILABLE, str(exc).removeprefix(f"backend {name!r} cannot run here: ")
    except (ValueError, TypeError) as exc:
        if name.startswith(registry.MODULE_PREFIX) or name in registry.backend_names():
            return INFO_ACTIVE_INVALID, str(exc)
        return INFO_ACTIVE_INVALID, (f"{name!r} is not a valid backend name; valid names: "
                                     f"{', '.join(registry.backend_names())} "
                                     f"(or {registry.MODULE_PREFIX}package.module:Class)")
    return 0, None


def cmd_info(args: argparse.Namespace) -> int:
    import ml_dtypes

    print(f"dsa-ref {__version__} on Python {platform.python_version()}, numpy {np.__version__}, "
          f"ml_dtypes {ml_dtypes.__version__}")
    name = registry.active_backend_name()
    chosen_by = (f"set by {registry.ENV_VAR}" if os.environ.get(registry.ENV_VAR) == name
                 else f"the default; set {registry.ENV_VAR} to change it")
    status, problem = _active_backend_problem(name)
    verdict = {0: "", INFO_ACTIVE_UNAVAILABLE: " CANNOT RUN HERE", INFO_ACTIVE_INVALID: " is INVALID"}[status]
    print(f"active backend: {name} ({chosen_by}){verdict}" + (f": {problem}" if problem else ""))
    print("backends:")
    for info in registry.list_backends():
        state = "available" if info.available else "unavailable"
        print(f"  {info.name:8s} {state:11s} {info.description}")
        print(f"  {'':8s} from {info.origin}")
        for reason in info.reasons:
            print(f"  {'':8s} - {reason}")
    print("devices:")
    for line in _devices():
        print(f"  {line}")
    if problem is not None:
        # Also on stderr: `dsa-ref info | grep ...` and scripts should still see why it failed.
        print(f"dsa-ref info: active backend {name!r}{verdict.lower()}: {problem}", file=sys.stderr)
    return status


# ---------------------------------------------------------------------------- check
def cmd_check(args: argparse.Namespace) -> int:
    try:
        import hypothesis  # noqa: F401 - the conformance kit draws its examples with it
    except ImportError:
        print("dsa-ref check: the conformance kit needs hypothesis: pip install hypothesis "
              "(or pip install 'dsa-ref[test]')", file=sys.stderr)
        return 2
    from .testing import ProgressPrinter, check_backend

    name = args.backend or registry.active_backend_name()
    ops = [op.strip() for op in args.ops.split(",") if op.strip()] if args.ops else None
    print(f"checking backend {name!r} against the reference, profile {args.profile} ...", flush=True)
    report = check_backend(name, profile=args.profile, ops_to_check=ops, max_examples=args.max_examples,
                           progress=ProgressPrinter())
    print(report)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------- optional parts
def _delegate(module: str, what: str):
    def add(parser: argparse.ArgumentParser) -> None:
        try:
            target = importlib.import_module(module)
        except ImportError as exc:
            parser.set_defaults(func=lambda args: _missing(what, exc))
            return
        target.add_arguments(parser)
        parser.set_defaults(func=target.run)

    return add


def _missing(what: str, exc: Exception) -> int:
    print(f"dsa-ref: {what} is not available here: {exc}", file=sys.stderr)
    return 2


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; the optional part named by ``command`` is imported to add its options."""
    parser = argparse.ArgumentParser(prog="dsa-ref", description="DeepSeek Sparse Attention: reference and backends")
    parser.add_argument("--version", action="version", version=f"dsa-ref {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser(
        "info", help="version, backends (with why any cannot run), devices",
        description="Version, backends (with why any cannot run) and devices. Exit status: 0 when the "
                    f"active backend can run, {INFO_ACTIVE_UNAVAILABLE} when it cannot run here, "
                    f"{INFO_ACTIVE_INVALID} when its name ({registry.ENV_VAR}) is not a valid backend.")
    info.set_defaults(func=cmd_info)

    from .demo import add_arguments as demo_arguments, run as demo_run

    demo = commands.add_parser("demo", help="a narrated DSA step on a small problem with the active backend")
    demo_arguments(demo)
    demo.set_defaults(func=demo_run)

    from .testing.conformance import CHECKED_OPS
    from .testing.profiles import PROFILES

    def examples_per_op(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"--max-examples must be an integer >= 1, got {text!r}")
        return value

    profiles = "\n".join(f"  {name}: {profile.describe()}" for name, profile in PROFILES.items())
    check = commands.add_parser(
        "check", help="property-test a backend against the reference",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Property-test a backend's ops against the float64 reference on hypothesis-drawn problems,\n"
                    f"awkward cases included.\n\nprofiles:\n{profiles}\n\nops: {', '.join(CHECKED_OPS)}")
    check.add_argument("--backend", help="backend name (default: the active one)")
    check.add_argument("--profile", default="ci", choices=tuple(PROFILES), help="default: ci")
    check.add_argument("--ops", help=f"comma-separated subset of {', '.join(CHECKED_OPS)} (default: all)")
    check.add_argument("--max-examples", type=examples_per_op, help="examples per op, >= 1 (default: the profile's)")
    check.set_defaults(func=cmd_check)

    optional = {
        "bench": ("dsa_ref_backends.bench", "the benchmark (needs torch and a GPU backend)",
                  "time kernels, baselines and ceilings on this GPU"),
        "train-indexer": ("dsa_ref.layer.experiment", "the indexer warm-up experiment",
                          "warm up an indexer with the KL loss and watch the captured attention rise"),
    }
    for name, (module, what, help_text) in optional.items():
        sub = commands.add_parser(name, help=help_text)
        if command == name:  # import an optional part only when its command runs
            _delegate(module, what)(sub)
    return parser


#: 128 + SIGPIPE: what a shell reports for a tool that the signal ended, the usual fate of a writer
#: whose reader closed the pipe.
EXIT_BROKEN_PIPE = 141


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            command = next((arg for arg in argv if not arg.startswith("-")), None)
            args = build_parser(command).parse_args(argv)
            try:
                return int(args.func(args) or 0)
            except (registry.BackendUnavailableError, ValueError, TypeError) as exc:
                print(f"dsa-ref {args.command}: {exc}", file=sys.stderr)
                return 2
        finally:
            # Output that fits the buffer meets a closed pipe only here, or at exit, where the
            # error could no longer be handled.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`dsa-ref demo | head -1`): stop quietly, with the status of a
        # process ended by SIGPIPE, like other Unix tools. Python would flush stdout again at exit
        # and fail again, so stdout is pointed at devnull first (as the signal module's docs advise).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
