"""Masked fine-tune: frozen weights stay bitwise equal, fully frozen tensors form no gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepclean import MaskError, masked_finetune


def _run(model, mask, x, y, **kw):
    return masked_finetune(
        model, mask, x, y, epochs=2, lr=1e-2, batch_size=8,
        generator=torch.Generator().manual_seed(1), progress=False, **kw,
    )


def test_unselected_bitwise_equal_and_selected_moved(masked_case) -> None:
    model, x, y, mask = masked_case()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _run(model, mask, x, y)
    moved = 0
    for name, p in model.named_parameters():
        m = mask[name]
        assert torch.equal(p.detach()[~m], before[name][~m]), name
        moved += int((p.detach()[m] != before[name][m]).sum())
    assert moved > 0.5 * sum(int(m.sum()) for m in mask.values()), moved


def test_all_false_tensor_gets_no_gradient_and_requires_grad_is_restored(masked_case) -> None:
    model, x, y, mask = masked_case()
    frozen = model.features[0].weight
    seen = []
    hook = model.features[0].register_forward_hook(
        lambda module, inputs, output: seen.append(module.weight.requires_grad)
    )
    grads_seen = []
    orig_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        grads_seen.append(frozen.grad)
        return orig_step(self, *args, **kwargs)

    torch.optim.Adam.step = spy
    try:
        _run(model, mask, x, y)
    finally:
        torch.optim.Adam.step = orig_step
        hook.remove()
    assert seen and not any(seen)  # no weight gradient formed for the all-False tensor
    assert grads_seen and all(g is None for g in grads_seen)
    assert frozen.grad is None
    assert all(p.requires_grad for p in model.parameters())


def test_requires_grad_restored_on_error(masked_case) -> None:
    model, x, y, mask = masked_case()

    def boom(module, inputs, output):
        raise RuntimeError("boom")

    hook = model.classifier.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        _run(model, mask, x, y)
    hook.remove()
    assert all(p.requires_grad for p in model.parameters())


def test_mask_with_wrong_keys_raises(masked_case) -> None:
    model, x, y, mask = masked_case()
    bad = {"module." + k: v for k, v in mask.items()}
    with pytest.raises(MaskError, match="module."):
        _run(model, bad, x, y)
    missing = dict(mask)
    missing.pop(next(iter(missing)))
    with pytest.raises(MaskError):
        _run(model, missing, x, y)


def _bn_buffers(model: nn.Module) -> dict:
    return {
        n: b.clone() for n, b in model.named_buffers() if "running" in n or "num_batches" in n
    }


def test_bn_freeze_keeps_buffers_bitwise(masked_case) -> None:
    model, x, y, mask = masked_case()
    before = _bn_buffers(model)
    _run(model, mask, x, y, bn_stats="freeze")
    for n, b in _bn_buffers(model).items():
        assert torch.equal(b, before[n]), n


def test_bn_update_changes_running_mean(masked_case) -> None:
    model, x, y, mask = masked_case()
    before = _bn_buffers(model)
    _run(model, mask, x, y, bn_stats="update")
    after = _bn_buffers(model)
    assert not torch.equal(after["features.1.running_mean"], before["features.1.running_mean"])


def test_no_mask_trains_everything(masked_case) -> None:
    model, x, y, _ = masked_case()
    before = [p.detach().clone() for p in model.parameters()]
    _run(model, None, x, y)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
