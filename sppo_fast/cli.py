"""The ``sppo-fast`` command line (also ``python -m sppo_fast``).

    sppo-fast demo                                   # 3 SPPO iterations of the embedded default
    sppo-fast iterate --preset mistral-7b --set name=mistral iterations=3
    sppo-fast generate|rank|train --iteration 1      # one stage (earlier ones run first if missing)
    sppo-fast eval --a runs/demo/iter-3/model --b runs/demo/iter-0/model

Every config field can be set from a YAML file (``--config``) and overridden with ``--set
field=value`` (nested: ``train.learning_rate=1e-4``). Bad configs are rejected before any work.
Outputs go to <runs_dir>/<name>/ (default runs/demo/); a rerun of the same command resumes there,
and other settings on that folder are refused (choose another name, or delete the folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(SystemExit):
    """A bad command line or config: exit status 2 (as argparse's), the message printed first."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2
        print(f"sppo-fast: {message}", file=sys.stderr)


def _config(args):
    from .pipeline.config import load_config

    overrides = {}
    for item in args.set or []:
        if "=" not in item:
            raise UsageError(f"--set expects field=value, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k] = v
    try:
        return load_config(args.preset, args.config, overrides)
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(f"config error: {exc}") from None


def _fields_help() -> str:
    """The config fields and their values under the default preset, for ``--help``."""
    import textwrap

    from .pipeline.config import _flat, load_config

    fields = [f"{k}={v}" for k, v in _flat(load_config("tiny").to_dict()).items()]
    body = textwrap.fill("  ".join(fields), width=100, initial_indent="  ", subsequent_indent="  ",
                         break_on_hyphens=False)
    return ("config fields (--set FIELD=VALUE, or a YAML file's keys; values of the tiny preset, "
            "see sppo_fast/pipeline/config.py):\n" + body)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sppo-fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    p.add_argument("--version", action="version", version=f"sppo-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    from .pipeline.config import PRESETS

    out = "Writes to <runs_dir>/<name>/ (default runs/demo/; --set runs_dir=... name=...)."
    fields = _fields_help()
    for name, help_, more in (
            ("demo", "3 SPPO iterations of the embedded default on this machine",
             "A tiny policy, the shipped prompts and a hash ranker: about 20 s of work on a 2-core CPU. " + out),
            ("iterate", "N iterations end to end, then win rates",
             "Generate, rank and train for iterations 1..N (--set iterations=N), then the held-out win rate "
             "of each iteration's policy against iteration 0; summary.json and plots. " + out),
            ("generate", "sample K responses per prompt (one iteration)",
             "Writes iter-<N>/generations.parquet. " + out),
            ("rank", "rank the candidates and build the training set (one iteration)",
             "Generates first if needed; writes iter-<N>/train.parquet and ranking.json. " + out),
            ("train", "train one iteration's policy",
             "Generates and ranks first if needed; writes iter-<N>/model/ and metrics.jsonl. " + out),
            ("eval", "win rate of policy A against policy B on the held-out prompts",
             "Both policies answer the first eval_prompts prompts of the source; the ranker judges. "
             "Prints the win rate; writes nothing.")):
        s = sub.add_parser(name, help=help_, description=f"{help_[0].upper()}{help_[1:]}. {more}",
                           epilog=fields, formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                       help="starting settings (default: tiny; mistral-7b: the released SPPO recipe)")
        s.add_argument("--config", type=Path, default=None, help="YAML file of config fields")
        s.add_argument("--set", nargs="+", action="extend", metavar="FIELD=VALUE",
                       help="override config fields (repeatable: --set a=1 --set b=2 sets both)")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        s.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        if name in ("generate", "rank", "train"):
            s.add_argument("--iteration", type=int, default=1, metavar="N",
                           help="which SPPO iteration, 1-based (default 1): iteration N trains from "
                                "iteration N-1's policy, which must be trained already")
        if name == "eval":
            s.add_argument("--a", required=True, metavar="MODEL",
                           help="policy A: a model folder (e.g. runs/demo/iter-3/model) or a hub name")
            s.add_argument("--b", required=True, metavar="MODEL",
                           help="policy B, the baseline (e.g. runs/demo/iter-0/model)")
    return p


def main(argv=None) -> int:
    """Errors in what the user gave (ValueError, TypeError, OSError) print one line and exit 2; Ctrl-C
    exits 130 (every stage resumes); ``--debug`` shows the traceback instead."""
    import warnings

    args = build_parser().parse_args(argv)
    shown = warnings.showwarning
    if not args.debug:  # a warning as one line, as the errors are (not a file path and a source line)
        warnings.showwarning = _show_warning
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("\nsppo-fast: interrupted; rerun the same command to resume (finished work is kept)", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as exc:
        if args.debug:
            raise
        msg = str(exc).replace("\n", " ")
        print(f"sppo-fast: error: {msg}  (--debug shows the traceback)", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown  # (main() may be called from a user's own code)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"sppo-fast: warning: {message}", file=file or sys.stderr)


def _run(args) -> int:
    cfg = _config(args)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading bars of tiny checkpoints drown ours
    if args.quiet:
        try:
            import datasets

            datasets.disable_progress_bars()  # ("Generating train split" of a prompt file)
        except ImportError:
            pass
    from .pipeline import iterate as it

    progress = not args.quiet
    if args.command in ("demo", "iterate"):
        summary = it.iterate(cfg, progress=progress)
        print(it.format_summary(summary))
        plots = "winrate.png, loss.png" if cfg.eval_prompts else "loss.png; no win rates: eval_prompts=0"
        print(f"run folder: {cfg.run_dir}  (summary.json, {plots})")
    elif args.command in it.STAGES:
        out = it.run_iteration(cfg, args.iteration, progress=progress, until=args.command)
        print(f"wrote {out}")
    else:
        print(f"win rate of {args.a} against {args.b}: {it.evaluate(cfg, Path(args.a), Path(args.b), progress=progress):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
