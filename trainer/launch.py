"""``fmrl launch``: start ``fmrl train`` on several processes with torchrun, and say how to do the same
with torchrun by hand or with SLURM.

    fmrl launch --config configs/demo.yaml train.epochs=5                 # this machine, default processes
    fmrl launch --nproc 4 --config configs/demo.yaml                      # 4 processes on this machine
    fmrl launch --nnodes 2 --rdzv-endpoint node1:29500 --config ...       # on each of 2 nodes
    fmrl launch --dry-run ...                                             # print the commands, run nothing

Before it starts anything it prints the torchrun command it runs (copy it to run by hand) and the
equivalent ``sbatch`` submission of ``slurm/train.sbatch``; then it replaces itself with torchrun
(``exec``), so the exit code, signals (Ctrl-C, SIGTERM from a scheduler) and output are torchrun's own.
torchrun forwards SIGTERM to the workers at once; each stops at its next step boundary with a committed
checkpoint within ``run.stop_grace_s`` (trainer/preemption.py), and torchrun then exits 1.

Processes per node (``--nproc``), by default: one per visible GPU when CUDA is available; on CPU two
(the layout the demo is sized for: TorchRec puts the text and image tables on one rank each, FSDP2
shards the trunk over both), or one on a machine with a single core. On CPU every process should have
cores of its own: ``train.num_threads=0`` splits them evenly between the local processes.

One node runs ``torchrun --standalone`` (a private rendezvous on a free port). Several nodes
(``--nnodes M``) use a c10d rendezvous at ``--rdzv-endpoint``: run the same ``fmrl launch`` on every node;
the first one started on the endpoint's host hosts the rendezvous store. They get
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: by default torchrun lets the workers share the rendezvous
store of the first round, and a node that is restarted on its own (a replaced node, its agent killed)
can then never rejoin (its restart count and the store's address differ from the survivors'; see
tests/integration/test_multinode.py); with it, every rendezvous round hands out a fresh store.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from trainer.config import load_config

SBATCH_TEMPLATE = "slurm/train.sbatch"


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_nproc(gpus: int) -> int:
    """One process per GPU with CUDA, else 2 (1 on a single-core machine); see the module docstring."""
    return gpus if gpus > 0 else min(2, os.cpu_count() or 1)


def train_arguments(config: str | None, overrides: list[str]) -> list[str]:
    return ["-m", "trainer.cli", "train", *(["--config", config] if config else []), *overrides]


def torchrun_command(args: argparse.Namespace, nproc: int) -> tuple[list[str], dict[str, str]]:
    """The torchrun command line of this node and the environment variables it needs on top."""
    command = [sys.executable, "-m", "torch.distributed.run"]
    env: dict[str, str] = {}
    if args.nnodes == 1 and not args.rdzv_endpoint:
        command += ["--standalone", f"--nproc-per-node={nproc}"]
    else:
        command += [
            f"--nnodes={args.nnodes}",
            f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.rdzv_endpoint}",
            f"--rdzv-id={args.rdzv_id}",
        ]
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # see the module docstring
    if args.max_restarts:
        command.append(f"--max-restarts={args.max_restarts}")
    return command + train_arguments(args.config, args.overrides), env


def sbatch_command(args: argparse.Namespace, nproc: int, gpus_per_node: int = 0) -> str:
    """The submission of slurm/train.sbatch that runs the same training: the template reads CONFIG and
    NPROC_PER_NODE from the environment and passes its trailing KEY=VALUE arguments to ``fmrl train``
    (it adds run.name, run.resume=auto and run.stop_file itself, and the rendezvous on its first node).
    GPUs are asked for when the processes are the GPUs of this machine; CPUs, time limit and partition
    are the cluster's business (sbatch options before the script)."""
    env = [f"CONFIG={shlex.quote(args.config or 'configs/demo.yaml')}", f"NPROC_PER_NODE={nproc}"]
    if args.max_restarts:
        env.append(f"MAX_RESTARTS={args.max_restarts}")
    gpus = [f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    sbatch = ["sbatch", f"--nodes={args.nnodes}", *gpus, SBATCH_TEMPLATE, *args.overrides]
    # sbatch does not create the folder of the job log (--output=runs/slurm/%x-%j.out)
    return "mkdir -p runs/slurm && " + " ".join(env) + " " + shlex.join(sbatch)


def shell_line(command: list[str], env: dict[str, str]) -> str:
    prefix = " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items())
    return (prefix + " " if prefix else "") + shlex.join(command)


def launch(args: argparse.Namespace) -> int:
    """Print the commands, then exec torchrun (or return 0 with ``--dry-run``). A usage error raises
    (ValueError, ConfigError): ``fmrl`` reports it, exit code 2."""
    if args.nnodes < 1 or (args.nproc is not None and args.nproc < 1):
        raise ValueError("--nnodes and --nproc must be at least 1")
    if args.nnodes > 1 and not args.rdzv_endpoint:
        raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (on the first node)")
    load_config(args.config, args.overrides)  # a wrong key or file fails here, once, not in every process
    gpus = 0 if args.nproc is not None else local_gpus()
    nproc = args.nproc if args.nproc is not None else default_nproc(gpus)
    command, env = torchrun_command(args, nproc)
    where = f"on each of the {args.nnodes} nodes" if args.nnodes > 1 else "on this machine"
    print(f"torchrun ({nproc} process(es) {where}):\n  {shell_line(command, env)}")
    print(f"sbatch ({SBATCH_TEMPLATE}):\n  {sbatch_command(args, nproc, gpus)}", flush=True)
    if not args.config:
        print(f"  ({SBATCH_TEMPLATE} always passes a config file: CONFIG, by default configs/demo.yaml)")
    if args.dry_run:
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, {**os.environ, **env})
    return 1  # not reached
