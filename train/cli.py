"""``rexnet-train``: train or fine-tune a ReXNet from a YAML config (PaddleClas-style ``-o`` overrides).

Exit codes: 0 done, 1 bad data / weights / checkpoint or a failed run, 2 bad config or usage.
Several GPUs or machines: start it through Paddle's launcher (see train/README.md).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from rexnet_train.config import CONFIG_DIR, ConfigError, config_path, load_config

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexnet-train", description=__doc__.split("\n")[0],
        epilog="example: rexnet-train -c ReXNet_1_0 -o Data.batch_size=64 -o Global.epochs=120")
    parser.add_argument("-c", "--config", default="ReXNet_1_0",
                        help=f"a YAML file, or a bundled config name from {CONFIG_DIR} "
                             "(ReXNet_1_0 ... ReXNet_3_0, finetune); default: %(default)s")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="Section.key=value",
                        help="override one config value (YAML syntax); repeatable")
    parser.add_argument("--resume", metavar="PATH",
                        help="a .pdckpt checkpoint from an earlier run: continue after its epoch")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(config_path(args.config), args.override)
    except ConfigError as exc:
        print(f"rexnet-train: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    # Imported after the config check so that a typo is reported without loading Paddle.
    from rexnet_serving.models import WeightsError
    from rexnet_train.checkpoint import CheckpointError
    from rexnet_train.data import DataError
    from rexnet_train.engine import Trainer
    try:
        trainer = Trainer(config, resume=args.resume, show_progress=not args.no_progress)
        final = trainer.fit()
    except (DataError, WeightsError, CheckpointError) as exc:
        print(f"rexnet-train: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as exc:  # e.g. class-count mismatch between data and config
        print(f"rexnet-train: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("rexnet-train: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    if trainer.is_main:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
        print(f"rexnet-train: done, output in {trainer.output_dir} ({summary})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
