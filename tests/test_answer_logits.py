"""answer_logits_only: the head sees only the target positions; loss and gradients do not change."""

from __future__ import annotations

import pytest


def _lora_model(seed: int = 0):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                             lora_dropout=0.0, init_lora_weights="gaussian"))
    model.train()
    return model


def _batch():
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 500, (3, 40), generator=g)
    labels = torch.full_like(ids, -100)
    for row, spans in enumerate([[(10, 12), (30, 33)], [(5, 7)], [(20, 22), (37, 40)]]):  # answers, one at the row end
        for a, b in spans:
            labels[row, a:b] = ids[row, a:b]
    return ids, labels


def _loss_and_grads(model, **extra):
    ids, labels = _batch()
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **extra)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


@pytest.mark.parametrize("num_items", [None, 9.0])
def test_same_loss_and_grads_as_all_logits(num_items):
    import torch

    from finlora.answer_logits import install

    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref_out, ref = _loss_and_grads(_lora_model(), **extra)
    model = _lora_model()
    assert install(model)
    out, got = _loss_and_grads(model, **extra)

    # Position t is scored on token t+1, so each of the 2+3+2+2+3 labelled tokens (none at
    # position 0) is one target, and the head computed exactly those rows.
    assert out.logits.shape == (12, 500)
    assert ref_out.logits.shape == (3, 40, 500)
    assert out.loss.item() == pytest.approx(ref_out.loss.item(), rel=1e-6)
    assert got.keys() == ref.keys() and len(got) == 2 * 3 * 2
    for name in ref:
        assert torch.allclose(got[name], ref[name], rtol=1e-5, atol=1e-7), name


def test_eval_and_generation_keep_every_logit():
    import torch

    from finlora.answer_logits import install

    model = _lora_model()
    install(model)
    ids, labels = _batch()
    model.eval()
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits.shape == (3, 40, 500)
        assert model(input_ids=ids).logits.shape == (3, 40, 500)
    model.train()
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (3, 40, 500)  # no labels: nothing to select
        gen = model.generate(input_ids=ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 8)


def test_a_second_install_is_refused():
    from finlora.answer_logits import install

    model = _lora_model()
    assert install(model) and not install(model)
