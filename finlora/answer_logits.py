"""Training computes logits only where the loss looks: at the answer tokens.

With `train_on_inputs: false` the loss covers the few answer tokens of each example
(2 of ~65 for a sentiment label), yet a causal LM's forward turns every position into a
vocabulary-sized logit row: for SmolLM2 a [tokens x 576] @ [576 x 49,152] product and
its backward, ~20% of a CPU training step, plus a [tokens x 49,152] float tensor.

`install(model)` hooks the model the Trainer calls. In training, when labels are given:
- the labels shifted as the loss shifts them (position t predicts token t+1) give the
  positions that carry a target;
- those targets go to transformers' ForCausalLMLoss as `shift_labels`, and the output
  head is fed only the hidden states at those positions.

The loss is the same cross-entropy over the same (position, target) pairs, with the same
normaliser (`num_items_in_batch` or the count of targets); only the ignored rows, which
add zero, are never computed. tests/test_answer_logits.py checks loss and gradients
against the unhooked model. Evaluation, generation and calls without labels are untouched.
"""

from __future__ import annotations

IGNORE = -100


def _causal_lm(model):
    """The transformers model that owns the output head (under PEFT's wrappers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def install(model) -> bool:
    """Hook `model` (a PreTrainedModel or PeftModel); False when its loss is not the
    plain causal-LM loss these hooks reproduce, in which case nothing is changed."""
    import torch.nn.functional as F

    lm = _causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None or getattr(lm, "loss_type", None) not in (None, "ForCausalLM") or getattr(model, "_finlora_answer_logits", False):
        return False
    state = {"keep": None}

    def before_forward(_module, args, kwargs):
        state["keep"] = None
        labels = kwargs.get("labels")
        if not _module.training or labels is None or args or "shift_labels" in kwargs or kwargs.get("logits_to_keep"):
            return None
        shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
        keep = shifted != IGNORE
        state["keep"] = keep
        kwargs["shift_labels"] = shifted[keep]
        return args, kwargs

    def after_forward(_module, _args, _output):
        state["keep"] = None

    def before_head(_module, args):
        keep = state["keep"]
        if keep is None or args[0].shape[:2] != keep.shape:
            return None
        return (args[0][keep], *args[1:])

    model.register_forward_pre_hook(before_forward, with_kwargs=True)
    model.register_forward_hook(after_forward, always_call=True)
    head.register_forward_pre_hook(before_head)
    model._finlora_answer_logits = True
    return True
