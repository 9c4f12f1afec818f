"""``structlm study``: a report of what each part of a model is worth, by the pruning methods' own
criteria (blocks, sublayers, heads, channels), per data source, with rank correlations, cost
curves and generated findings.  See docs/studies.md.

    import structlm
    result = structlm.study("smollm2-135m", out="study_smol")          # or a loaded model + tokenizer
"""

from .criteria import CRITERIA, LAYER_CRITERIA, WIDTH_CRITERIA, StudyError
from .run import study

__all__ = ["study", "StudyError", "CRITERIA", "LAYER_CRITERIA", "WIDTH_CRITERIA"]


# ``structlm.study`` is both this package and the function: importing a submodule
# (structlm.study.criteria) binds the package to the name, so the package calls the function.
def _make_callable() -> None:
    import sys
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return study(*args, **kwargs)

    sys.modules[__name__].__class__ = _CallableModule


_make_callable()
