"""The ``fmrl`` command.

    fmrl train --config configs/demo.yaml [KEY=VALUE ...]       (also --KEY=VALUE / --KEY VALUE)
    fmrl plan --config C --num-items 100000000 --world-size 64,128,256,512 [--device h100|a100|cpu]
    fmrl launch [--nproc N] [--nnodes M --rdzv-endpoint HOST:PORT] [--dry-run] --config ... [KEY=VALUE ...]
    fmrl config show [--config C] [KEY=VALUE ...]                the resolved config, each key documented
    fmrl eval RUN_OR_CHECKPOINT [--split test|valid] [KEY=VALUE ...]   metrics of saved weights
    fmrl export RUN_OR_CHECKPOINT --sizes 16,64 [--out URL]
    fmrl recommend EXPORT --history ID,ID,... [--size M] [--k 10]       top-k for one history
    fmrl features DATASET_URL [--out URL]
    fmrl data prepare-synthetic OUT_URL [--num-items 2000 --num-users 4000 ...]
    fmrl data prepare-synthetic-scale OUT_URL [--num-items 1000000 --num-categories 500 --num-brands 10000]
    fmrl data convert-movielens OUT_URL
    fmrl data prepare-synthetic-ctr OUT_URL [--rows 50000]      (DLRM; also convert-criteo, convert-obp)
    fmrl data convert-amazon OUT_URL --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz [--images DIR]
    fmrl data convert-p5 OUT_URL --data-dir data/beauty [--images photos/beauty]
    fmrl data convert-seqrec OUT_URL Beauty.txt [--attributes Beauty_item2attributes.json]
    fmrl data index-attributes DATASET                           (the attribute index of an older data set)
    fmrl sizes RUN_OR_EXPORT [--max-latency-ms X --max-memory-mb Y --min-ndcg Z]
    fmrl serve EXPORT [--size auto|m] [--port 8000] [--host 127.0.0.1]   (docs/deploy.md)

URLs are local paths or s3:// URLs (endpoint and credentials from the environment or --s3-endpoint-url;
docs/storage.md). docs/cli.md describes every command.

A failure the user can act on (a config key, a missing file, storage that does not answer, a checkpoint
that does not fit) ends the command with one line naming the culprit: exit code 2 when the command line,
the config or a path it names is wrong, 1 when something failed while running. The traceback goes to the
"fmrl" logger at DEBUG (the run's log file) and to the terminal only with ``--debug``. Under torchrun
rank 0 prints the line; the other ranks wait a few seconds first, so when all ranks fail alike (the
usual case) the job ends with rank 0's line alone, and a failure of one other rank is still said.

This module imports neither torch nor TorchRec: ``fmrl --help`` and a config error answer at once; each
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from trainer.config import load_config
from trainer.logs import configure_logging
from trainer.preemption import terminated
from trainer.process_exit import run_as_process

log = logging.getLogger("fmrl")


class UsageError(ValueError):
    """A command-line argument that cannot work; the message names it and says what to give instead."""


# ------------------------------------------------------------------------------------- failures


EXPECTED_ERRORS: tuple[tuple[str, str, int, str], ...] = (
    ("trainer.config", "ConfigError", 2, "config error"),
    ("trainer.cli", "UsageError", 2, "error"),
    ("trainer.run_folder", "RunFolderError", 2, "error"),
    ("trainer.export", "ExportError", 2, "export error"),
    ("trainer.checkpoint", "CheckpointError", 1, "checkpoint error"),
    ("trainer.tracking", "TrackingError", 1, "tracking error"),
    ("trainer.state", "DivergedError", 1, "training diverged"),
    ("data_pipeline.storage", "StorageNotFoundError", 2, "error"),
    ("data_pipeline.storage", "StorageError", 1, "storage error"),
    ("builtins", "FileNotFoundError", 2, "error"),
    ("builtins", "ValueError", 2, "error"),  # the data pipeline's errors (bad input) are ValueErrors
    ("builtins", "OSError", 1, "error"),
)
"""The failures a user can act on, first match first: (module, class, exit code, label). Exit code 2:
the command line, the config or a path it names is wrong; 1: something failed while running. A class
is looked up only if its module is loaded (an error of it cannot have been raised otherwise), so this
table imports nothing."""


def classify(error: BaseException) -> tuple[int, str] | None:
    """The exit code and label of an expected failure, None for an unexpected one (a bug)."""
    for module, name, code, label in EXPECTED_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return code, label
    return None


RANK_GRACE_S = 5.0
"""How long a failing rank other than 0 waits for rank 0 to report (and torchrun to end the job)."""


def report_failure(command: str, error: BaseException, debug: bool) -> int:
    """Print ``error`` as one line on stderr (with ``debug``, the traceback too), log its traceback at
    DEBUG, and return the exit code. Under torchrun, a rank other than 0 first waits
    :data:`RANK_GRACE_S`: when rank 0 fails too, it reports and torchrun ends the job in the meantime."""
    log.debug("fmrl %s failed", command, exc_info=error)
    known = classify(error)
    code, label = known if known is not None else (1, f"unexpected {type(error).__name__}")
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        # Most failures happen on every rank (a config, a path, a checkpoint): rank 0 says it once, and
        # torchrun stops this rank meanwhile. A failure of this rank alone is said after the wait. A rank
        # whose SIGTERM (torchrun ending the job) arrived while it was still failing stays quiet: its
        # traceback is in its log.
        if not terminated():
            time.sleep(RANK_GRACE_S)
        if terminated():
            return code
        command = f"{command} (rank {rank})"
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    message = str(error).strip() or type(error).__name__
    print(f"fmrl {command}: {label}: {message}", file=sys.stderr)
    if known is None and not debug:
        print(f"fmrl {command}: this looks like a bug; --debug shows the traceback", file=sys.stderr)
    return code


# ------------------------------------------------------------------------------------- the parser


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows each option's default (unless it has none, or its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fmrl-trainer")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked (reading the installed packages' metadata takes time)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"{parser.prog} {_version()}")
        parser.exit()


# every subcommand takes --debug too, so that it may follow the command (fmrl train --debug ...)
_COMMON = argparse.ArgumentParser(add_help=False)
_COMMON.add_argument(
    "--debug",
    action="store_true",
    default=argparse.SUPPRESS,
    help="print the traceback of a failure (it always goes to the log)",
)


def _command(
    commands: argparse._SubParsersAction, name: str, text: str, **kwargs: Any
) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=text, description=text, parents=[_COMMON], **kwargs)


def _add_overrides(parser: argparse.ArgumentParser, what: str = "") -> None:
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"dotted overrides{what}, e.g. optim.lr=3e-4 (or --optim.lr=3e-4); `fmrl config show` lists "
        "every key",
    )


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--s3-endpoint-url",
        help="S3-compatible endpoint of s3:// URLs (default: FSSPEC_S3_ENDPOINT_URL or AWS_ENDPOINT_URL)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fmrl",
        description="Train, evaluate and serve Matryoshka recommenders (fMRLRec) and DLRM.",
        epilog="`fmrl COMMAND --help` describes a command; docs/cli.md all of them.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of a failure (it always goes to the log)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = _command(commands, "train", "train a model (fMRL-LRU or DLRM) and report its test metrics")
    _add_overrides(train)
    _add_launch_command(commands)
    _add_plan_command(commands)
    config = _command(commands, "config", "inspect the configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = _command(
        config_commands, "show", "print the resolved config as YAML, each key with its doc and default"
    )
    _add_overrides(show)
    _add_eval_command(commands)
    _add_export_command(commands)
    _add_recommend_command(commands)
    _add_sizes_command(commands)
    _add_serve_command(commands)
    _add_features_command(commands)
    _add_data_commands(commands)
    return parser


def _add_launch_command(commands: argparse._SubParsersAction) -> None:
    launch = _command(
        commands,
        "launch",
        "run `fmrl train` on several processes with torchrun (prints the torchrun and sbatch commands)",
    )
    launch.add_argument(
        "--nproc", type=int, help="processes per node (default: one per GPU; on CPU 2, or 1 on a single core)"
    )
    launch.add_argument("--nnodes", type=int, default=1, help="nodes; run the same command on each")
    launch.add_argument(
        "--rdzv-endpoint", help="HOST:PORT of the rendezvous on the first node (--nnodes > 1)"
    )
    launch.add_argument("--rdzv-id", default="fmrl", help="job id of the rendezvous, the same on all nodes")
    launch.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="torchrun restarts of failed workers (with run.resume=auto)",
    )
    launch.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    _add_overrides(launch, " for `fmrl train`")


def _add_plan_command(commands: argparse._SubParsersAction) -> None:
    from trainer.hardware import DEVICES

    plan = _command(
        commands,
        "plan",
        "TorchRec's plan of the item tables on a simulated cluster: sharding, per-rank memory, UVM "
        "caching, trunk memory, checkpoint size",
    )
    plan.add_argument(
        "--num-items",
        type=int,
        help="items in the catalog (default: the config's data set, data.path, with its feature widths "
        "and attributes: the plan of the job as it would run)",
    )
    plan.add_argument("--world-size", required=True, help="ranks, comma-separated, e.g. 64,128,256,512")
    plan.add_argument("--device", choices=sorted(DEVICES), default="h100", help="hardware preset")
    plan.add_argument("--hbm-gb", type=float, help="device memory per GPU, GiB (default: the preset's)")
    plan.add_argument("--ddr-gb", type=float, help="host memory per node, GiB (default: the preset's)")
    plan.add_argument("--ranks-per-node", type=int, help="GPUs (ranks) per node (default: the preset's)")
    plan.add_argument(
        "--text-dim",
        type=int,
        help="text feature width (default: the data set's, else MiniLM's 384); 0: none",
    )
    plan.add_argument(
        "--image-dim",
        type=int,
        help="image feature width (default: the data set's, else EfficientNet's 1280); 0: none",
    )
    plan.add_argument(
        "--num-attributes",
        type=int,
        help="rows of the attribute table (model.use_attributes; default: the data set's, else 100000)",
    )
    plan.add_argument(
        "--attributes-per-item",
        type=float,
        help="mean attribute ids per item, the attribute table's pooling (default: the data set's, else 2)",
    )
    _add_overrides(plan)


def _add_eval_command(commands: argparse._SubParsersAction) -> None:
    evaluate = _command(
        commands,
        "eval",
        "metrics of saved weights without training (fMRL: per nested size; DLRM: AUC, log loss)",
    )
    evaluate.add_argument(
        "source",
        metavar="RUN_OR_CHECKPOINT",
        help="a finished run folder, a checkpoint (step-N folder, local or s3://) or a checkpoint root "
        "(its best weights)",
    )
    evaluate.add_argument("--split", choices=["test", "valid"], default="test", help="the split evaluated")
    evaluate.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="changes to the run's eval.*, train.max_len or data.* settings, e.g. eval.max_users=500",
    )
    _add_storage(evaluate)


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    export = _command(
        commands,
        "export",
        "write a standalone model (fMRL: at each nested size; DLRM: whole) of a finished run or a checkpoint",
    )
    export.add_argument(
        "source",
        help="a finished run folder (config.yaml + model.safetensors), a checkpoint (step-N folder, local "
        "or s3://), or a checkpoint root (its best weights)",
    )
    export.add_argument(
        "--sizes", help="comma-separated nested sizes of an fMRL model, e.g. 16,64,128 (DLRM: leave out)"
    )
    export.add_argument("--out", help="where the export goes (local or s3://; default: <source>/export)")
    export.add_argument(
        "--features",
        help="where the frozen feature tables are (default: the training config's data.features_url)",
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an export of another model in --out (sizes of the same model are always added)",
    )
    _add_export_format_option(export)
    _add_storage(export)


def _add_recommend_command(commands: argparse._SubParsersAction) -> None:
    recommend = _command(commands, "recommend", "the top-k items of an fMRL export for one history")
    recommend.add_argument(
        "export", metavar="EXPORT", help="an export folder written by `fmrl export` or a run"
    )
    recommend.add_argument(
        "--history",
        required=True,
        help="comma-separated item ids, oldest first: the source data's ids when the export records them "
        "(item_ids.json), else internal ids 1..N; '' for none (the most popular items)",
    )
    recommend.add_argument(
        "--size", type=int, help="nested size of the model (default: the largest exported)"
    )
    recommend.add_argument("--k", type=int, default=10, help="items to list")
    recommend.add_argument(
        "--internal-ids", action="store_true", help="read and print internal ids 1..N, not the source ids"
    )
    recommend.add_argument(
        "--include-history", action="store_true", help="allow the history's own items in the list"
    )
    _add_storage(recommend)


def _add_features_command(commands: argparse._SubParsersAction) -> None:
    features = _command(
        commands, "features", "encode item text and images of a dataset into frozen feature tables"
    )
    features.add_argument("dataset_url", help="a dataset written by `fmrl data ...` (local or s3://)")
    features.add_argument("--out", help="where the tables go (default: <dataset_url>/features)")
    features.add_argument(
        "--text-model", help="local Hugging Face model folder (default: bundled all-MiniLM-L6-v2)"
    )
    features.add_argument("--image-model", default="efficientnet-lite0", help="efficientnet-lite0 or none")
    features.add_argument("--batch-size", type=int, default=32, help="items per encoder batch")
    features.add_argument("--chunk-size", type=int, default=256, help="items per restartable part file")
    features.add_argument(
        "--image-size", type=int, default=224, help="pixels (square) the images are resized to; 224 native"
    )
    _add_storage(features)


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    data = _command(commands, "data", "write datasets as WebDataset shards (local or s3://)")
    writers = data.add_subparsers(dest="data_command", required=True, metavar="WRITER")

    def _writer(name: str, text: str) -> argparse.ArgumentParser:
        writer = _command(writers, name, text)
        writer.add_argument("out_url", help="where the dataset goes (a local folder or s3://bucket/prefix)")
        _add_storage(writer)
        return writer

    synthetic = _writer("prepare-synthetic", "the embedded synthetic catalog: text, images, users")
    synthetic.add_argument("--num-items", type=int, default=2000, help="items in the catalog")
    synthetic.add_argument("--num-users", type=int, default=4000, help="users (one sequence each)")
    synthetic.add_argument("--num-clusters", type=int, default=40, help="item clusters users move between")
    synthetic.add_argument("--min-seq-len", type=int, default=5, help="shortest user sequence")
    synthetic.add_argument("--max-seq-len", type=int, default=30, help="longest user sequence")
    synthetic.add_argument("--seed", type=int, default=0, help="seed of the generator")
    synthetic.add_argument("--image-size", type=int, default=64, help="pixels (square) of the item images")

    scale = _writer(
        "prepare-synthetic-scale",
        "a synthetic catalog at scale: no images, category/brand attributes that drive the users' "
        "transitions, synthetic frozen feature tables (vectorised; millions of items in minutes)",
    )
    scale.add_argument("--num-items", type=int, default=1_000_000, help="items in the catalog")
    scale.add_argument("--num-users", type=int, default=200_000, help="users (one sequence each)")
    scale.add_argument("--num-categories", type=int, default=500, help="item categories (attributes)")
    scale.add_argument(
        "--num-brands", type=int, default=10_000, help="brands (attributes), each in a category"
    )
    scale.add_argument("--min-seq-len", type=int, default=5, help="shortest user sequence")
    scale.add_argument("--max-seq-len", type=int, default=30, help="longest user sequence")
    scale.add_argument("--seed", type=int, default=0, help="seed of the generator")
    scale.add_argument(
        "--text-dim", type=int, default=384, help="width of the synthetic text feature table; 0: none"
    )
    scale.add_argument(
        "--image-dim", type=int, default=0, help="width of the synthetic image feature table; 0: none"
    )

    index = _command(
        writers,
        "index-attributes",
        "add the item-attribute index (two .npy arrays) to an existing data set with attributes, so "
        "every rank maps it instead of parsing all item records",
    )
    index.add_argument("out_url", metavar="DATASET", help="the data set (a local folder or s3://...)")
    _add_storage(index)

    movielens = _writer("convert-movielens", "MovieLens-100k from the recbole wheel (text only)")

    amazon = _writer("convert-amazon", "Amazon 2014 5-core reviews + metadata (+ images)")
    amazon.add_argument("--reviews", required=True, help="reviews_<Category>_5.json.gz")
    amazon.add_argument("--meta", required=True, help="meta_<Category>.json.gz (Python-literal lines)")
    amazon.add_argument("--images", help="folder of item images, named like the imUrl file names")

    p5 = _writer("convert-p5", "the P5/VIP5 preprocessed layout")
    p5.add_argument(
        "--data-dir", required=True, help="folder with datamaps.json, sequential_data.txt, meta.json.gz"
    )
    p5.add_argument("--images", help="folder of item images (needs item2img.json in --data-dir)")

    seqrec = _writer(
        "convert-seqrec",
        "the plain 'user item item ...' format of the SASRec/S3-Rec/LRURec releases (+ attributes)",
    )
    seqrec.add_argument("sequences", help="text file, one user per line: user_id item_id item_id ...")
    seqrec.add_argument(
        "--attributes", help="JSON {item_id: [attribute_id, ...]} (S3-Rec's <name>_item2attributes.json)"
    )
    seqrec.add_argument("--name", help="data set name (default: the file name without extension)")

    # click-through-rate data for DLRM: label, dense features, hashed categorical features
    criteo = _writer("convert-criteo", "Criteo TSV logs (label, 13 integer, 26 hashed categorical features)")
    criteo.add_argument("sources", nargs="+", help="TSV files, in order (gzip allowed)")
    criteo.add_argument(
        "--hash-buckets", required=True, help="rows per categorical table: N for all 26, or N1,...,N26"
    )
    criteo.add_argument("--name", default="criteo", help="data set name")
    criteo.add_argument(
        "--on-error", choices=["raise", "skip"], default="raise", help="bad rows: stop, or skip and count"
    )
    synthetic_ctr = _writer(
        "prepare-synthetic-ctr", "the embedded Criteo-format click data with learnable structure"
    )
    synthetic_ctr.add_argument("--rows", type=int, default=50_000, help="impressions")
    synthetic_ctr.add_argument("--seed", type=int, default=0, help="seed of the generator")
    synthetic_ctr.add_argument("--hash-buckets", default="1000", help="N for all 26, or N1,...,N26")
    synthetic_ctr.add_argument("--max-cardinality", type=int, default=100, help="values per feature, at most")
    synthetic_ctr.add_argument(
        "--third-order", type=float, default=0.0, help="strength (logit std) of a third-order term; 0: off"
    )
    synthetic_ctr.add_argument(
        "--element-cross",
        type=float,
        default=0.0,
        help="strength (logit std) of an element-level dense x latent cross term; 0: off",
    )
    obp = _writer("convert-obp", "Open Bandit Dataset click logs from the obp wheel")
    obp.add_argument(
        "--policy",
        nargs="+",
        choices=["random", "bts"],
        default=["random"],
        help="logging policy; several: their logs in one data set",
    )
    obp.add_argument(
        "--campaign",
        nargs="+",
        choices=["all", "men", "women"],
        default=["all"],
        help="campaign; several: their logs in one data set (all six: --policy random bts "
        "--campaign all men women)",
    )

    for writer, shard_size in ((criteo, 50_000), (synthetic_ctr, 10_000), (obp, 5_000)):
        writer.add_argument("--valid-fraction", type=float, default=0.1, help="rows before the test part")
        writer.add_argument("--test-fraction", type=float, default=0.1, help="the last rows")
        writer.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard")
    synthetic.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    scale.add_argument("--shard-size", type=int, default=50_000, help="samples per shard")
    movielens.add_argument("--min-interactions", type=int, default=5, help="k of the k-core filter")
    movielens.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    for writer in (amazon, p5, seqrec):
        writer.add_argument("--min-interactions", type=int, default=5, help="k of the k-core filter")
        writer.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
        writer.add_argument(
            "--on-error",
            choices=["raise", "skip"],
            default="raise",
            help="bad records: stop, or skip and count",
        )


def undash_overrides(argv: Sequence[str]) -> list[str]:
    """``--train.lr=3e-4`` and ``--train.lr 3e-4`` (the spelling of torchtitan and friends) as the dotted
    override ``train.lr=3e-4``; no option of ``fmrl`` has a dot in its name, so nothing else changes."""
    out: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, sep, value = token[2:].partition("=")
        if token.startswith("--") and "." in name and " " not in name:
            if not sep and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value, sep, i = tokens[i + 1], "=", i + 1
            out.append(f"{name}{sep}{value}")
        else:
            out.append(token)
        i += 1
    return out


# ------------------------------------------------------------------------------------- the commands


def _options(args: argparse.Namespace) -> Any:
    """The storage options of a command that takes URLs: the environment's, with --s3-endpoint-url."""
    import dataclasses

    from data_pipeline.storage import StorageOptions

    options = StorageOptions.from_env()
    if getattr(args, "s3_endpoint_url", None):
        options = dataclasses.replace(options, endpoint_url=args.s3_endpoint_url)
    return options


def print_summary(title: str, rows: Sequence[tuple[str, object]]) -> None:
    """A title and aligned ``label  value`` lines (what a data or feature command did)."""
    print(title)
    width = max((len(label) for label, _ in rows), default=0)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


def _skipped_rows(summary: Any) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    if summary.skipped:
        counts = ", ".join(f"{reason} {count:,}" for reason, count in sorted(summary.skipped.items()))
        rows.append(("skipped", counts))
    if summary.skip_log:
        rows.append(("skip log", summary.skip_log))
    return rows


def summary_rows(summary: Any, seconds: float) -> tuple[str, list[tuple[str, object]]]:
    """The title and rows of a data or feature writer's summary."""
    from data_pipeline.converters import ConversionSummary
    from data_pipeline.ctr import CTRSummary
    from data_pipeline.features import FeaturesSummary
    from data_pipeline.item_index import AttributeIndexSummary
    from data_pipeline.synthetic_shards import SyntheticShardsSummary

    took = ("time", f"{seconds:.1f} s")
    if isinstance(summary, SyntheticShardsSummary):
        title = "synthetic catalog " + ("already there, nothing written" if summary.reused else "written")
        return title, [
            ("dataset", summary.out_url),
            ("items", f"{summary.num_items:,} in {summary.item_shards} shard(s)"),
            ("users", f"{summary.num_users:,} in {summary.user_shards} shard(s)"),
            ("interactions", f"{summary.num_interactions:,}"),
            took,
        ]
    if isinstance(summary, ConversionSummary):
        return f"data set {summary.name} written", [
            ("dataset", summary.out_url),
            ("items", f"{summary.num_items:,} ({summary.num_images:,} with an image)"),
            ("users", f"{summary.num_users:,}"),
            ("interactions", f"{summary.num_interactions:,}"),
            *_skipped_rows(summary),
            took,
        ]
    if isinstance(summary, CTRSummary):
        title = f"click data set {summary.name} " + (
            "already there, nothing written" if summary.reused else "written"
        )
        splits = ", ".join(f"{split} {rows:,}" for split, rows in summary.rows.items())
        buckets = sorted(set(summary.hash_buckets))
        return title, [
            ("dataset", summary.out_url),
            ("impressions", f"{summary.num_rows:,} ({splits})"),
            ("click rate", f"{summary.positive_rate:.4f}"),
            ("tables", f"{len(summary.hash_buckets)}, rows {buckets[0]:,}-{buckets[-1]:,}"),
            *_skipped_rows(summary),
            took,
        ]
    if isinstance(summary, AttributeIndexSummary):
        return "item-attribute index written", [
            ("dataset", summary.dataset),
            ("items", f"{summary.num_items:,}"),
            ("attribute ids", f"{summary.nnz:,} (attributes 1..{summary.num_attributes:,})"),
            ("index", f"{summary.bytes / 2**20:.2f} MiB ({summary.bytes:,} bytes)"),
            took,
        ]
    if isinstance(summary, FeaturesSummary):
        state = (
            "tables written"
            if summary.merged
            else "this rank's chunks written (rank 0 of a single run merges)"
        )
        return f"item features: {state}", [
            ("features", summary.out_url),
            ("items", f"{summary.num_items:,} ({summary.items_encoded:,} encoded now)"),
            ("chunks", f"{summary.chunks_computed} encoded, {summary.chunks_skipped} already there"),
            ("image fallbacks", f"{summary.image_fallbacks:,} (items without a readable image)"),
            took,
        ]
    return type(summary).__name__, [(key, value) for key, value in vars(summary).items()]


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # a wrong key fails here, before torch is imported
    from trainer.train import train

    train(cfg)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from trainer.plan import run_plan

    return run_plan(args)


def _launch(args: argparse.Namespace) -> int:
    from trainer.launch import launch

    return launch(args)


def _config(args: argparse.Namespace) -> int:
    from trainer.config import show_config

    print(show_config(load_config(args.config, args.overrides)), end="")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from trainer.evaluation.saved import evaluate_saved

    options = _options(args) if args.s3_endpoint_url else None  # else the run's data.s3_endpoint_url
    result = evaluate_saved(args.source, args.split, args.overrides, options)
    what = "per nested size, full ranking over all items" if result.task == "fmrl" else "every impression"
    print(f"{args.split} metrics of {args.source} ({what}):\n")
    print(result.table)
    return 0


def _export(args: argparse.Namespace) -> int:
    from trainer.export import export_trained, item_catalog, source_config

    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()] if args.sizes else None
    except ValueError:
        raise UsageError(
            f"--sizes {args.sizes!r}: give comma-separated integers, e.g. --sizes 16,64"
        ) from None
    options = _options(args)
    config = source_config(args.source, options)
    out = args.out or f"{args.source.rstrip('/')}/export"
    catalog = None
    if config.task != "dlrm":
        data_url = config.data.path
        try:  # the items' source ids and popularity come from the data set, when it is there
            catalog = item_catalog(data_url, options)
        except (OSError, ValueError) as error:
            print(
                f"fmrl export: note: without item source ids and popularity ({data_url}: {error})",
                file=sys.stderr,
            )
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else []
    manifest = export_trained(
        args.source, out, sizes, options, catalog, args.overwrite, formats, features=args.features
    )
    if manifest.get("task") == "dlrm":
        print(f"DLRM: {manifest['bytes'] / 2**20:.2f} MiB in {out}")
    for size, entry in manifest.get("sizes", {}).items():
        print(f"size {size:>5}: {entry['bytes'] / 2**20:8.2f} MiB  {entry['folder']}")
    return 0


def _sizes(args: argparse.Namespace) -> int:
    from trainer.sizes import run_sizes

    return run_sizes(args)


def _serve(args: argparse.Namespace) -> int:
    # the service runs in a process of its own that loads torch, the web framework and the export only
    from deploy.options import argv_of

    os.execv(sys.executable, [sys.executable, "-m", "deploy.serve", *argv_of(args)])
    return 1  # not reached: execv replaces this process


def _recommend(args: argparse.Namespace) -> int:
    from trainer.export import ExportError, exported_sizes, load_recommender

    options = _options(args)
    url = args.export.rstrip("/")
    try:
        sizes = exported_sizes(url, options)
    except ExportError:  # a run folder: its export
        if not os.path.exists(os.path.join(url, "export", "export.json")):
            raise
        url, sizes = f"{url}/export", exported_sizes(f"{url}/export", options)
    size = args.size if args.size is not None else sizes[-1]
    if size not in sizes:
        raise UsageError(f"--size {size}: {url} holds sizes {', '.join(map(str, sizes))}")
    recommender = load_recommender(url, size, options)
    by_source = recommender.item_ids is not None and not args.internal_ids
    tokens = [t.strip() for t in args.history.split(",")]
    if tokens == [""]:
        tokens = []  # --history '': no history, the most popular items
    empty = [position for position, token in enumerate(tokens, start=1) if not token]
    if empty:
        raise UsageError(
            f"--history {args.history!r}: entry {empty[0]} is empty: give comma-separated item ids "
            "(or '' for no history)"
        )
    if by_source:
        index = {source_id: n for n, source_id in enumerate(recommender.item_ids) if n > 0}
        unknown = [t for t in tokens if t not in index]
        if unknown:
            raise UsageError(
                f"--history: {', '.join(map(repr, unknown[:5]))} not in the export's {recommender.num_items} "
                "items (source ids from item_ids.json; --internal-ids takes ids 1..N)"
            )
        history = [index[t] for t in tokens]
    else:
        try:
            history = [int(t) for t in tokens]
        except ValueError:
            raise UsageError(
                f"--history {args.history!r}: this export records no source ids; give internal ids 1..N"
                if recommender.item_ids is None
                else f"--history {args.history!r}: --internal-ids takes integers 1..{recommender.num_items}"
            ) from None
    try:
        scores, ids = recommender.recommend([history], k=args.k, exclude_history=not args.include_history)
    except ValueError as error:  # ids out of range, k too large: name the option
        raise UsageError(
            str(error).replace("histories[0]", "--history").replace("k must", "--k must")
        ) from None
    shown = recommender.source_ids(ids)[0] if by_source else [str(int(i)) for i in ids[0]]
    if len(history) > recommender.history_limit:
        print(
            f"note: only the last {recommender.history_limit} of the history's {len(history)} items are "
            "used (the length the model was trained on)"
        )
    print(
        f"top {args.k} of {recommender.num_items} items for a history of {len(history)} (size {size}, {url}):"
    )
    width = max(len("item"), *(len(s) for s in shown))
    print(f"{'rank':>4}  {'item':<{width}}  score")
    for rank, (item, score) in enumerate(zip(shown, scores[0].tolist()), start=1):
        print(f"{rank:>4}  {item:<{width}}  {score:.4f}")
    return 0


def _features(args: argparse.Namespace) -> int:
    from data_pipeline.features import extract_features
    from sharding.world import World

    world = World.from_env()  # under torchrun each rank encodes its own chunks
    start = time.perf_counter()
    summary = extract_features(
        args.dataset_url,
        args.out,
        text_model=args.text_model,
        image_model=args.image_model,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        rank=world.rank,
        world_size=world.world_size,
        image_size=args.image_size,
        options=_options(args),
    )
    print_summary(*summary_rows(summary, time.perf_counter() - start))
    return 0


def _data(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        summary = _run_data_command(args, _options(args))
    except ValueError as error:
        flagged = _in_flag_words(str(error), args)
        if flagged is None:
            raise
        raise UsageError(flagged) from error
    print_summary(*summary_rows(summary, time.perf_counter() - start))
    return 0


_FLAG_OF_ARGUMENT = {"max_samples_per_shard": "shard_size"}
"""The writers' argument names whose command-line option is named otherwise (``--shard-size``)."""


def _in_flag_words(message: str, args: argparse.Namespace) -> str | None:
    """A writer's message about one of its arguments (``num_items must be >= 2, got 1``) in the words
    the user typed (``--num-items must be >= 2, got 1``); None if it names no option of the command."""
    name, space, rest = message.partition(" ")
    dest = _FLAG_OF_ARGUMENT.get(name, name)
    if not space or not name.isidentifier() or dest not in vars(args) or dest in ("out_url", "debug"):
        return None

    def flag(match: re.Match[str]) -> str:  # other options the message names (``>= num_brands (20)``)
        other = _FLAG_OF_ARGUMENT.get(match[0], match[0])
        return f"--{other.replace('_', '-')}" if other in vars(args) and other != "out_url" else match[0]

    return f"--{dest.replace('_', '-')} " + re.sub(r"\b[a-z]+_[a-z0-9_]+\b", flag, rest)


def _run_data_command(args: argparse.Namespace, options: Any) -> object:
    from data_pipeline import converters

    if args.data_command == "prepare-synthetic":
        from data_pipeline.synthetic_shards import prepare_synthetic

        return prepare_synthetic(
            args.out_url,
            num_items=args.num_items,
            num_users=args.num_users,
            num_clusters=args.num_clusters,
            min_seq_len=args.min_seq_len,
            max_seq_len=args.max_seq_len,
            seed=args.seed,
            max_samples_per_shard=args.shard_size,
            image_size=args.image_size,
            options=options,
        )
    if args.data_command == "prepare-synthetic-scale":
        from data_pipeline.synthetic_scale import prepare_synthetic_scale

        return prepare_synthetic_scale(
            args.out_url,
            num_items=args.num_items,
            num_users=args.num_users,
            num_categories=args.num_categories,
            num_brands=args.num_brands,
            min_seq_len=args.min_seq_len,
            max_seq_len=args.max_seq_len,
            seed=args.seed,
            text_dim=args.text_dim,
            image_dim=args.image_dim,
            max_samples_per_shard=args.shard_size,
            options=options,
        )
    if args.data_command == "index-attributes":
        from data_pipeline.loader import index_attributes

        return index_attributes(args.out_url, options)
    if args.data_command == "convert-movielens":
        return converters.convert_movielens(
            args.out_url,
            max_samples_per_shard=args.shard_size,
            min_interactions=args.min_interactions,
            options=options,
        )
    if args.data_command == "convert-amazon":
        return converters.convert_amazon(
            args.out_url,
            args.reviews,
            args.meta,
            images_dir=args.images,
            max_samples_per_shard=args.shard_size,
            min_interactions=args.min_interactions,
            on_error=args.on_error,
            options=options,
        )
    if args.data_command == "convert-seqrec":
        return converters.convert_seqrec(
            args.out_url,
            args.sequences,
            attributes_path=args.attributes,
            max_samples_per_shard=args.shard_size,
            min_interactions=args.min_interactions,
            on_error=args.on_error,
            name=args.name,
            options=options,
        )
    if args.data_command in ("convert-criteo", "prepare-synthetic-ctr", "convert-obp"):
        return _run_ctr_command(args, options)
    return converters.convert_p5(
        args.out_url,
        args.data_dir,
        images_dir=args.images,
        max_samples_per_shard=args.shard_size,
        min_interactions=args.min_interactions,
        on_error=args.on_error,
        options=options,
    )


def _hash_buckets(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--hash-buckets {text!r}: give N, or N1,...,N26 (integers)") from None
    return values[0] if len(values) == 1 else values


def _run_ctr_command(args: argparse.Namespace, options: Any) -> object:
    split = {
        "valid_fraction": args.valid_fraction,
        "test_fraction": args.test_fraction,
        "max_samples_per_shard": args.shard_size,
        "options": options,
    }
    if args.data_command == "convert-obp":
        from data_pipeline.obp import convert_obp

        return convert_obp(args.out_url, policy=args.policy, campaign=args.campaign, **split)
    from data_pipeline.criteo import convert_criteo
    from data_pipeline.synthetic_ctr import prepare_synthetic_ctr

    if args.data_command == "convert-criteo":
        return convert_criteo(
            args.out_url,
            args.sources,
            hash_buckets=_hash_buckets(args.hash_buckets),
            on_error=args.on_error,
            name=args.name,
            **split,
        )
    return prepare_synthetic_ctr(
        args.out_url,
        rows=args.rows,
        seed=args.seed,
        hash_buckets=_hash_buckets(args.hash_buckets),
        max_cardinality=args.max_cardinality,
        third_order=args.third_order,
        element_cross=args.element_cross,
        **split,
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train,
    "launch": _launch,
    "plan": _plan,
    "config": _config,
    "eval": _eval,
    "export": _export,
    "recommend": _recommend,
    "sizes": _sizes,
    "serve": _serve,
    "features": _features,
    "data": _data,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(undash_overrides(sys.argv[1:] if argv is None else argv))
    if extra:  # overrides after an option (`fmrl eval RUN --split valid eval.max_users=9`) come back here
        if not hasattr(args, "overrides") or any(token.startswith("-") for token in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    configure_logging(debug=args.debug)
    name = " ".join(
        part
        for part in (args.command, getattr(args, "config_command", ""), getattr(args, "data_command", ""))
        if part
    )
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"fmrl {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        return report_failure(name, error, args.debug)


def _add_export_format_option(export: argparse.ArgumentParser) -> None:
    export.add_argument(
        "--formats",
        help="also write portable programs of each size: pt2 (torch.export), onnx (onnxruntime); e.g. pt2,onnx",
    )


def _add_sizes_command(commands: argparse._SubParsersAction) -> None:
    sizes = _command(
        commands, "sizes", "cost and quality of every exported size; the largest size that fits a budget"
    )
    sizes.add_argument("source", help="a run folder (its export/) or an export folder")
    sizes.add_argument("--max-latency-ms", type=float, help="budget: p99 latency of one user's query")
    sizes.add_argument("--max-memory-mb", type=float, help="budget: trunk + item table in MB")
    sizes.add_argument("--min-ndcg", type=float, help="budget: the least test NDCG@10")
    sizes.add_argument("--quantised", action="store_true", help="budget with the int8 item table")
    sizes.add_argument(
        "--repeats", type=_positive_int, default=30, help="timed queries per size (one user); at least 1"
    )
    sizes.add_argument(
        "--max-users", type=int, default=2000, help="test users for the int8 NDCG check (-1: skip it)"
    )
    sizes.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    sizes.add_argument("--out", help="where sizes.json and sizes.png go (default: the export folder)")


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (else argparse's one-line error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least 1")
    return value


def _add_serve_command(commands: argparse._SubParsersAction) -> None:
    from deploy.options import add_arguments

    serve = _command(
        commands,
        "serve",
        "serve recommendations of an export over HTTP (POST /recommend, GET /health, /ready, /info)",
    )
    add_arguments(serve)


def run() -> NoReturn:
    """The ``fmrl`` command and ``python -m trainer.cli``: ``main``, ended as trainer/process_exit.py says."""
    run_as_process(main)


if __name__ == "__main__":
    run()
