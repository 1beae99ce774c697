"""Which checkpoint `--load` picks: the tracker's complete one, never an interrupted save."""

from __future__ import annotations

import json

import pytest

from dft_megatron.models.config import ModelConfig
from dft_megatron.training import checkpointing


def _complete(save, iteration):
    path = checkpointing.iteration_dir(save, iteration)
    path.mkdir(parents=True)
    (path / checkpointing.METADATA).write_text(
        json.dumps(
            {
                "format_version": checkpointing.FORMAT_VERSION,
                "iteration": iteration,
                "consumed_samples": 4 * iteration,
                "model": ModelConfig().to_dict(),
                "tensor_model_parallel_size": 1,
                "pipeline_model_parallel_size": 1,
                "has_optimizer": True,
            }
        )
    )
    (save / checkpointing.TRACKER).write_text(f"{iteration}\n")
    return path


def test_interrupted_save_is_never_loaded(tmp_path):
    done = _complete(tmp_path, 3)
    # A save of iteration 6 that died before its rename: files, but no tracker update.
    broken = tmp_path / ".iter_0000006.incomplete"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"partial")
    assert checkpointing.resolve(str(tmp_path)) == done
    info = checkpointing.read_info(done)
    assert (info.iteration, info.consumed_samples) == (3, 12)


def test_a_specific_iteration_folder_loads(tmp_path):
    _complete(tmp_path, 3)
    later = _complete(tmp_path, 5)
    assert checkpointing.resolve(str(tmp_path)) == later
    first = checkpointing.iteration_dir(tmp_path, 3)
    assert checkpointing.resolve(str(first)) == first


def test_tracker_naming_a_missing_checkpoint(tmp_path):
    (tmp_path / checkpointing.TRACKER).write_text("9\n")
    with pytest.raises(FileNotFoundError, match="names iteration 9, but .*iter_0000009 is not"):
        checkpointing.resolve(str(tmp_path))
    (tmp_path / checkpointing.TRACKER).write_text("latest\n")
    with pytest.raises(ValueError, match="holds 'latest', not an iteration number"):
        checkpointing.resolve(str(tmp_path))
