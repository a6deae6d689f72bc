"""``timm:<model name>``: how a student (``-a``) or a teacher (``-t``/``-ts``) names a timm model."""
from __future__ import annotations

TIMM_PREFIX = "timm:"


def is_timm_name(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


def timm_model_name(name: str, flag: str) -> str:
    """The timm model of ``timm:<model name>[.<pretrained tag>]``; ``ValueError`` (naming ``flag``) for a name timm
    does not know, with the way to list the names it does."""
    model = name[len(TIMM_PREFIX):]
    import timm  # here: importing timm takes a second, and most runs name no timm model

    if not model or not timm.is_model(model):
        pattern = f"*{model.split('.')[0].split('_')[0]}*" if model else "*dinov2*"
        raise ValueError(f"unknown timm model '{model}' in {flag} {name}; list the names with: python -c \"import "
                         f"timm; print(timm.list_models('{pattern}'))\"")
    return model
