"""The bench scripts run end to end in their --quick mode (smoke tests; their numbers are not checked),
and --no-write leaves docs/benchmarks.md alone.

.venv/bin/python -m pytest -q tests/integration/test_bench.py
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_quick(tmp_path, script: str, *args: str, timeout: int = 180) -> str:
    """stdout of ``bench/<script> --quick --no-write``; fails if it exits non-zero or writes anything."""
    output = tmp_path / "benchmarks.md"
    command = [
        sys.executable,
        os.path.join(REPO, "bench", script),
        "--quick",
        "--no-write",
        "--output",
        str(output),
    ]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    assert not output.exists(), "--no-write must not write the section"
    return done.stdout


def test_data_bench_prints_every_table(tmp_path):
    out = run_quick(tmp_path, "data.py")
    for heading in (
        "<!-- bench/data.py:begin -->",
        "### Training loader",
        "| storage | workers | samples/s |",
        "### Item shards",
        "### Feature extraction",
        "### Training consumption (demo) and the 10x requirement",
        "### 1M-item generation",
        "<!-- bench/data.py:end -->",
    ):
        assert heading in out, heading
    for storage in ("| local | 0 |", "| local | 2 |", "| S3 (moto) | 0 |", "| S3 (moto) | 2 |"):
        assert storage in out, storage
    assert "sequences/s" in out and "items/s" in out


def test_scaling_bench_prints_the_table(tmp_path):
    out = run_quick(tmp_path, "scaling.py", "--backends", "fsdp2")
    assert (
        "| backend | ranks | threads/rank | ms/step, median (range) | sequences/s | peak RSS per rank (MiB) |"
        in out
    )
    assert "| fsdp2 | 1 | 2 |" in out and "| fsdp2 | 2 | 1 |" in out
    assert "<!-- bench/scaling.py:begin -->" in out and "<!-- bench/scaling.py:end -->" in out


def test_checkpoint_bench_prints_the_table(tmp_path):
    out = run_quick(tmp_path, "checkpoint.py")
    assert "<!-- bench/checkpoint.py:begin -->" in out and "<!-- bench/checkpoint.py:end -->" in out
    assert "## Checkpoints: save and load (`bench/checkpoint.py`)" in out
    assert "| config | ranks | storage | MB (files) | sync save | load |" in out
    assert "| demo | 1 | local disk |" in out and "| demo | 1 | S3 (moto) |" in out
    assert "The loaded weights equal the saved ones." in out


def test_dlrm_bench_prints_the_tables(tmp_path):
    out = run_quick(tmp_path, "dlrm.py")
    assert "<!-- bench/dlrm.py:begin -->" in out and "<!-- bench/dlrm.py:end -->" in out
    assert (
        "| implementation | ranks | threads/rank | ms/step, median (range) | samples/s | peak RSS per rank (MiB) |"
        in out
    )
    assert "| implementation | ranks | train loss, last pass | test AUC | test log loss | NE |" in out
    section = out[out.index("<!-- bench/dlrm.py:begin -->") :]
    for implementation in ("ours (FSDP2)", "TorchRec DLRM (DDP)"):
        for ranks, threads in ((1, 2), (2, 1)):
            assert f"| {implementation} | {ranks} | {threads} |" in section, (implementation, ranks)  # speed
            assert section.count(f"| {implementation} | {ranks} |") == 2, (implementation, ranks)  # + AUC


def test_cli_bench_prints_its_table(tmp_path):
    out = run_quick(tmp_path, "cli.py")
    assert "<!-- bench/cli.py:begin -->" in out and "<!-- bench/cli.py:end -->" in out
    for row in ("| `fmrl --help` |", "| config typo: ", "| reference: `python -c 'import torch'` |"):
        assert row in out


def _tiny_export(tmp_path) -> str:
    """An export of an untrained model (300 items, sizes 8 and 32) with its catalog."""
    import torch

    from models.fmrl import FMRLConfig, FMRLRec
    from trainer.export import ItemCatalog, export_model

    torch.manual_seed(0)
    model = FMRLRec(FMRLConfig(nested_sizes=[8, 32], num_blocks=1, use_id_embedding=True), 300).eval()
    popularity = torch.arange(301, dtype=torch.float32)
    out = str(tmp_path / "export")
    export_model(
        model, out, [8, 32], catalog=ItemCatalog([""] + [f"i{n}" for n in range(1, 301)], popularity)
    )
    return out


def test_funnel_and_serve_benches_print_their_tables(tmp_path):
    export = _tiny_export(tmp_path)
    env = {**os.environ, "PYTHONPATH": REPO}
    funnel = [sys.executable, os.path.join(REPO, "bench", "funnel.py"), export, "--size", "32"]
    funnel += [
        "--items",
        "0,600",
        "--prefixes",
        "8",
        "--candidates",
        "300",
        "--queries",
        "8",
        "--repeats",
        "1",
    ]
    out = subprocess.run(
        funnel, capture_output=True, text=True, timeout=180, cwd=REPO, env=env, check=True
    ).stdout
    # a shortlist of the whole catalog re-ranked at full size is the exact answer, with or without the index
    assert "| 300 | export | funnel 8 -> 300 | 1.000 |" in out
    assert "| 300 | export | HNSW 8 -> 300" in out and "| 600 | synthetic | exact | 1.000 |" in out
    serve = [sys.executable, os.path.join(REPO, "bench", "serve.py"), export, "--sizes", "8"]
    serve += ["--clients", "2", "--seconds", "1"]
    out = subprocess.run(
        serve, capture_output=True, text=True, timeout=180, cwd=REPO, env=env, check=True
    ).stdout
    row = next(line for line in out.splitlines() if line.startswith("| 8 |"))
    assert row.endswith("| 0 |") and int(row.split("|")[2]) > 0  # no errors, some requests answered


def test_ctr_models_bench_prints_the_table_and_the_claims(tmp_path):
    out = run_quick(tmp_path, "ctr_models.py", timeout=600)  # 2 torchrun jobs training 7 models each
    assert "<!-- bench/ctr_models.py:begin -->" in out and "<!-- bench/ctr_models.py:end -->" in out
    section = out[out.index("<!-- bench/ctr_models.py:begin -->") :]
    header = (
        "| model | table params | dense params | MFLOPs/sample | samples/s, 1 rank | samples/s, 2 ranks |"
    )
    assert header in section
    for model in (
        "DLRM",
        "Wide & Deep",
        "Wide & Deep + true crosses",
        "DeepFM",
        "DCN (v1)",
        "DCN v2",
        "xDeepFM",
    ):
        assert f"| {model} | " in section, model
    assert "| claim (DLRM paper, §2–3) | measured here | verdict |" in section
    for claim in ("most computationally efficient", "the CIN is the most expensive", "hand-made crosses"):
        assert claim in section, claim


def test_ctr_models_datasets_replaces_only_the_open_bandit_columns(tmp_path, bench_script):
    """``--datasets obp``: the OBP columns and data phrase are replaced, everything else stays; a rerun
    replaces its note instead of adding one; other data sets are refused (the claims rest on them)."""
    ctr_models = bench_script("ctr_models")
    models = [key for key in ctr_models.MODELS if key != "wide_deep+crosses"]
    old_row = (
        "| DLRM | 1 | 2 | 0.1 | 3 | 4 | 0.7000 | 0.6000 | 0.3740 ± 0.4099 | 0.5 | 0.9 | 0.95 | 15.4447 |"
    )
    section = "\n".join(
        [
            ctr_models.BEGIN,
            "Data: synthetic ...; Open Bandit random/all, 8,000 / 1,000 (1 test clicks). 1 pass(es) ...",
            "",
            "| model | table params | dense params | MFLOPs/sample | samples/s, 1 rank | samples/s, 2 ranks |"
            " AUC synthetic | AUC + higher order | AUC Open Bandit | log loss synthetic |"
            " NE synthetic | NE + higher order | NE Open Bandit |",
            "|" + "---|" * 13,
            old_row,
            "",
            ctr_models.END,
        ]
    )
    acc = {
        f"obp/{key}": [dict(auc=0.6, logloss=0.02, ne=0.98), dict(auc=0.62, logloss=0.02, ne=0.96)]
        for key in models
    }
    meta = {"obp": dict(rows={"train": 48_000, "test": 6000}, test_positives=31)}
    new = ctr_models.replace_columns(section, acc, meta, "python bench/ctr_models.py --datasets obp", 60.0)
    assert (
        "| DLRM | 1 | 2 | 0.1 | 3 | 4 | 0.7000 | 0.6000 | 0.6100 ± 0.0141 | 0.5 | 0.9 | 0.95 | 0.9700 ± 0.0141 |"
        in new
    )
    assert "random/all" not in new and "48,000 train / 6,000 test impressions (31 test clicks). 1 pass" in new
    assert "Columns AUC Open Bandit, NE Open Bandit: `python bench/ctr_models.py --datasets obp`" in new
    assert (
        ctr_models.replace_columns(new, acc, meta, "python bench/ctr_models.py --datasets obp", 60.0) == new
    )
    script = os.path.join(REPO, "bench", "ctr_models.py")
    done = subprocess.run(
        [sys.executable, script, "--datasets", "synthetic"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 2 and "only `--datasets obp`" in done.stderr


def test_scale_benches_report_what_has_run(tmp_path):
    """--report-only writes the table of the runs found (none in a fresh clone) between its markers."""
    for script, header in (
        (
            "scale_runs.py",
            "| run | ranks | trainable params | steps (epochs) | steps/s | peak RSS per rank |",
        ),
        ("sampled_softmax.py", "| loss | NDCG@10 | Recall@10 | NDCG@10 / full | epochs (best) |"),
    ):
        output = tmp_path / f"{script}.md"
        output.write_text("# doc\n\nkept\n")
        command = [
            sys.executable,
            os.path.join(REPO, "bench", script),
            "--report-only",
            "--output",
            str(output),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
        assert done.returncode == 0, done.stderr[-3000:]
        text = output.read_text()
        assert text.startswith("# doc\n\nkept\n") and header in text, text
        assert f"<!-- bench/{script}:begin -->" in text and f"<!-- bench/{script}:end -->" in text


def test_serve_load_bench_mixes_long_and_bad_requests_and_writes_nothing_with_no_write(tmp_path):
    record = tmp_path / "load.json"
    command = [sys.executable, os.path.join(REPO, "bench", "serve_load.py"), "--make-export"]
    command += [str(tmp_path / "export"), "--clients", "1", "--seconds", "1", "--max-requests", "20"]
    command += ["--no-write", "--record", str(record), "--output", str(tmp_path / "deploy.md")]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=180, cwd=REPO, env=env, check=True
    ).stdout
    alone = next(line for line in out.splitlines() if line.startswith("| alone |"))
    mixed = next(line for line in out.splitlines() if line.startswith("| mixed |"))
    assert alone.split("|")[5].strip() == "0" and mixed.split("|")[5].strip() == "0"  # no normal errors
    assert "422" in mixed.split("|")[7]  # the bad requests were refused, not answered
    assert not record.exists() and not (tmp_path / "deploy.md").exists()


def _files_under(*paths: str) -> list[tuple[str, list[str], list[str]]]:
    return [entry for path in paths for entry in sorted(os.walk(path))]


def test_gpu_smoke_without_cuda_says_so_exits_0_and_writes_nothing():
    """With no GPU visible the script only says that it needs CUDA: no catalog, no run, no record."""
    defaults = (
        os.path.join(REPO, "runs", "bench", "gpu-smoke"),
        os.path.join(REPO, "bench", "results", "gpu"),
    )
    before = _files_under(*defaults)
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "gpu_smoke.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "needs CUDA" in done.stdout and "nothing run or written" in done.stdout, done.stdout
    assert _files_under(*defaults) == before


def test_gpu_smoke_flops_and_mfu_match_a_hand_count(bench_script):
    gpu_smoke = bench_script("gpu_smoke")
    # sizes (2, 4): a nested map computes its block lower triangle, 2x2 + 2x4 = 12 multiply-adds per
    # position; 7 maps per block, 2 blocks: 168; 2 FLOPs each, x3 for forward + backward: 1,008 per
    # position; 3 x 5 positions
    assert gpu_smoke.trunk_flops_per_step([2, 4], num_blocks=2, batch=3, length=5) == 15_120
    # configs/gpu-smoke.yaml's sizes: 64x64 + 64x128 + 128x256 + 256x512 + 512x1024 = 700,416 per map
    assert gpu_smoke.trunk_flops_per_step([64, 128, 256, 512, 1024], 1, 1, 1) == 6 * 7 * 700_416

    h100 = gpu_smoke.trunk_figures(0.002, 197_800_000_000, "NVIDIA H100 80GB HBM3")
    assert abs(h100["tflops_per_s"] - 98.9) < 1e-9 and abs(h100["mfu"] - 0.1) < 1e-12
    assert h100["peak_bf16_tflops"] == 989 and "note" not in h100
    assert abs(gpu_smoke.trunk_figures(0.002, 62_400_000_000, "NVIDIA A100-SXM4-80GB")["mfu"] - 0.1) < 1e-12
    assert gpu_smoke.trunk_figures(1.0, 1, "NVIDIA H200")["peak_bf16_tflops"] == 989
    assert gpu_smoke.trunk_figures(1.0, 1, "NVIDIA H100 PCIe")["peak_bf16_tflops"] == 756
    unknown = gpu_smoke.trunk_figures(0.002, 197_800_000_000, "Tesla T4")
    assert (
        unknown["mfu"] is None
        and "Tesla T4" in unknown["note"]
        and abs(unknown["tflops_per_s"] - 98.9) < 1e-9
    )
