"""Which MLP activation a CLIP checkpoint was trained with: QuickGELU or nn.GELU.

OpenAI's CLIP (and every task-vector bank fine-tuned from it, e.g. the task-arithmetic / aTLAS
ViT-B/32 checkpoints) uses QuickGELU, x * sigmoid(1.702 x); open_clip builds nn.GELU unless the
architecture is named `-quickgelu` or asked for it. Building the wrong one silently shifts every
feature, so the choice is made explicitly here and reported.
"""

from __future__ import annotations


def openai_architecture(name: str) -> bool:
    """Does open_clip know OpenAI CLIP weights for this architecture (trained with QuickGELU)?"""
    from open_clip import pretrained as oc_pretrained

    return "openai" in oc_pretrained.list_pretrained_tags_by_model(name)


def resolve_activation(
    name: str, declared: str | None, flag: bool | None
) -> tuple[bool, str, str | None]:
    """(use QuickGELU, where that came from, a warning or None).

    Order: the --quick-gelu/--no-quick-gelu option; a `-quickgelu` architecture name (or a config
    with ``"quick_gelu": true``); what the checkpoint declares (a pickled module names its
    activation class, a pretrained tag records it); else plain GELU, with a warning when the
    architecture is one OpenAI released (their weights need QuickGELU).
    """
    import open_clip

    cfg_quick = bool((open_clip.get_model_config(name) or {}).get("quick_gelu"))
    named = name.endswith("-quickgelu") or cfg_quick
    if flag is not None:
        note = None
        if declared is not None and (declared == "quick_gelu") != flag:
            note = (
                f"the checkpoint was built with {_act(declared == 'quick_gelu')} but "
                f"{'--quick-gelu' if flag else '--no-quick-gelu'} asks for {_act(flag)}; "
                "following the option"
            )
        return flag, "option", note
    if named:
        note = None
        if declared == "gelu":
            note = f"{name} uses QuickGELU but the checkpoint was built with nn.GELU"
        return True, "architecture", note
    if declared is not None:
        return declared == "quick_gelu", "checkpoint", None
    note = None
    if openai_architecture(name):
        note = (
            f"the weights do not say which activation they were trained with; building {name} "
            "with nn.GELU, but OpenAI CLIP weights (and banks fine-tuned from them) need "
            f"QuickGELU: pass --quick-gelu (or --model {name}-quickgelu) for those, "
            "--no-quick-gelu to silence this"
        )
    return False, "default", note


def _act(quick: bool) -> str:
    return "QuickGELU" if quick else "nn.GELU"
