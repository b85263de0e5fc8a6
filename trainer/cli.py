"""The ``fmrl`` command.

    fmrl train --config configs/demo.yaml [KEY=VALUE ...]
    fmrl plan --config C --num-items 100000000 --world-size 64,128,256,512 [--device h100|a100|cpu]
    fmrl launch [--nproc N] [--nnodes M --rdzv-endpoint HOST:PORT] [--dry-run] --config ... [KEY=VALUE ...]
    fmrl data prepare-synthetic OUT_URL [--num-items 2000 --num-users 4000 ...]
    fmrl data prepare-synthetic-scale OUT_URL [--num-items 1000000 --num-categories 500 --num-brands 10000]
    fmrl data convert-movielens OUT_URL
    fmrl data prepare-synthetic-ctr OUT_URL [--rows 50000]      (DLRM; also convert-criteo, convert-obp)
    fmrl data convert-amazon OUT_URL --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz [--images DIR]
    fmrl data convert-p5 OUT_URL --data-dir data/beauty [--images photos/beauty]
    fmrl data convert-seqrec OUT_URL Beauty.txt [--attributes Beauty_item2attributes.json]

OUT_URL is a local path or an s3:// URL (endpoint and credentials from the environment, docs/storage.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from trainer.config import ConfigError, load_config
from trainer.logs import configure_logging
from trainer.process_exit import run_as_process


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmrl", description="Train and evaluate Matryoshka recommenders.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train fMRL-LRU and report test metrics per nested size")
    train.add_argument("--config", help="YAML config file (default: built-in defaults)")
    train.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=3e-4"
    )
    _add_launch_command(commands)
    _add_plan_command(commands)
    _add_data_commands(commands)
    export = commands.add_parser(
        "export",
        help="write a standalone model (fMRL: at each nested size; DLRM: whole) of a finished run or a "
        "checkpoint",
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
    features = commands.add_parser(
        "features", help="encode item text and images of a dataset into frozen feature tables"
    )
    features.add_argument("dataset_url", help="a dataset written by `fmrl data ...` (local or s3://)")
    features.add_argument("--out", help="where the tables go (default: <dataset_url>/features)")
    features.add_argument(
        "--text-model", help="local Hugging Face model folder (default: bundled all-MiniLM-L6-v2)"
    )
    features.add_argument("--image-model", default="efficientnet-lite0", help="efficientnet-lite0 or none")
    features.add_argument("--batch-size", type=int, default=32)
    features.add_argument("--chunk-size", type=int, default=256, help="items per restartable part file")
    features.add_argument(
        "--image-size", type=int, default=224, help="pixels (square) the images are resized to; 224 native"
    )
    return parser


def _add_launch_command(commands: argparse._SubParsersAction) -> None:
    launch = commands.add_parser(
        "launch",
        help="run `fmrl train` on several processes with torchrun (prints the torchrun and sbatch commands)",
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
    launch.add_argument("--config", help="YAML config file (default: built-in defaults)")
    launch.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for `fmrl train`")


def _add_plan_command(commands: argparse._SubParsersAction) -> None:
    from trainer.plan import DEVICES

    plan = commands.add_parser(
        "plan",
        help="TorchRec's plan of the item tables on a simulated cluster: sharding, per-rank memory, UVM "
        "caching, trunk memory, checkpoint size",
    )
    plan.add_argument("--config", help="YAML config file (default: built-in defaults)")
    plan.add_argument("--num-items", type=int, required=True)
    plan.add_argument("--world-size", required=True, help="ranks, comma-separated, e.g. 64,128,256,512")
    plan.add_argument("--device", choices=sorted(DEVICES), default="h100", help="hardware preset")
    plan.add_argument("--hbm-gb", type=float, help="device memory per GPU, GiB (default: the preset's)")
    plan.add_argument("--ddr-gb", type=float, help="host memory per node, GiB (default: the preset's)")
    plan.add_argument("--ranks-per-node", type=int, help="GPUs (ranks) per node (default: the preset's)")
    plan.add_argument("--text-dim", type=int, default=384, help="text feature width (MiniLM: 384); 0: none")
    plan.add_argument(
        "--image-dim", type=int, default=1280, help="image feature width (EfficientNet: 1280); 0: none"
    )
    plan.add_argument(
        "--num-attributes",
        type=int,
        default=100_000,
        help="rows of the attribute table (model.use_attributes)",
    )
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="write datasets as WebDataset shards (local or s3://)")
    writers = data.add_subparsers(dest="data_command", required=True)

    synthetic = writers.add_parser(
        "prepare-synthetic", help="the embedded synthetic catalog: text, images, users"
    )
    synthetic.add_argument("out_url")
    synthetic.add_argument("--num-items", type=int, default=2000)
    synthetic.add_argument("--num-users", type=int, default=4000)
    synthetic.add_argument("--num-clusters", type=int, default=40)
    synthetic.add_argument("--min-seq-len", type=int, default=5)
    synthetic.add_argument("--max-seq-len", type=int, default=30)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
    _add_synthetic_scale_command(writers)

    movielens = writers.add_parser(
        "convert-movielens", help="MovieLens-100k from the recbole wheel (text only)"
    )
    movielens.add_argument("out_url")
    movielens.add_argument("--min-interactions", type=int, default=5, help="k of the k-core filter")
    movielens.add_argument("--shard-size", type=int, default=1000)

    amazon = writers.add_parser("convert-amazon", help="Amazon 2014 5-core reviews + metadata (+ images)")
    amazon.add_argument("out_url")
    amazon.add_argument("--reviews", required=True, help="reviews_<Category>_5.json.gz")
    amazon.add_argument("--meta", required=True, help="meta_<Category>.json.gz (Python-literal lines)")
    amazon.add_argument("--images", help="folder of item images, named like the imUrl file names")

    p5 = writers.add_parser("convert-p5", help="the P5/VIP5 preprocessed layout")
    p5.add_argument("out_url")
    p5.add_argument(
        "--data-dir", required=True, help="folder with datamaps.json, sequential_data.txt, meta.json.gz"
    )
    p5.add_argument("--images", help="folder of item images (needs item2img.json in --data-dir)")

    seqrec = writers.add_parser(
        "convert-seqrec",
        help="the plain 'user item item ...' format of the SASRec/S3-Rec/LRURec releases (+ attributes)",
    )
    seqrec.add_argument("out_url")
    seqrec.add_argument("sequences", help="text file, one user per line: user_id item_id item_id ...")
    seqrec.add_argument(
        "--attributes", help="JSON {item_id: [attribute_id, ...]} (S3-Rec's <name>_item2attributes.json)"
    )
    seqrec.add_argument("--name", help="data set name (default: the file name without extension)")

    # click-through-rate data for DLRM: label, dense features, hashed categorical features
    criteo = writers.add_parser(
        "convert-criteo", help="Criteo TSV logs (label, 13 integer, 26 hashed categorical features)"
    )
    criteo.add_argument("out_url")
    criteo.add_argument("sources", nargs="+", help="TSV files, in order (gzip allowed)")
    criteo.add_argument(
        "--hash-buckets", required=True, help="rows per categorical table: N for all 26, or N1,...,N26"
    )
    criteo.add_argument("--name", default="criteo")
    criteo.add_argument(
        "--on-error", choices=["raise", "skip"], default="raise", help="bad rows: stop, or skip and count"
    )
    synthetic_ctr = writers.add_parser(
        "prepare-synthetic-ctr", help="the embedded Criteo-format click data with learnable structure"
    )
    synthetic_ctr.add_argument("out_url")
    synthetic_ctr.add_argument("--rows", type=int, default=50_000)
    synthetic_ctr.add_argument("--seed", type=int, default=0)
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
    obp = writers.add_parser("convert-obp", help="Open Bandit Dataset click logs from the obp wheel")
    obp.add_argument("out_url")
    obp.add_argument("--policy", choices=["random", "bts"], default="random")
    obp.add_argument("--campaign", choices=["all", "men", "women"], default="all")
    for writer, shard_size in ((criteo, 50_000), (synthetic_ctr, 10_000), (obp, 5_000)):
        writer.add_argument("--valid-fraction", type=float, default=0.1, help="rows before the test part")
        writer.add_argument("--test-fraction", type=float, default=0.1, help="the last rows")
        writer.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard")

    for writer in (amazon, p5, seqrec):
        writer.add_argument("--min-interactions", type=int, default=5, help="k of the k-core filter")
        writer.add_argument("--shard-size", type=int, default=1000)
        writer.add_argument(
            "--on-error",
            choices=["raise", "skip"],
            default="raise",
            help="bad records: stop, or skip and count",
        )


def _add_synthetic_scale_command(writers: argparse._SubParsersAction) -> None:
    scale = writers.add_parser(
        "prepare-synthetic-scale",
        help="a synthetic catalog at scale: no images, category/brand attributes that drive the users' "
        "transitions, synthetic frozen feature tables (vectorised; millions of items in minutes)",
    )
    scale.add_argument("out_url")
    scale.add_argument("--num-items", type=int, default=1_000_000)
    scale.add_argument("--num-users", type=int, default=200_000)
    scale.add_argument("--num-categories", type=int, default=500, help="item categories (attributes)")
    scale.add_argument(
        "--num-brands", type=int, default=10_000, help="brands (attributes), each in a category"
    )
    scale.add_argument("--min-seq-len", type=int, default=5)
    scale.add_argument("--max-seq-len", type=int, default=30)
    scale.add_argument("--seed", type=int, default=0)
    scale.add_argument(
        "--text-dim", type=int, default=384, help="width of the synthetic text feature table; 0: none"
    )
    scale.add_argument(
        "--image-dim", type=int, default=0, help="width of the synthetic image feature table; 0: none"
    )
    scale.add_argument("--shard-size", type=int, default=50_000, help="samples per shard")


def _run_data_command(args: argparse.Namespace) -> None:
    from data_pipeline import converters

    if args.data_command == "prepare-synthetic":
        from data_pipeline.synthetic_shards import prepare_synthetic

        summary = prepare_synthetic(
            args.out_url,
            num_items=args.num_items,
            num_users=args.num_users,
            num_clusters=args.num_clusters,
            min_seq_len=args.min_seq_len,
            max_seq_len=args.max_seq_len,
            seed=args.seed,
            max_samples_per_shard=args.shard_size,
            image_size=args.image_size,
        )
    elif args.data_command == "prepare-synthetic-scale":
        from data_pipeline.synthetic_scale import prepare_synthetic_scale

        summary = prepare_synthetic_scale(
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
        )
    elif args.data_command == "convert-movielens":
        summary = converters.convert_movielens(
            args.out_url, max_samples_per_shard=args.shard_size, min_interactions=args.min_interactions
        )
    elif args.data_command == "convert-amazon":
        summary = converters.convert_amazon(
            args.out_url,
            args.reviews,
            args.meta,
            images_dir=args.images,
            max_samples_per_shard=args.shard_size,
            min_interactions=args.min_interactions,
            on_error=args.on_error,
        )
    elif args.data_command == "convert-seqrec":
        summary = converters.convert_seqrec(
            args.out_url,
            args.sequences,
            attributes_path=args.attributes,
            max_samples_per_shard=args.shard_size,
            min_interactions=args.min_interactions,
            on_error=args.on_error,
            name=args.name,
        )
    elif args.data_command in ("convert-criteo", "prepare-synthetic-ctr", "convert-obp"):
        summary = _run_ctr_command(args)
    else:
        summary = converters.convert_p5(
            args.out_url,
            args.data_dir,
            images_dir=args.images,
            max_samples_per_shard=args.shard_size,
            min_interactions=args.min_interactions,
            on_error=args.on_error,
        )
    print(summary)


def _hash_buckets(text: str) -> int | list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    return values[0] if len(values) == 1 else values


def _run_ctr_command(args: argparse.Namespace) -> object:
    split = {
        "valid_fraction": args.valid_fraction,
        "test_fraction": args.test_fraction,
        "max_samples_per_shard": args.shard_size,
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.command == "features":
        from data_pipeline.features import extract_features
        from data_pipeline.storage import StorageError
        from sharding.world import World

        world = World.from_env()  # under torchrun each rank encodes its own chunks
        try:
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
            )
        except (StorageError, ValueError) as error:
            print(f"fmrl features: {error}", file=sys.stderr)
            return 2
        print(summary)
        return 0
    if args.command == "export":
        from data_pipeline.storage import StorageError, StorageOptions
        from models.dlrm import DLRM
        from trainer.checkpoint import CheckpointError
        from trainer.export import ExportError, export_model, item_catalog, load_model, source_config

        try:
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()] if args.sizes else None
            options = StorageOptions.from_env()
            model = load_model(args.source, options, features=args.features)
            out = args.out or f"{args.source.rstrip('/')}/export"
            catalog = None
            if not isinstance(model, DLRM):
                data_url = source_config(args.source, options).data.path
                try:  # the items' source ids and popularity come from the data set, when it is there
                    catalog = item_catalog(data_url, options)
                except (OSError, ValueError) as error:
                    print(
                        f"fmrl export: note: without item source ids and popularity ({data_url}: {error})",
                        file=sys.stderr,
                    )
            manifest = export_model(model, out, sizes, options, catalog, overwrite=args.overwrite)
        except (CheckpointError, ExportError, StorageError, ValueError) as error:
            print(f"fmrl export: {error}", file=sys.stderr)
            return 2
        if manifest.get("task") == "dlrm":
            print(f"DLRM: {manifest['bytes'] / 2**20:.2f} MiB in {out}")
        for size, entry in manifest.get("sizes", {}).items():
            print(f"size {size:>5}: {entry['bytes'] / 2**20:8.2f} MiB  {entry['folder']}")
        return 0
    if args.command == "plan":
        from trainer.plan import run_plan

        return run_plan(args)
    if args.command == "launch":
        from trainer.launch import launch

        return launch(args)
    if args.command == "data":
        from data_pipeline.converters import ConversionError
        from data_pipeline.storage import StorageError

        try:
            _run_data_command(args)
        except (ConversionError, StorageError, ValueError) as error:
            print(f"fmrl data: {error}", file=sys.stderr)
            return 2
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"fmrl: config error: {error}", file=sys.stderr)
        return 2
    if args.command == "train":
        from trainer.train import train

        train(cfg)
    return 0


def run() -> NoReturn:
    """The ``fmrl`` command and ``python -m trainer.cli``: ``main``, ended as trainer/process_exit.py says."""
    run_as_process(main)


if __name__ == "__main__":
    run()
