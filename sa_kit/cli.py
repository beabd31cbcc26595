"""The ``sa-kit`` command and what every entry point shares: checks first, one-line errors.

    sa-kit demo [--forget-class K] [--map-to noise|DIGIT] [--strict]     (= python -m sa_kit.demo)
    sa-kit forget-sd --config run.yaml [--stage ...] [key=value ...]   (= python -m sa_kit.sd.forget)
    sa-kit evaluate-sd --run OUTPUT_DIR                                (= python -m sa_kit.sd.evaluate)
    sa-kit sd-dataset --model tiny --out DIR                           (= python -m sa_kit.sd.dataset)

Every command validates its arguments and the environment (``SA_KIT_PROFILE``,
``SA_KIT_CACHE``, ``SA_KIT_OFFLINE``) before it loads data or trains anything; a wrong value
exits with status 2 and one line that names the argument, the value and what is allowed.
Ctrl-C or SIGTERM during a long stage saves a checkpoint and exits with 130 / 143.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from sa_kit.io import CacheDirError, cache_root, check_cache_dir

OFFLINE_VALUES = ("", "0", "1", "true", "false", "yes", "no")

__all__ = ["main", "run_command", "check_environment", "UsageError", "ArgParser"]


class UsageError(ValueError):
    """A bad argument or setting a user typed (reported in one line, exit status 2)."""


class ArgParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one :class:`UsageError` line instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


def check_environment(profile: str | None = None, need_cache: bool = True) -> None:
    """Validate ``SA_KIT_PROFILE`` (or ``profile``), ``SA_KIT_OFFLINE`` and ``SA_KIT_CACHE``."""
    from sa_kit.profiles import profile_name
    profile_name(profile)
    offline = os.environ.get("SA_KIT_OFFLINE", "")
    if offline.strip().lower() not in OFFLINE_VALUES:
        raise UsageError(f"SA_KIT_OFFLINE must be 1/true/yes or 0/false/no (or unset); "
                         f"got {offline!r}")
    if need_cache:
        check_cache_dir(cache_root())


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


def run_command(body: Callable[[], object]) -> int:
    """Run a command's body; map user errors to one line + exit 2, interrupts to 130/143."""
    import signal
    try:
        result = body()
    except KeyboardInterrupt as e:
        term = "SIGTERM" in str(e)
        print(f"interrupted: {_one_line(e)}" if str(e) else "interrupted", file=sys.stderr)
        return 128 + (signal.SIGTERM if term else signal.SIGINT)
    except (UsageError, ValueError, TypeError, CacheDirError, FileNotFoundError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    return int(result) if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``sa-kit COMMAND ...``: dispatch to the kit's commands."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": ("sa_kit.demo", "forget a digit of an MNIST cVAE and print the result"),
        "forget-sd": ("sa_kit.sd.forget", "Selective Amnesia for a Stable Diffusion pipeline"),
        "evaluate-sd": ("sa_kit.sd.evaluate", "before/after grid and numbers of an SD run"),
        "sd-dataset": ("sa_kit.sd.dataset", "generate a replay dataset with a pipeline"),
    }
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: sa-kit COMMAND [ARGS]\n\ncommands:")
        for name, (_, text) in commands.items():
            print(f"  {name:12s} {text}")
        return 0 if argv else 2
    if argv[0] not in commands:
        print(f"error: unknown command {argv[0]!r}; commands: {', '.join(commands)}",
              file=sys.stderr)
        return 2
    import importlib
    module = importlib.import_module(commands[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
