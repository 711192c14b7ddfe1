"""A run folder's guards: its settings must be known, damaged files are named, one process at a time,
and the folder may be moved with partial work in it."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from sppo_fast import _io
from sppo_fast.pipeline import iterate as it
from sppo_fast.pipeline.config import load_config


def small(runs, **kw):
    over = {"runs_dir": str(runs), "prompts_per_iteration": "16", "eval_prompts": "0", "iterations": "1",
            "generation_batch_size": "2"}
    over.update({k: str(v) for k, v in kw.items()})
    return load_config("tiny", overrides=over)


def test_results_without_config_yaml_or_with_a_damaged_one_are_refused(tmp_path):
    cfg = small(tmp_path)
    it.run_iteration(cfg, 1, progress=False, until="generate")
    (cfg.run_dir / "config.yaml").unlink()
    with pytest.raises(ValueError, match="holds results .*iter-1.* but no config.yaml"):
        it.run_iteration(small(tmp_path, **{"train.beta": 0.5}), 1, progress=False, until="rank")
    assert not (cfg.run_dir / "config.yaml").exists()  # (not rewritten with the new settings)
    (cfg.run_dir / "config.yaml").write_text("{{{")
    with pytest.raises(ValueError, match=r"config.yaml: damaged .*restore it"):
        it.run_iteration(cfg, 1, progress=False, until="rank")
    (cfg.run_dir / "config.yaml").write_text("just a string")
    with pytest.raises(ValueError, match=r"config.yaml: damaged \(a str, not a mapping"):
        it.run_iteration(cfg, 1, progress=False, until="rank")


def test_damaged_outputs_are_named(tmp_path):
    cfg = small(tmp_path)
    it.run_iteration(cfg, 1, progress=False, until="rank")
    it_dir = cfg.run_dir / "iter-1"
    (it_dir / "ranking.json").write_text("{'tied': 0")
    with pytest.raises(ValueError, match=r"ranking.json: damaged or not JSON .*delete it"):
        it._ranking_info(it_dir)
    (it_dir / "train.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"train.parquet: damaged or not a Parquet file"):
        it.run_iteration(cfg, 1, progress=False)
    with pytest.raises(FileNotFoundError):  # (a missing file stays what it is)
        _io.read_parquet(tmp_path / "nothing.parquet")


def test_a_second_process_on_a_run_folder_is_refused(tmp_path):
    cfg = small(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from sppo_fast import _io\n"
         "with _io.folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(cfg.run_dir)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RANK": "0"})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"another process is using this run folder \(pid {holder.pid}\)"):
            it.run_iteration(cfg, 1, progress=False, until="generate")
        assert not (cfg.run_dir / "iter-1").exists()
    finally:
        holder.kill()
        holder.wait()
    with _io.folder_lock(cfg.run_dir):  # released with its process; re-entrant within one
        it.run_iteration(cfg, 1, progress=False, until="generate")
    assert (cfg.run_dir / "iter-1" / "generations.parquet").exists()


def test_partial_generation_survives_moving_the_run_folder(tmp_path, monkeypatch):
    cfg = small(tmp_path / "a")
    real = it.generate
    calls = []

    def dies_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(it, "generate", dies_second)
    with pytest.raises(KeyboardInterrupt):
        it.run_iteration(cfg, 1, progress=False, until="generate")
    spec = json.loads((cfg.run_dir / "iter-1" / "generations.shards" / "settings.json").read_text())
    assert spec["policy"] == "iter-0/model"
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = small(tmp_path / "b")
    kept = []
    monkeypatch.setattr(it, "generate", lambda *a, **k: kept.append(1) or real(*a, **k))
    it.run_iteration(moved, 1, progress=False, until="generate")
    assert len(kept) == 1  # the first chunk's rows were kept, not redone
    assert (moved.run_dir / "iter-1" / "generations.parquet").exists()
