"""Proof of ownership: evidence that a suspect model was taken from a divqat victim.

Two kinds of evidence, each tested against chance with one statistic (``stats``):

- watermarks in the black box's answers (DAWN, Szyller et al., ACM MM 2021): a keyed fraction of
  queries answered with a deterministic wrong label, per API key, so a surrogate distilled from the
  answers repeats the marks of the key that trained it;
- fingerprints of the model file (IPGuard, Cao et al., AsiaCCS 2021): inputs near the victim's
  decision boundaries with its labels, shared by copies (fine-tuned, pruned, requantized) and not
  by independently trained models.

This package sits beside the defenses and detectors: it sees images and posteriors, never the
black box, an attack or a driver (import-linter contracts in pyproject.toml).
"""

from divqat.ownership.mark_store import KeyedWatermarks, MarkStore, load_marks
from divqat.ownership.marks import KeyMarks, save_marks
from divqat.ownership.stats import SIGNIFICANCE, Verdict, binomial_p_value, verdict
from divqat.ownership.watermark import DEFAULT_RATE, MarkLog, Watermark

__all__ = ["DEFAULT_RATE", "SIGNIFICANCE", "KeyMarks", "KeyedWatermarks", "MarkLog", "MarkStore",
           "Verdict", "Watermark", "binomial_p_value", "load_marks", "save_marks", "verdict"]
