import pytest
import torch

from deepclean import CheckpointError, build_model
from deepclean.checkpoint import load_checkpoint, load_weights, save_checkpoint


def _model(seed=0, width=0.25):
    return build_model("small_cnn", in_channels=1, num_classes=10, width=width, seed=seed)


def test_roundtrip_with_metadata(tmp_path):
    m = _model()
    path = save_checkpoint(tmp_path / "m.safetensors", m, {"seed": 3})
    state, meta = load_checkpoint(path)
    assert meta["seed"] == 3 and "torch_version" in meta and "state_sha256" in meta
    fresh = _model(seed=1)
    load_weights(fresh, path)
    for (k, a), b in zip(fresh.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_truncated_or_altered_file_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _model())
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "t.safetensors")
    altered = bytearray(data)
    altered[-5] ^= 0xFF
    (tmp_path / "a.safetensors").write_bytes(bytes(altered))
    with pytest.raises(CheckpointError, match="hash"):
        load_checkpoint(tmp_path / "a.safetensors")


def test_module_prefix_and_pt_files_load_with_weights_only(tmp_path):
    m = _model()
    torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, tmp_path / "dp.pt")
    fresh = _model(seed=2)
    load_weights(fresh, tmp_path / "dp.pt")
    assert torch.equal(fresh.features[0].weight, m.features[0].weight)
    wrapped = torch.nn.DataParallel(_model(seed=2))
    save_checkpoint(tmp_path / "w.safetensors", wrapped)
    state, _ = load_checkpoint(tmp_path / "w.safetensors")
    assert not any(k.startswith("module.") for k in state)


def test_mismatched_model_is_refused_not_partially_loaded(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", _model(width=0.25))
    other = _model(width=0.5)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="shape"):
        load_weights(other, path)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"weights": object()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_weights(_model(), tmp_path / "evil.pt")
