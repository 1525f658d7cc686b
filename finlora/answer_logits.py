"""Training computes logits only where the loss looks: at the answer tokens (why, and what it
saves: docs/BENCHMARKS.md, "Logits at the answer tokens only").

`install(model)` hooks the model the Trainer calls. In training, when labels are given:
- the labels shifted as the loss shifts them (position t predicts token t+1) give the
  positions that carry a target;
- those targets go to transformers' ForCausalLMLoss as `shift_labels`, and the output
  head is fed only the hidden states at those positions.

Only the ignored rows, which add zero to the loss, are never computed (same loss, normaliser and
gradients: docs/BENCHMARKS.md). Evaluation, generation and calls without labels are untouched.
"""

from __future__ import annotations

IGNORE = -100


def install(model) -> bool:
    """Hook `model` (a PreTrainedModel or PeftModel); False when its loss is not the
    plain causal-LM loss these hooks reproduce, in which case nothing is changed."""
    import torch.nn.functional as F

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # the one under PEFT's wrappers
    head = lm.get_output_embeddings()
    plain_loss = getattr(lm, "loss_type", None) in (None, "ForCausalLM")
    if head is None or not plain_loss or getattr(model, "_finlora_answer_logits", False):
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
