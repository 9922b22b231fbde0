"""Bad input to the converter: one clear error each, naming the file and the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from megatron_syne.convert.arch import ConversionError
from megatron_syne.convert.cli import main as cli_main
from megatron_syne.convert.hf_to_megatron import HFToMegatronConfig, convert_hf_to_megatron
from megatron_syne.convert.megatron_checkpoint import MegatronCheckpointReader, single_process_group
from megatron_syne.convert.megatron_to_hf import MegatronToHFConfig, convert_megatron_to_hf
from tests.convert._models import make_hf_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "hf"
    make_hf_llama(path, num_hidden_layers=1, max_shard_size="20KB")
    return path


@pytest.fixture(scope="module")
def megatron_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_mg") / "mg"
    convert_hf_to_megatron(HFToMegatronConfig(hf_dir=hf_dir, save=out, show_progress=False))
    return out


def _copy(hf_dir, tmp_path):
    target = tmp_path / "hf"
    shutil.copytree(hf_dir, target)
    return target


def _to_megatron(hf, tmp_path, **kwargs):
    return convert_hf_to_megatron(
        HFToMegatronConfig(hf_dir=hf, save=tmp_path / "out", show_progress=False, **kwargs)
    )


def test_missing_shard(hf_dir, tmp_path):
    hf = _copy(hf_dir, tmp_path)
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ConversionError, match=f"do not exist.*{shard.name}"):
        _to_megatron(hf, tmp_path)
    assert not (tmp_path / "out").exists()


def test_truncated_shard(hf_dir, tmp_path):
    hf = _copy(hf_dir, tmp_path)
    shard = sorted(hf.glob("model-*.safetensors"))[2]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=f"{shard.name}: cannot be read as safetensors"):
        _to_megatron(hf, tmp_path)


def test_index_pointing_to_wrong_shard(hf_dir, tmp_path):
    hf = _copy(hf_dir, tmp_path)
    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[-1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="does not contain it"):
        _to_megatron(hf, tmp_path)


def test_unexpected_bias_tensor_is_not_dropped(hf_dir, tmp_path):
    hf = _copy(hf_dir, tmp_path)
    save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, hf / "extra.safetensors")
    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        ConversionError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"
    ):
        _to_megatron(hf, tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
        ({"attention_bias": True}, "attention_bias=true"),
    ],
)
def test_unsupported_config(hf_dir, tmp_path, change, message):
    hf = _copy(hf_dir, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(change)
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=f"config.json: cannot convert.*\n.*{message}"):
        _to_megatron(hf, tmp_path)


def test_shape_that_contradicts_config(hf_dir, tmp_path):
    hf = _copy(hf_dir, tmp_path)
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] = 128
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConversionError, match=r"gate_proj.weight: shape \[96, 64\], expected \[128, 64\]"
    ):
        _to_megatron(hf, tmp_path)


def test_preset_and_layout_mismatch(hf_dir, tmp_path):
    with pytest.raises(ConversionError, match="does not match preset 'llama3-8b'"):
        _to_megatron(hf_dir, tmp_path, preset="llama3-8b")
    with pytest.raises(
        ConversionError,
        match="num_query_groups=2 is not divisible by --target-tensor-parallel-size 4",
    ):
        _to_megatron(hf_dir, tmp_path, target_tensor_parallel_size=4)
    with pytest.raises(
        ConversionError, match="num_layers=1 is not divisible by --target-pipeline-parallel-size 2"
    ):
        _to_megatron(hf_dir, tmp_path, target_pipeline_parallel_size=2)


def test_existing_output_needs_overwrite(hf_dir, megatron_dir):
    with pytest.raises(ConversionError, match="is not empty.*--overwrite"):
        convert_hf_to_megatron(
            HFToMegatronConfig(hf_dir=hf_dir, save=megatron_dir, show_progress=False)
        )


def test_missing_and_incomplete_megatron_checkpoints(megatron_dir, tmp_path):
    with pytest.raises(ConversionError, match="no such checkpoint directory"):
        MegatronCheckpointReader(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    shutil.copytree(megatron_dir, broken)
    (broken / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(ConversionError, match="names iter_0000007.*metadata.json missing"):
        MegatronCheckpointReader(broken)


def test_corrupt_megatron_checkpoint(megatron_dir, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(megatron_dir, corrupt)
    for data_file in (corrupt / "iter_0000000").glob("*.distcp"):
        data_file.write_bytes(data_file.read_bytes()[:100])
    with pytest.raises(ConversionError, match="cannot read .*truncated or corrupt"):
        convert_megatron_to_hf(
            MegatronToHFConfig(load=corrupt, save=tmp_path / "hf_out", show_progress=False)
        )
    # No partial HF checkpoint is left that could pass for a complete one.
    assert not list((tmp_path / "hf_out").glob("*.safetensors"))
    assert not (tmp_path / "hf_out" / "config.json").exists()
    metadata = corrupt / "iter_0000000" / ".metadata"
    metadata.write_bytes(b"not a pickle")
    with pytest.raises(ConversionError, match="cannot read the checkpoint metadata"):
        with single_process_group():
            MegatronCheckpointReader(corrupt)


def test_cli_reports_errors_without_traceback(hf_dir, tmp_path, capsys):
    rc = cli_main(
        [
            "hf-to-megatron",
            "--hf-dir",
            str(hf_dir),
            "--save",
            str(tmp_path / "o"),
            "--preset",
            "llama3-70b",
            "--no-progress",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the checkpoint does not match preset 'llama3-70b'")
    assert "hidden_size: checkpoint 64, preset 8192" in err
