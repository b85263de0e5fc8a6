"""The ``fmrl`` command.

fmrl train --config configs/demo.yaml [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from trainer.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmrl", description="Train and evaluate Matryoshka recommenders.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train fMRL-LRU and report test metrics per nested size")
    train.add_argument("--config", help="YAML config file (default: built-in defaults)")
    train.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"fmrl: config error: {error}", file=sys.stderr)
        return 2
    if args.command == "train":
        from trainer.train import train

        train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
