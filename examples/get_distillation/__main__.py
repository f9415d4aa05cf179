"""Command-line entry: ``python -m examples.get_distillation <subcommand> ...``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``main(args) -> int``. To add one, put its module name in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import os

# OpenMP reads its wait settings once, when torch loads it, so this comes before any import of
# torch (the subcommands' modules import it). After a parallel region OpenMP's idle worker
# threads spin, waiting for the next one; beside another busy process they then fight it for
# the cores (a teacher step 7-11x slower). GNU OpenMP (torch's Linux wheels) spins for
# GOMP_SPINCOUNT iterations before it sleeps: 3000 keeps an idle machine's speed within 7-12%
# of the default and a loaded one's close to PASSIVE's, where PASSIVE alone (sleep at once) costs
# 15-30% per teacher step when idle. Other OpenMP runtimes ignore GOMP_SPINCOUNT and get
# PASSIVE. Figures: docs/benchmarks.md, "Timing on a shared machine". A value the user set for
# either variable is kept, and neither is added then. Set in os.environ, so every process the
# demo starts (the side-by-side student) inherits them.
WAIT_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}
if not any(name in os.environ for name in WAIT_SETTINGS):
    os.environ.update(WAIT_SETTINGS)

import argparse  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402
import typing  # noqa: E402

# subcommand name -> (module inside this package, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "teacher": ("teacher", "train an EDM-preconditioned teacher (resumable)"),
    "pairs": ("pairs", "generate seeded noise/image pairs with a teacher (resumable, torchrun-ready)"),
    "train": ("train", "train a one-step student (GET or ViT) on pairs (resumable, torchrun/DDP-ready)"),
    "evaluate": ("evaluate", "evaluate students against the teacher: quality, teacher match, speed, NFE sweep"),
    "nfe-study": ("nfe_study", "GET students' residual and quality against solver NFE (FixedPoint, Anderson, Broyden)"),
    "study": ("study", "train the student stage over several seeds on existing pairs; mean and spread of every figure"),
    "scaling": ("scaling", "GET and ViT students of several sizes from seed studies: quality against parameters and MACs"),
    "demo": ("demo", "the end-to-end demo on the bundled digits (teacher -> pairs -> students -> report)"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported as one line (the usage is one --help away)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog.split()[-1]}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m examples.get_distillation",
        description="GET distillation example: teacher training, pair generation and more.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}",
                                parser_class=_Parser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        # every option writes its default into its help (cli.add_config_arguments does it for
        # config fields), so no ArgumentDefaultsHelpFormatter: it would print a second one
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


# what bad input, a busy folder, the file system (read-only, full, no permission) or a diverged
# run raise: reported as one line, not a traceback (set DEQKIT_TRACEBACK=1 to see the traceback)
USER_ERRORS = (ValueError, OSError, ImportError, RuntimeError)


def message(exc: BaseException) -> str:
    """One line for a user error; an OSError names its path."""
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.strerror or exc}: {str(exc.filename)!r}"
    else:
        text = str(exc)
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except USER_ERRORS as exc:
        if os.environ.get("DEQKIT_TRACEBACK"):
            raise
        print(f"error: {args.command}: {message(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
