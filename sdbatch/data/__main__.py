"""Synthetic datasets: `python -m sdbatch.data shapes OUT --rows N --seed S`.

Exit status: 0 written, 2 bad arguments (message on stderr), 1 the file could not be written.
"""

import argparse
import sys

from .shapes import HELD_OUT_FRACTION, SIDE, write_dataset


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser and its `shapes` sub-parser."""
    parser = argparse.ArgumentParser(prog="python -m sdbatch.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser(
        "shapes", help=f"{SIDE}x{SIDE} pictures of one coloured shape on a plain background, with captions",
        description=f"Write the shapes image-caption table (image struct, text, id, attribute columns) to OUT. "
                    f"About {HELD_OUT_FRACTION:.0%} of the (shape, colour, background) triples are held out; "
                    f"the file's metadata lists them. The same --rows and --seed give the same bytes.")
    shapes.add_argument("out", metavar="OUT", help="the .parquet file to write: local path or fsspec URI (s3://...)")
    shapes.add_argument("--rows", type=_positive_int, required=True, help="number of images")
    shapes.add_argument("--seed", type=_seed, default=0, help="picks the held-out triples and every row (default 0)")
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser, shapes


def main(argv: list[str] | None = None) -> int:
    parser, shapes = build_parser()
    args = parser.parse_args(argv)
    if not args.out.endswith(".parquet"):
        shapes.error(f"OUT {args.out!r} must be a .parquet file")
    try:
        uri = write_dataset(args.out, args.rows, args.seed, progress=not args.quiet)
    except OSError as e:
        print(f"error: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    print(uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
